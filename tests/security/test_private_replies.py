"""Issue 18, item 2: replies are private to the role they answer, and a result is applied only
with the token of the request it answers.

The attack the chaos run made: a worker-asr credential subscribed to `_INBOX.>`, received demux,
vad and subtitle_gen deliveries (with their result tokens) and forged a subtitle_gen result the
coordinator applied. Here every role tries that sniff on a live secured fleet while a job runs,
and a forged result is sent for a node waiting on its worker."""
from __future__ import annotations

import asyncio
import time

import pytest
from structlog.testing import capture_logs

from captionbus.core.bus import connect, publish_event
from tests.natsroles import violations
from tests.security.attacks import SNIFFED, forged_results
from tests.security.fleet import ROLES, secured_fleet, start_worker


def test_no_role_can_read_another_roles_replies(tmp_path):
    """Each role, on a connection of its own, subscribes to the shared inbox and to the worker's,
    coordinator's and client's prefixes while a job runs (the worker pulls its request, the
    coordinator reads job state, the client uploads, follows and fetches). The server refuses
    every subscription but the role's own prefix and logs each refusal; the sniffers get nothing,
    while the same role's own prefix sees its own replies (the sniff would have worked)."""
    sniffers = [r for r in ROLES if r != "gc"] + ["gc"]

    async def main():
        async with secured_fleet(tmp_path) as fleet:
            got: dict[tuple[str, str], int] = {}
            spies = {}
            for role in sniffers:
                spies[role] = await connect(fleet.urls[role], f"spy-{role}")
                for subject in (*SNIFFED, f"_INBOX_{role}.>"):
                    got[(role, subject)] = 0

                    async def count(msg, key=(role, subject)):
                        got[key] += 1

                    await spies[role].subscribe(subject, cb=count)
                await spies[role].flush()
            await fleet.run_job("job-sniffed")
            await asyncio.sleep(0.3)
            for spy in spies.values():
                await spy.close()
            return got

    got = asyncio.run(asyncio.wait_for(main(), 90))
    refused = set(violations(tmp_path / "server.log"))
    for (role, subject), n in got.items():
        if subject == f"_INBOX_{role}.>":
            continue
        assert n == 0, f"{role} read {n} replies on {subject}"
        assert (role, subject) in refused, f"the server did not refuse {role} subscribing {subject}"
    # The roles the job's replies went to: their own-prefix spies saw them (prefixes are in use,
    # and a permitted wildcard subscription would have read them).
    for role in ("coordinator", "worker", "client"):
        assert got[(role, f"_INBOX_{role}.>")] > 0, role
    assert not {(u, s) for u, s in refused if s.startswith(f"_INBOX_{u}.")}, "a role was refused its own inbox"


def test_a_forged_result_is_refused_and_logged_and_the_real_one_completes_the_job(tmp_path):
    """worker-asr, sniffing all it may, forges a result for a noop node waiting on its worker:
    another job's output, claimed as `{"host": "attacker"}`, with no token and with a guessed
    one. The coordinator refuses both with a warning naming the node; once the worker runs,
    the job completes with the worker's own output, and the other job's bytes are unchanged."""

    async def main():
        async with secured_fleet(tmp_path, worker=False) as fleet:
            async with start_worker(fleet):
                earlier, earlier_bytes = await fleet.run_job("job-earlier")
            attacker = await connect(fleet.urls["worker-asr"], "attacker")
            sniffed = []

            async def keep(msg):
                sniffed.append(msg)

            for subject in SNIFFED:
                await attacker.subscribe(subject, cb=keep)
            from captionbus.client import submit
            from captionbus.core.artifacts import ArtifactStore
            media = tmp_path / "victim.wav"
            media.write_bytes(b"RIFF" + bytes(range(256)) * 500)
            store = ArtifactStore(fleet.settings("client", "victim"), fleet.js["client"])
            await submit(fleet.js["client"], store, media, workflow="made", job_id="job-victim")
            await fleet.wait("job-victim", "running")
            with capture_logs() as logs:
                for forged in forged_results("job-victim", "noop", 1, earlier.outputs):
                    await publish_event(attacker.jetstream(), forged)
                # Until the coordinator has refused both (a forged result it applied instead
                # logs no refusal: then the assertions below fail), not a fixed 1.5 s.
                deadline = time.monotonic() + 15
                while sum(e["event"] == "forged result refused" for e in logs) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                still = await fleet.wait("job-victim", "running")
            assert still.nodes["noop"].status.value == "requested"
            async with start_worker(fleet):
                done = await fleet.wait("job-victim", "completed")
            fetched = await fleet.fetch(done)
            again = await fleet.fetch(earlier)
            await attacker.close()
            return logs, sniffed, done, fetched, earlier, earlier_bytes, again

    logs, sniffed, done, fetched, earlier, earlier_bytes, again = asyncio.run(asyncio.wait_for(main(), 90))
    assert sniffed == []
    refusals = [e for e in logs if e["event"] == "forged result refused"]
    assert len(refusals) == 2, logs
    assert all(e["job_id"] == "job-victim" and "noop" in e["note"] and e["claimed_worker"] == {"host": "attacker"}
               for e in refusals)
    assert done.nodes["noop"].worker.get("host") != "attacker"
    assert done.outputs["out"] != earlier.outputs["out"]  # the worker's output, not the forged one
    assert fetched["job.input"] == (tmp_path / "victim.wav").read_bytes()
    assert again == earlier_bytes
    refused = set(violations(tmp_path / "server.log"))
    assert {("worker-asr", s) for s in SNIFFED} <= refused


def test_the_reply_prefix_follows_the_user(monkeypatch):
    from captionbus.core.bus import INBOX_PREFIX_ENV, BusError, inbox_prefix
    from captionbus.core.settings import Settings

    monkeypatch.delenv(INBOX_PREFIX_ENV, raising=False)
    assert inbox_prefix("nats://worker-asr:pw@10.0.0.5:4222,nats://10.0.0.6:4222", Settings()) == "_INBOX_worker-asr"
    assert inbox_prefix("tls://h1:4222", Settings(nats_user="gateway", nats_password="x")) == "_INBOX_gateway"
    assert inbox_prefix("nats://127.0.0.1:4222", Settings()) is None  # no user: nats-py's own _INBOX
    with pytest.raises(BusError, match=INBOX_PREFIX_ENV):
        inbox_prefix("nats://h1:4222", Settings(nats_user="ops.team", nats_password="x"))  # a dot splits tokens
    monkeypatch.setenv(INBOX_PREFIX_ENV, "_INBOX_worker")
    assert inbox_prefix("nats://h1:4222", Settings(nats_user="worker-gpu1", nats_password="x")) == "_INBOX_worker"
    monkeypatch.setenv(INBOX_PREFIX_ENV, "_INBOX.>")
    with pytest.raises(BusError, match="not a NATS subject prefix"):
        inbox_prefix("nats://h1:4222", Settings())
