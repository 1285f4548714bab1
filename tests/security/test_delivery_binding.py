"""Issue 18, item 2, per connection: a result is accepted only from the worker the request was
delivered to, even when other processes hold the same credential.

With static users, two boxes logged in as `worker` share the reply prefix `_INBOX_worker`: either
can subscribe to `_INBOX_worker.>` and read the requests (and result tokens) JetStream delivers
to the other. Behind `captionbus auth-callout` each connection has its own prefix, derived from a
key only it holds (captionbus/authcallout.py). Here, on a real nats-server with the callout
answering, one `worker` connection is delivered a request while another connection with the
same user and password sniffs everything it may and forges a result with what it saw."""
from __future__ import annotations

import asyncio
import json
import time

import nats.errors
import pytest
from structlog.testing import capture_logs

from captionbus.authcallout import Callout, connection_permissions, read_users
from captionbus.core.bus import USER_INFO, BusError, connect, publish_event
from captionbus.core.settings import Settings
from tests.natsroles import NATS_DEPLOY, violations
from tests.security.attacks import forged_results
from tests.security.fleet import secured_fleet, start_worker

# What the WORKER block (roles.conf) lets a connection subscribe to, besides its own reply prefix.
WORKER_SUBSCRIPTIONS = ("$SRV.>", "captionbus.job.*.cancelled", "captionbus.job.*.failed")


async def _delivered(fleet, js, job_id: str, timeout: float = 20):
    """The job once the noop stage's consumer has handed its request out (one ack pending): its
    worker holds the delivery."""
    from captionbus.client import acting_for, job_state

    deadline = time.monotonic() + timeout
    while (await js.consumer_info("CB_REQUESTS", "stage-noop")).num_ack_pending < 1:
        assert time.monotonic() < deadline, f"{job_id}: its request was never delivered"
        await asyncio.sleep(0.05)
    with acting_for(fleet.tenant()):
        return await job_state(fleet.js["client"], fleet.job(job_id))


def test_a_peer_with_the_same_worker_credential_cannot_read_or_answer_anothers_delivery(tmp_path):
    """Two connections log in as `worker`. The honest one (the noop stage service) is delivered
    the victim job's request and works on it for 6 s. Meanwhile the attacker:
    subscribes to its own reply prefix and every other subject its role allows (`$SRV.>`, job
    ends), and tries the shared inbox, the static `_INBOX_worker` prefix, `>` and the honest
    connection's exact prefix (refused and logged by the server); publishes results for the node with no
    token, a guessed one and every token-like value it saw; then pulls from the stage's consumer
    (the request is held by its peer: nothing comes). The coordinator refuses each with
    `forged result refused`; the job completes with the honest worker's output, and both the
    victim's and an earlier job's bytes fetch identically."""

    async def main():
        async with secured_fleet(tmp_path, worker=False, callout=True) as fleet:
            async with start_worker(fleet):
                earlier, earlier_bytes = await fleet.run_job("job-earlier")
            attacker = await fleet.connect("worker", "attacker")
            mine = attacker._inbox_prefix.decode()
            seen: list[tuple[str, bytes]] = []

            async def keep(msg):
                seen.append((msg.subject, msg.data))

            allowed = (f"{mine}.>", *WORKER_SUBSCRIPTIONS)
            for subject in allowed:
                await attacker.subscribe(subject, cb=keep)
            async with start_worker(fleet):
                honest = [g for g in fleet.callout.granted if g["user"] == "worker" and g["name"].startswith("stage ")]
                peer = honest[-1]["prefix"]
                refused_subjects = ("_INBOX.>", "_INBOX_worker.>", ">", f"{peer}.>")
                for subject in refused_subjects:
                    await attacker.subscribe(subject, cb=keep)
                await attacker.flush()
                media = await fleet.submit("job-victim", workflow="slow")
                running = await _delivered(fleet, attacker.jetstream(), "job-victim")
                sightings = [json.loads(data) for _, data in seen if data.startswith(b"{")]
                tokens = {s.get("token") for s in sightings if isinstance(s, dict) and s.get("token")}
                with capture_logs() as logs:
                    forged = forged_results(fleet.job("job-victim"), "noop", running.nodes["noop"].attempt, earlier.outputs)
                    forged += [forged_results(fleet.job("job-victim"), "noop", 1, earlier.outputs)[0].model_copy(
                        update={"token": token, "event_id": f"forged-seen-{i}"}) for i, token in enumerate(tokens)]
                    for event in forged:
                        await publish_event(attacker.jetstream(), event)
                    # Steal the request from the shared consumer instead: it is its peer's until acked.
                    pulled = await attacker.jetstream().pull_subscribe_bind("stage-noop", stream="CB_REQUESTS")
                    stolen = []
                    with pytest.raises(nats.errors.TimeoutError):
                        stolen = await pulled.fetch(1, timeout=1.0)
                    assert (await fleet.wait("job-victim", "running")).nodes["noop"].status.value == "requested"
                    done = await fleet.wait("job-victim", "completed")
            fetched = await fleet.fetch(done)
            again = await fleet.fetch(earlier)
            await attacker.close()
            return (logs, seen, stolen, forged, done, fetched, media.read_bytes(), earlier, earlier_bytes, again,
                    mine, peer, refused_subjects)

    (logs, seen, stolen, forged, done, fetched, media, earlier, earlier_bytes, again, mine, peer,
     refused_subjects) = asyncio.run(asyncio.wait_for(main(), 120))
    assert mine != peer and mine.startswith("_INBOX_worker_") and peer.startswith("_INBOX_worker_")
    # Nothing it saw was a delivery: no request, no token of the victim's job.
    assert stolen == []
    assert not [s for s, data in seen if b"job-victim" in data and b"token" in data], seen
    assert not [s for s, _ in seen if s.startswith(peer)]
    refusals = [e for e in logs if e["event"] == "forged result refused"]
    assert len(refusals) == len(forged) >= 2, logs
    assert all(e["job_id"] == "client_job-victim" and e["claimed_worker"] == {"host": "attacker"} for e in refusals)
    assert done.nodes["noop"].worker.get("host") != "attacker"
    assert done.outputs["out"] != earlier.outputs["out"]
    assert fetched["job.input"] == media and len(fetched["out"]) == 300_000
    assert again == earlier_bytes
    logged = set(violations(tmp_path / "server.log"))
    assert {("worker", s) for s in refused_subjects} <= logged, logged
    # Everything else ran under the callout's grants without one refusal.
    assert {s for _, s in logged} <= set(refused_subjects), logged


def test_the_callout_lets_in_only_its_users_with_their_password_and_a_key(tmp_path):
    """A wrong password, an unknown user, and a login without a per-connection key (a process
    not in callout mode, sending a plain user and password) are refused with the callout's
    reason in the server log; the right login gets in."""

    async def main():
        async with secured_fleet(tmp_path, worker=False, callout=True) as fleet:
            url = fleet.urls["client"]
            results = {}
            for case, target, callout in (
                ("wrong password", url.replace("pw-client", "pw-nope"), True),
                ("unknown user", url.replace("client:pw-client", "mallory:pw-client"), True),
                ("no key", url, False),
            ):
                try:
                    nc = await connect(target, f"try-{case}", Settings(nats_auth_callout=callout))
                except BusError as error:
                    results[case] = str(error)
                else:
                    await nc.close()
                    results[case] = "let in"
            ok = await fleet.connect("client", "right")
            await ok.close()
            return results

    results = asyncio.run(asyncio.wait_for(main(), 60))
    for case, outcome in results.items():
        assert "Authorization Violation" in outcome, (case, outcome)
    server_log = (tmp_path / "server.log").read_text()
    assert "unknown user or wrong password" in server_log
    assert "no captionbus login" in server_log


def test_the_callout_grants_each_role_its_roles_conf_block_with_a_reply_prefix_of_its_own():
    """The callout reads deploy/nats/accounts.conf (and the roles.conf it includes) as the server
    would, and changes only the reply prefix each role may subscribe to."""
    from tests.natsroles import role_variables

    users = read_users(NATS_DEPLOY / "accounts.conf")
    assert set(users) >= {"coordinator", "worker", "worker-asr", "client", "gateway", "dashboard", "gc"}
    assert len({id(u.permissions) for u in users.values()}) == len(role_variables())
    for user, account in users.items():
        granted = connection_permissions(account.permissions, f"_INBOX_{user}_0123")
        block = account.permissions
        # and what it was granted (captionbus.core.bus.client_tenant asks): its own permissions only
        assert granted["pub"]["allow"] == [*block["publish"]["allow"], USER_INFO]
        wanted = [f"_INBOX_{user}_0123.>" if s == f"_INBOX_{user}.>" else s for s in block["subscribe"]["allow"]]
        assert granted["sub"]["allow"] == wanted, user
        assert ("resp" in granted) == bool(block.get("allow_responses"))


def test_the_auth_callout_command_makes_its_key_and_lets_connections_in(tmp_path):
    """`captionbus auth-callout keygen` writes the signing key (0600, never over an existing one)
    and prints the public key the servers trust; `captionbus auth-callout run` with it, logged in
    as the server's callout user, lets a worker in with its own reply prefix, and stops on SIGTERM
    with exit 0."""
    import os
    import signal
    import subprocess
    import sys

    from tests.natsroles import CALLOUT_USER, callout_server, role_variables

    root = str(NATS_DEPLOY.parents[1])
    env = {**os.environ, "PYTHONPATH": root, "CAPTIONBUS_HOME": str(tmp_path / "home")}
    seed_file = tmp_path / "callout.seed"
    cli = [sys.executable, "-m", "captionbus", "auth-callout"]
    made = subprocess.run([*cli, "keygen", "--seed-file", str(seed_file)], env=env, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().startswith("A") and oct(seed_file.stat().st_mode & 0o777) == "0o600"
    again = subprocess.run([*cli, "keygen", "--seed-file", str(seed_file)], env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 2 and "exists" in again.stderr
    with callout_server(tmp_path, {"worker": "WORKER"}, seed=seed_file.read_text().strip()) as (urls, log, accounts, _):
        service = subprocess.Popen([*cli, "run", "--accounts", str(accounts), "--seed-file", str(seed_file)],
                                   env={**env, "NATS_URL": urls[CALLOUT_USER]}, stderr=subprocess.PIPE, text=True)
        try:
            # the worker, and one unused user per other roles.conf block (natsroles.unused_roles)
            assert f"auth callout answering for {len(role_variables())} users" in service.stderr.readline()

            async def login():
                nc = await connect(urls["worker"], "worker", Settings(nats_auth_callout=True))
                prefix = nc._inbox_prefix.decode()
                await nc.subscribe(f"{prefix}.>")
                await nc.flush()
                await nc.close()
                return prefix

            prefix = asyncio.run(asyncio.wait_for(login(), 20))
        finally:
            service.send_signal(signal.SIGTERM)
            code = service.wait(15)
    assert prefix.startswith("_INBOX_worker_") and code == 0
    assert not violations(log)


def test_each_connection_in_callout_mode_sends_its_login_with_a_key_of_its_own():
    """The token a connection sends: the user and password (settings, else the URL's) and a new
    key, whose hash is the reply prefix the callout grants; two connections never share one. A
    role block granting every reply (`_INBOX.>`) is refused by the callout."""
    from captionbus.authcallout import ConfError
    from captionbus.core.bus import callout_inbox_prefix, callout_login

    url = "nats://worker:p%40ss@10.0.0.5:4222,nats://10.0.0.6:4222"
    first, second = callout_login(url, Settings()), callout_login(url, Settings())
    login = json.loads(first["token"])
    assert (login["user"], login["pass"]) == ("worker", "p@ss") and len(login["key"]) >= 32
    assert first["inbox_prefix"] == callout_inbox_prefix("worker", login["key"]) != second["inbox_prefix"]
    named = json.loads(callout_login("tls://h1:4222", Settings(nats_user="gc", nats_password="x"))["token"])
    assert (named["user"], named["pass"]) == ("gc", "x")
    with pytest.raises(BusError, match="needs a user and password"):
        callout_login("tls://h1:4222", Settings())
    with pytest.raises(ConfError, match="every connection's replies"):
        connection_permissions({"subscribe": {"allow": ["_INBOX.>"]}}, "_INBOX_x_1")


def test_with_no_callout_up_open_connections_go_on_and_new_ones_wait_for_one(tmp_path):
    """What deploy/README.md promises when every callout is down: a connection already in keeps
    its permissions and works; a new login is refused within seconds (the server's auth timeout)
    with an authorization error, not a hang; once a callout answers again, logins succeed."""
    from tests.natsroles import CALLOUT_USER, callout_server

    async def main():
        with callout_server(tmp_path, {"worker": "WORKER"}) as (urls, log, accounts, seed):
            callout = Callout(read_users(accounts), seed)
            admin = await connect(urls[CALLOUT_USER], "auth-callout", Settings())

            async def answering():
                stop, ready = asyncio.Event(), asyncio.Event()
                task = asyncio.create_task(callout.serve(admin, stop, ready))
                await ready.wait()
                return stop, task

            stop, task = await answering()
            inside = await connect(urls["worker"], "inside", Settings(nats_auth_callout=True))
            stop.set()
            await task
            started = time.monotonic()
            with pytest.raises(BusError, match="Authorization Violation"):
                await connect(urls["worker"], "late", Settings(nats_auth_callout=True))
            refused_after = time.monotonic() - started
            await inside.subscribe(f"{inside._inbox_prefix.decode()}.>")
            await inside.flush()
            stop, task = await answering()
            again = await connect(urls["worker"], "again", Settings(nats_auth_callout=True))
            await again.close()
            stop.set()
            await task
            await inside.close()
            await admin.close()
            return refused_after, violations(log)

    refused_after, logged = asyncio.run(asyncio.wait_for(main(), 60))
    assert refused_after < 8, refused_after
    assert not logged  # the open connection's own prefix was still granted
