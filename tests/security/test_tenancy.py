"""Issue 18, "no ordinary credential can read another job's data", between tenants on the bus.

Behind the auth callout a `client` login acts for one tenant, its user name
(captionbus.authcallout.tenant_permissions), and its jobs' subjects and keys carry the tenant as
a token (`captionbus.job.<tenant>.<job>.<kind>`, KV key `<tenant>.<job>`). Here, on a real
nats-server with the callout answering, the coordinator and a noop worker running, tenant
`client` completes a job, and a login of tenant `rival` tries every raw subject an attacker would
to list, read, follow, cancel, retry or re-submit it: each is refused by the server (logged as a
violation of user `rival`) or answered with nothing of `client`'s. Both tenants' own jobs still
go end to end through captionbus.client (submit, list, status, events, fetch)."""
from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from captionbus import client
from captionbus.client import acting_for
from captionbus.contracts import JobCancelRequested, JobRetryRequested, JobSubmitted, subjects
from captionbus.contracts.ids import new_job_id
from captionbus.core.artifacts import ArtifactMissing, ArtifactStore
from captionbus.core.artifacts.transfer import ObjectBucket
from tests.security.attacks import meta_subject
from tests.natsroles import violations
from tests.security.fleet import OUTPUT_BYTES, secured_fleet

KV = f"KV_{subjects.JOBS_BUCKET}"
PRE = f"$KV.{subjects.JOBS_BUCKET}"
EV = subjects.EVENTS_STREAM
OBJ, O = f"OBJ_{subjects.ARTIFACTS_BUCKET}", f"$O.{subjects.ARTIFACTS_BUCKET}"


async def answered(nc, subject: str, body: bytes = b"", timeout: float = 0.75) -> bytes | None:
    """What a request got back that carries data: a stored message (direct get), or an API
    answer that is not an error. None: refused (no reply: the server dropped the publish), or an
    error, or a 404."""
    try:
        msg = await nc.request(subject, body, timeout=timeout)
    except Exception:  # noqa: BLE001 - a timeout or no responders: nothing came back
        return None
    if msg.headers and msg.headers.get("Status"):  # direct get: 404 no message, 408 bad request
        return None
    if msg.headers and msg.headers.get("Nats-Subject"):
        return msg.data or b"(a message)"
    try:
        answer = json.loads(msg.data)
    except ValueError:
        return msg.data
    return None if "error" in answer else msg.data


def create(stream: str, filter_subject: str | None = None, **config) -> bytes:
    body = {"deliver_policy": "all", "ack_policy": "none", **config}
    if filter_subject:
        body["filter_subject"] = filter_subject
    return json.dumps({"stream_name": stream, "config": body}).encode()


def test_a_tenant_cannot_list_read_follow_cancel_or_retry_another_tenants_job(tmp_path):
    async def main():
        async with secured_fleet(tmp_path, callout=True) as fleet:
            victim, victim_bytes = await fleet.run_job("job-a")
            vid = victim.job_id
            key = subjects.job_key(vid)
            meta = meta_subject(victim.outputs["out"].key).replace(f"{O}.M.", f"{O}.M.client.")
            rival = fleet.nc["rival"]
            attempts = {
                # job state: by key in the body, by sequence, by another tenant's key in the subject,
                # by a wildcard key, and the listing stream info gives
                "msg get by key": (f"$JS.API.STREAM.MSG.GET.{KV}", json.dumps({"last_by_subj": f"{PRE}.{key}"})),
                "msg get by seq": (f"$JS.API.STREAM.MSG.GET.{KV}", json.dumps({"seq": 1})),
                "direct get of its key": (f"$JS.API.DIRECT.GET.{KV}.{PRE}.{key}", ""),
                "direct get, key in body": (f"$JS.API.DIRECT.GET.{KV}", json.dumps({"last_by_subj": f"{PRE}.{key}"})),
                "direct get by seq": (f"$JS.API.DIRECT.GET.{KV}", json.dumps({"seq": 1})),
                "direct get of any key": (f"$JS.API.DIRECT.GET.{KV}.{PRE}.>", ""),
                "direct get of its tenant": (f"$JS.API.DIRECT.GET.{KV}.{PRE}.client.>", ""),
                "kv stream info": (f"$JS.API.STREAM.INFO.{KV}", json.dumps({"subjects_filter": ">"})),
                "events stream info": (f"$JS.API.STREAM.INFO.{EV}", json.dumps({"subjects_filter": ">"})),
                "stream list": ("$JS.API.STREAM.LIST", "{}"),
                # listing and following through consumers: unfiltered, filtered to the victim, filtered
                # to its own tenant with another filter in the body (or several), the coordinator's
                "events consumer, unfiltered": (f"$JS.API.CONSUMER.CREATE.{EV}", create(EV, "captionbus.job.>")),
                "events consumer on the victim": (f"$JS.API.CONSUMER.CREATE.{EV}.x.{subjects.job_events(vid)}",
                                                  create(EV, subjects.job_events(vid), name="x")),
                "events consumer, body filter differs": (f"$JS.API.CONSUMER.CREATE.{EV}.y.captionbus.job.rival.>",
                                                         create(EV, "captionbus.job.>", name="y")),
                "events consumer, several filters": (f"$JS.API.CONSUMER.CREATE.{EV}.z.captionbus.job.rival.>",
                                                     create(EV, None, name="z", filter_subjects=["captionbus.job.>"])),
                "the coordinator's consumer": (
                    f"$JS.API.CONSUMER.CREATE.{EV}.{subjects.COORDINATOR_CONSUMER}.captionbus.job.rival.>",
                    create(EV, "captionbus.job.rival.>", name=subjects.COORDINATOR_CONSUMER,
                           durable_name=subjects.COORDINATOR_CONSUMER, ack_policy="explicit")),
                "legacy durable create": (f"$JS.API.CONSUMER.DURABLE.CREATE.{EV}.mine",
                                          create(EV, "captionbus.job.>", durable_name="mine")),
                "kv consumer, unfiltered": (f"$JS.API.CONSUMER.CREATE.{KV}", create(KV, f"{PRE}.>")),
                "kv consumer on the victim": (f"$JS.API.CONSUMER.CREATE.{KV}.k.{PRE}.{key}", create(KV, f"{PRE}.{key}", name="k")),
                "kv consumer on every key": (f"$JS.API.CONSUMER.CREATE.{KV}.w.{PRE}.>", create(KV, f"{PRE}.>", name="w")),
                # artifacts: the listing stream info gives, any message by sequence, the victim's
                # metadata by subject, consumers unfiltered, on its namespace, on every chunk by a
                # wildcard, and in its own namespace with every chunk in the body
                "object listing": (f"$JS.API.STREAM.INFO.{OBJ}", json.dumps({"subjects_filter": f"{O}.M.>"})),
                "object msg get by seq": (f"$JS.API.STREAM.MSG.GET.{OBJ}", json.dumps({"seq": 1})),
                "object meta by subject": (f"$JS.API.STREAM.MSG.GET.{OBJ}", json.dumps({"last_by_subj": meta})),
                "object direct get": (f"$JS.API.DIRECT.GET.{OBJ}.{meta}", ""),
                "object consumer, unfiltered": (f"$JS.API.CONSUMER.CREATE.{OBJ}", create(OBJ, f"{O}.>")),
                "object consumer on its namespace": (f"$JS.API.CONSUMER.CREATE.{OBJ}.o.{O}.C.client.>",
                                                     create(OBJ, f"{O}.C.client.>", name="o")),
                "object consumer, every chunk": (f"$JS.API.CONSUMER.CREATE.{OBJ}.p.{O}.C.*", create(OBJ, f"{O}.C.*", name="p")),
                "object consumer, every meta": (f"$JS.API.CONSUMER.CREATE.{OBJ}.q.{O}.M.>", create(OBJ, f"{O}.M.>", name="q")),
                "object consumer, body filter differs": (f"$JS.API.CONSUMER.CREATE.{OBJ}.r.{O}.C.rival.>",
                                                         create(OBJ, f"{O}.C.>", name="r")),
            }
            # All at once: each refused one waits out its 0.75 s for the reply that never comes
            # (one after the other they took 23 s of the test's 27).
            answers = await asyncio.gather(*(answered(rival, subject, body.encode() if isinstance(body, str) else body)
                                             for subject, body in attempts.values()))
            got = dict(zip(attempts, answers, strict=True))
            # plain subscriptions on the victim's events and record
            spied: list = []

            async def spy(msg):
                spied.append(msg.subject)

            for subject in ("captionbus.job.>", f"{PRE}.>", subjects.job_events(vid), "$O.cb_artifacts.>"):
                await rival.subscribe(subject, cb=spy)
            await rival.flush()
            # acting on it: cancel, retry, a second submit with its id, and the pre-tenant subjects
            rjs = rival.jetstream()
            acts = {
                "cancel": (subjects.job_event(vid, "cancel_requested"), JobCancelRequested(job_id=vid)),
                "retry": (subjects.job_event(vid, "retry_requested"), JobRetryRequested(job_id=vid)),
                "re-submit": (subjects.job_event(vid, "submitted"), JobSubmitted(job_id=vid, spec=victim.spec)),
                "cancel, no tenant": (f"captionbus.job.{vid}.cancel_requested", JobCancelRequested(job_id=vid)),
            }
            async def act(subject, event) -> str:
                try:
                    await rjs.publish(subject, event.model_dump_json().encode(), timeout=0.75)
                except Exception as error:  # noqa: BLE001
                    return type(error).__name__
                return "acked"

            acted = dict(zip(acts, await asyncio.gather(*(act(*a) for a in acts.values())), strict=True))
            # the same acts smuggled on subjects the rival may publish (its own jobs'): the server
            # stores them, the coordinator must not apply a body about another tenant's job
            planted = new_job_id("client")
            smuggled = {
                "retry on its own subject": (subjects.job_event(new_job_id("rival"), "retry_requested"),
                                             JobRetryRequested(job_id=vid)),
                "submit into the victim's tenant": (
                    subjects.job_event(new_job_id("rival"), "submitted"),
                    JobSubmitted(job_id=planted, spec=victim.spec.model_copy(update={"job_id": planted}))),
            }
            for subject, event in smuggled.values():
                await rjs.publish(subject, event.model_dump_json().encode(), timeout=2)
            # through captionbus.client as the rival tenant
            with acting_for("rival"):
                rivals_view = await client.list_jobs(rjs)
                # the victim's output by its key, through the artifact store as the rival's client
                store = client.artifacts_of(ArtifactStore(fleet.settings("rival", "rival-steal"), rjs), None)
                try:
                    stolen = (await store.get(victim.outputs["out"])).read_bytes()
                except ArtifactMissing as missing:
                    stolen = str(missing)
                own = await _own_job(fleet, rival)
            # a meta in its own namespace naming the victim's chunks (`client.<nuid>`): no reader follows it
            bucket = ObjectBucket(fleet.js["worker"])
            good = await bucket.scoped("client").info(victim.outputs["out"].key)
            await rjs.publish(meta.replace(".M.client.", ".M.rival."), json.dumps(good.as_dict()).encode(), timeout=2)
            pointed = await bucket.scoped("rival").info(victim.outputs["out"].key)
            await asyncio.sleep(1.0)  # a cancel that got through would have been applied by now
            with acting_for("client"):
                after = await client.job_state(fleet.js["client"], vid)
                listed = await client.list_jobs(fleet.js["client"])
                events = [e.kind async for e in client.follow(fleet.js["client"], vid)]
            again = await fleet.fetch(after)
            return (vid, got, spied, acted, rivals_view, own, after, listed, events, again, victim_bytes, stolen,
                    (good.nuid, pointed), planted)

    (vid, got, spied, acted, rivals_view, own, after, listed, events, again, victim_bytes, stolen, (nuid, pointed),
     planted) = \
        asyncio.run(asyncio.wait_for(main(), 150))
    assert nuid.startswith("client.") and pointed is None
    assert isinstance(stolen, str) and "not in" in stolen, stolen
    assert {name: data for name, data in got.items() if data is not None} == {}
    assert spied == []
    assert all(result != "acked" for result in acted.values()), acted
    # the rival sees its own job only, and it went end to end
    (own_id, own_state, own_events, own_bytes, own_input) = own
    assert [s.job_id for s in rivals_view] == [] and own_id.startswith("rival_")
    assert own_state.status.value == "completed" and own_events[0] == "submitted" and own_events[-1] == "completed"
    assert own_bytes["job.input"] == own_input
    # the victim's job is as it was, listed, followed and fetched by its tenant
    assert after.status.value == "completed" and after.error is None
    assert planted not in [s.job_id for s in listed]  # the smuggled submit made no job in its tenant
    assert events.count("started") == 1  # the smuggled retry did not restart it
    assert [s.job_id for s in listed] == [vid]
    assert events[0] == "submitted" and events[-1] == "completed" and "cancel_requested" not in events
    assert again == victim_bytes
    logged = violations(tmp_path / "server.log")
    refused = {s for user, s in logged if user == "rival"}
    for subject in ("$JS.API.STREAM.MSG.GET.KV_cb_jobs", f"$JS.API.DIRECT.GET.KV_cb_jobs.{PRE}.{subjects.job_key(vid)}",
                    f"$JS.API.STREAM.INFO.{KV}", f"$JS.API.CONSUMER.CREATE.{EV}", subjects.job_event(vid, "cancel_requested"),
                    "captionbus.job.>", f"{PRE}.>", f"$JS.API.STREAM.INFO.{OBJ}", f"$JS.API.STREAM.MSG.GET.{OBJ}",
                    f"$JS.API.CONSUMER.CREATE.{OBJ}", f"$JS.API.CONSUMER.CREATE.{OBJ}.p.{O}.C.*", "$O.cb_artifacts.>"):
        assert subject in refused, (subject, sorted(refused))
    # everyone else, the rival's own job included, ran without one refusal
    assert {user for user, _ in logged} <= {"rival"}, logged


async def _own_job(fleet, nc):
    """The rival tenant's own job through captionbus.client: submit, wait, follow, list, fetch."""
    import os

    js = nc.jetstream()
    media = fleet.tmp / "rival.wav"
    media.write_bytes(b"RIFF" + os.urandom(50_000))
    store = ArtifactStore(fleet.settings("rival", "rival-submit"), js)
    spec = await client.submit(js, store, media, workflow="made")
    events = [e.kind async for e in client.follow(js, spec.job_id)]
    # A reader resuming mid-history (SSE's Last-Event-ID, a webhook cursor) at a stage event first
    # reads the job's earlier terminal and `started` events, one consumer per kind's subject
    # (contracts.History, client._history_before): the tenant's login may, and gets the rest.
    read = [(seq, e.kind, e.event_id) async for seq, e in client.job_events(js, spec.job_id)]
    assert [kind for _, kind, _ in read[:3]] == ["submitted", "started", "stage_requested"], read
    assert [(seq, e.kind, e.event_id) async for seq, e in client.job_events(js, spec.job_id, read[1][0])] == read[2:]
    state = await client.job_state(js, spec.job_id)
    listed = [s.job_id for s in await client.list_jobs(js)]
    assert listed == [spec.job_id], listed
    fetch = client.artifacts_of(ArtifactStore(fleet.settings("rival", "rival-fetch"), js), spec.job_id)
    fetched = {name: (await fetch.get(ref)).read_bytes() for name, ref in {"job.input": state.spec.input, **state.outputs}.items()}
    return spec.job_id, state, events, fetched, media.read_bytes()


async def _cli(fleet, user: str, *args: str) -> tuple[int, str, str]:
    """`captionbus ARGS` as `user` behind the callout, the way a person runs it (a process of its
    own, NATS_URL with the user and password, CAPTIONBUS_NATS_AUTH_CALLOUT=1)."""
    import os
    import sys

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAPTIONBUS_NATS_")},
           "NATS_URL": fleet.urls[user], "CAPTIONBUS_NATS_AUTH_CALLOUT": "1",
           "CAPTIONBUS_HOME": str(fleet.tmp / f"cli-{user}"), "CAPTIONBUS_ARTIFACTS": "object",
           "CAPTIONBUS_CONFIG": str(_made_workflow(fleet.tmp))}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "captionbus", *args, env=env, cwd=fleet.tmp,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert b"Traceback" not in err, err.decode()
    return proc.returncode, out.decode(), err.decode()


def _made_workflow(tmp) -> Path:
    """A config folder with the fleet's `made` workflow (tests/security/fleet.py), for `submit -w made`."""
    config = tmp / "config"
    (config / "workflows").mkdir(parents=True, exist_ok=True)
    (config / "workflows" / "made.yaml").write_text(
        "name: made\nnodes:\n  noop:\n    inputs:\n      media: job.input\n    outputs: [out]\n"
        f"    params:\n      write_bytes: {OUTPUT_BYTES}\noutputs:\n  out: noop.out\n")
    return config


def test_the_cli_of_a_tenant_sees_and_acts_on_its_own_jobs_only(tmp_path):
    """The CLI as each tenant, against one completed job of tenant `client`: `jobs`, `status`,
    `events` and `fetch` work for its tenant (every read through the grants above, with no
    violation); for `rival` the job does not exist (`jobs` and `events` list nothing, `status`,
    `cancel` and `retry` say "no job", exit 2) and stays completed, while its own `submit --wait`
    uploads, follows and fetches in its namespace."""

    async def main():
        async with secured_fleet(tmp_path, callout=True) as fleet:
            victim, victim_bytes = await fleet.run_job("job-cli")
            vid = victim.job_id
            commands = {
                "own jobs": ("client", "jobs", "--json"),
                "own status": ("client", "status", vid, "--json"),
                "own events": ("client", "events", vid),
                "own fetch": ("client", "fetch", vid, "--out", str(tmp_path / "fetched")),
                "rival jobs": ("rival", "jobs", "--json"),
                "rival events": ("rival", "events"),
                "rival status": ("rival", "status", vid),
                "rival cancel": ("rival", "cancel", vid),
                "rival retry": ("rival", "retry", vid),
            }
            # These nine at once (each is a process importing the CLI: 34 s one after the other);
            # the rival's own submit after them, so its `jobs` and `events` cannot list that job.
            runs = dict(zip(commands, await asyncio.gather(*(_cli(fleet, *c) for c in commands.values())), strict=True))
            runs["rival submit --wait"] = await _cli(fleet, "rival", "submit", str(fleet.tmp / "job-cli.wav"), "-w", "made",
                                                     "--wait", "--out", str(tmp_path / "rival-out"))
            after = await fleet.wait(vid, "completed")
            return vid, runs, after, victim_bytes

    vid, runs, after, victim_bytes = asyncio.run(asyncio.wait_for(main(), 240))
    code, out, err = runs["own jobs"]
    assert code == 0 and [json.loads(line)["spec"]["job_id"] for line in out.splitlines()] == [vid], (out, err)
    code, out, _ = runs["own status"]
    assert code == 0 and json.loads(out)["status"] == "completed"
    code, out, _ = runs["own events"]
    kinds = [json.loads(line)["kind"] for line in out.splitlines()]
    assert code == 0 and kinds[0] == "submitted" and kinds[-1] == "completed", out
    code, out, _ = runs["own fetch"]
    assert code == 0 and len(out.splitlines()) == 1
    assert (tmp_path / "fetched").joinpath(out.splitlines()[0].rsplit("/", 1)[-1]).read_bytes() == victim_bytes["out"]
    code, out, err = runs["rival jobs"]
    assert code == 0 and out.strip() == "", (out, err)
    code, out, err = runs["rival events"]  # every event it may follow: its tenant's, none
    assert code == 0 and out.strip() == "", (out, err)
    for name in ("rival status", "rival cancel", "rival retry"):
        code, out, err = runs[name]
        assert code == 2 and f"no job {vid!r}" in err + out, (name, code, out, err)
    assert after.status.value == "completed"
    # the rival's own job, submitted, followed and fetched by `submit --wait` as its tenant
    code, out, err = runs["rival submit --wait"]
    assert code == 0, err[-2000:]
    fetched = [Path(line) for line in out.splitlines() if line.strip()]
    assert any(path.stat().st_size == OUTPUT_BYTES for path in fetched), out
    assert violations(tmp_path / "server.log") == []


def test_gc_sees_a_tenants_objects_as_objects_and_keeps_them_within_retention(tmp_path):
    """A tenant's artifacts live in its namespace of the object store (`$O.cb_artifacts.M.<tenant>.…`,
    chunks `…C.<tenant>.<nuid>`). gc, as the gc user, must read them as objects: inside retention it
    deletes nothing (their chunks are not "torn uploads" no object names) and the job fetches
    byte-identically after; past retention it deletes them like any job's, and nothing is torn."""
    from datetime import datetime, timezone

    from captionbus.core.gc import collect

    async def main():
        async with secured_fleet(tmp_path, callout=True) as fleet:
            state, before = await fleet.run_job("job-kept")
            gc = fleet.settings("gc", "gc")
            later = datetime.now(timezone.utc).timestamp() + 2 * 3600  # past the grace, inside retention
            kept = await collect(gc, fleet.js["gc"], now=later)
            after = await fleet.fetch(state)
            gone = await collect(gc, fleet.js["gc"], now=later + 60 * 86400)
            return state, before, kept, after, gone

    state, before, kept, after, gone = asyncio.run(asyncio.wait_for(main(), 120))
    assert state.job_id.startswith("client_")
    assert kept.object_store.count == 0 and kept.torn_uploads.count == 0, kept.summary()
    assert after == before
    assert gone.object_store.count == 2 and gone.torn_uploads.count == 0 and gone.job_records == 1, gone.summary()


def test_a_tenant_is_granted_no_worker_state_and_no_other_consumer(tmp_path):
    """Review of issue 18: tenants were granted `$SRV.>` (worker discovery) and CONSUMER.INFO /
    CONSUMER.DELETE by any name. While the worker runs tenant `client`'s job, its `$SRV.STATS`
    names that job (the trusted dashboard reads it here: what a tenant would have read), and a
    tenant knowing a consumer's name could delete another tenant's reader or read the
    coordinator's consumer. Now `rival` asks every `$SRV` subject raw and gets nothing (refused,
    logged), its delete of `client`'s object reader is refused and the reader still delivers,
    and the CLI's `workers` says a tenant cannot list them (exit 2) instead of listing none."""
    from captionbus.client import workers

    async def main():
        async with secured_fleet(tmp_path, callout=True) as fleet:
            await fleet.submit("job-busy", workflow="slow")  # the worker holds it for 6 s
            busy = fleet.job("job-busy")
            deadline = asyncio.get_running_loop().time() + 20
            while not any(c.get("job_id") == busy for w in await workers(fleet.nc["dashboard"], 0.5)
                          for c in w["state"].get("current") or []):
                assert asyncio.get_running_loop().time() < deadline, "the worker never showed the job"
            rival, name = fleet.nc["rival"], subjects.micro_service_name("noop")
            asked = {subject: await answered(rival, subject) for subject in (
                "$SRV.STATS", "$SRV.INFO", "$SRV.PING", f"$SRV.STATS.{name}", f"$SRV.INFO.{name}",
                f"$SRV.WORKER.{name}")}
            with acting_for("rival"):
                try:
                    listed = await workers(rival, 0.5)
                except client.NotForTenants as refusal:
                    listed = str(refusal)
            # a reader of tenant `client` (a consumer in its namespace, its name known to the attacker)
            probe = f"{O}.C.client.probe"
            cjs, got = fleet.js["client"], asyncio.Queue()
            inbox = fleet.nc["client"].new_inbox()
            await fleet.nc["client"].subscribe(inbox, cb=got.put)
            from nats.js.api import ConsumerConfig, DeliverPolicy
            await cjs.add_consumer(OBJ, ConsumerConfig(name="victim-reader", filter_subject=probe, deliver_subject=inbox,
                                                       deliver_policy=DeliverPolicy.NEW, inactive_threshold=60.0))
            consumers = {f"delete {what}": (f"$JS.API.CONSUMER.DELETE.{stream}.{consumer}", "")
                         for what, stream, consumer in (("the reader", OBJ, "victim-reader"),
                                                        ("the coordinator's", EV, subjects.COORDINATOR_CONSUMER))}
            consumers |= {f"info {what}": (f"$JS.API.CONSUMER.INFO.{stream}.{consumer}", "")
                          for what, stream, consumer in (("the reader", OBJ, "victim-reader"),
                                                         ("the coordinator's", EV, subjects.COORDINATOR_CONSUMER),
                                                         ("a kv reader", KV, "victim-reader"))}
            acted = {what: await answered(rival, subject, body.encode()) for what, (subject, body) in consumers.items()}
            await cjs.publish(probe, b"still here", timeout=2)
            delivered = None
            with contextlib.suppress(TimeoutError):
                delivered = (await asyncio.wait_for(got.get(), 5)).data
            runs = {"rival workers": await _cli(fleet, "rival", "workers", "--json"),
                    "dashboard workers": await _cli(fleet, "dashboard", "workers", "--json")}
            await fleet.wait("job-busy", "completed")
            return busy, asked, listed, acted, delivered, runs

    busy, asked, listed, acted, delivered, runs = asyncio.run(asyncio.wait_for(main(), 150))
    assert asked == dict.fromkeys(asked), asked  # not one answer
    assert isinstance(listed, str) and "cannot list the workers" in listed, listed
    assert acted == dict.fromkeys(acted), acted
    assert delivered == b"still here"  # the reader was not deleted
    code, out, err = runs["rival workers"]
    assert code == 2 and "cannot list the workers" in err and out.strip() == "", (code, out, err)
    code, out, err = runs["dashboard workers"]
    assert code == 0 and [w["metadata"]["stage"] for w in json.loads(out)] == ["noop"], (out, err)
    refused = {s for user, s in violations(tmp_path / "server.log") if user == "rival"}
    assert {"$SRV.STATS", "$SRV.PING", "$JS.API.CONSUMER.DELETE.OBJ_cb_artifacts.victim-reader",
            f"$JS.API.CONSUMER.INFO.{EV}.{subjects.COORDINATOR_CONSUMER}"} <= refused, sorted(refused)
    assert {user for user, _ in violations(tmp_path / "server.log")} == {"rival"}


def _inline_client_block(accounts: str, user: str) -> str:
    """accounts.conf text with `user`'s `permissions: $CLIENT` replaced by an inline copy of the
    CLIENT block of roles.conf (its publish grants in another order, its own reply prefix)."""
    from captionbus.authcallout import read_conf
    from tests.natsroles import NATS_DEPLOY

    block = read_conf(NATS_DEPLOY / "roles.conf")["CLIENT"]
    allow = ", ".join(f'"{s}"' for s in reversed(block["publish"]["allow"]))
    deny = ", ".join(f'"{s}"' for s in block["publish"]["deny"])
    inline = f'{{publish: {{allow: [{allow}], deny: [{deny}]}}, subscribe: {{allow: ["_INBOX_{user}.>"]}}}}'
    entry = f'{{user: "{user}", '
    head, _, tail = accounts.partition(entry)
    assert tail and "permissions: $CLIENT}" in tail.split("\n", 1)[0], accounts
    return head + entry + tail.replace("permissions: $CLIENT}", f"permissions: {inline}}}", 1)


def test_a_login_given_a_copy_of_the_client_block_is_held_to_its_tenant(tmp_path):
    """The callout decided a tenant by the block's identity (`permissions: $CLIENT`): a user given
    an inline copy of the block got it as written, the static client's rights, reading every job.
    Here `rival` has such a copy: the callout lets it in as tenant `rival`, the server says so
    (client_tenant), and its raw reads of `client`'s job (a listing, a read by key, an events
    consumer on every job) are refused."""
    from captionbus.core.bus import client_tenant

    async def main():
        async with secured_fleet(tmp_path, callout=True,
                                 accounts_edit=lambda text: _inline_client_block(text, "rival")) as fleet:
            victim, _ = await fleet.run_job("job-inline")
            key = subjects.job_key(victim.job_id)
            rival = fleet.nc["rival"]
            tenant = await client_tenant(rival, fleet.settings("rival", "rival-who"))
            attempts = {
                "kv listing": (f"$JS.API.CONSUMER.CREATE.{KV}", create(KV, f"{PRE}.>")),
                "msg get by key": (f"$JS.API.STREAM.MSG.GET.{KV}", json.dumps({"last_by_subj": f"{PRE}.{key}"})),
                "direct get by key": (f"$JS.API.DIRECT.GET.{KV}.{PRE}.{key}", ""),
                "kv stream info": (f"$JS.API.STREAM.INFO.{KV}", json.dumps({"subjects_filter": ">"})),
                "events consumer": (f"$JS.API.CONSUMER.CREATE.{EV}", create(EV, "captionbus.job.>")),
            }
            got = {name: await answered(rival, subject, body.encode() if isinstance(body, str) else body)
                   for name, (subject, body) in attempts.items()}
            granted = [g for g in fleet.callout.granted if g["user"] == "rival"]
            return tenant, got, granted

    tenant, got, granted = asyncio.run(asyncio.wait_for(main(), 120))
    assert tenant == "rival" and granted and all(g["tenant"] == "rival" for g in granted), granted
    assert got == dict.fromkeys(got), got
    refused = {s for user, s in violations(tmp_path / "server.log") if user == "rival"}
    assert {f"$JS.API.CONSUMER.CREATE.{KV}", f"$JS.API.STREAM.MSG.GET.{KV}", f"$JS.API.STREAM.INFO.{KV}"} <= refused


def test_the_tenant_a_login_acts_for_is_the_one_the_server_granted(tmp_path):
    """client_tenant took the tenant from the user name: `gateway` (a trusted role, named like a
    tenant) acted as tenant `gateway`, its `jobs` listing nothing. Now it asks the server what the
    login was granted: the trusted logins act for no tenant (their CLI lists `client`'s job), each
    tenant for itself."""
    from captionbus.core.bus import BusError, client_tenant, connect
    from captionbus.core.settings import Settings
    from tests.natsroles import CALLOUT_USER

    async def main():
        async with secured_fleet(tmp_path, callout=True) as fleet:
            victim, _ = await fleet.run_job("job-named")
            acts = {user: await client_tenant(fleet.nc[user], fleet.settings(user, f"who-{user}"))
                    for user in ("client", "rival", "gateway", "dashboard", "worker", "gc")}
            # the server answers with the asker's own permissions, whoever the request says it is from
            forged = json.loads((await fleet.nc["rival"].request(
                "$SYS.REQ.USER.INFO", b"", timeout=2,
                headers={"Nats-Request-Info": json.dumps({"acc": "$G", "user": "gateway"})})).data)["data"]
            # a login not granted the question (here the callout's own, a static user): an error, not "no tenant"
            unasked = await connect(fleet.urls[CALLOUT_USER], "unasked", Settings(nats_auth_callout=False))
            try:
                await client_tenant(unasked, Settings(nats_auth_callout=True))
                failed = None
            except BusError as error:
                failed = str(error)
            finally:
                await unasked.close()
            runs = {user: await _cli(fleet, user, "jobs", "--json") for user in ("gateway", "rival")}
            return victim.job_id, acts, forged, failed, runs

    vid, acts, forged, failed, runs = asyncio.run(asyncio.wait_for(main(), 120))
    assert forged["user"] == "rival" and "captionbus.job.rival.*.submitted" in forged["permissions"]["publish"]["allow"]
    assert failed and "cannot ask the server what this login may do" in failed, failed
    assert acts == {"client": "client", "rival": "rival", "gateway": None, "dashboard": None, "worker": None,
                    "gc": None}, acts
    code, out, err = runs["gateway"]
    assert code == 0 and [json.loads(line)["spec"]["job_id"] for line in out.splitlines()] == [vid], (out, err)
    code, out, err = runs["rival"]
    assert code == 0 and out.strip() == "", (out, err)
    logged = violations(tmp_path / "server.log")  # the unasked login's only (its question, its reply inbox)
    assert (CALLOUT_USER, "$SYS.REQ.USER.INFO") in logged and {user for user, _ in logged} == {CALLOUT_USER}, logged


def test_a_tenants_ordered_consumer_is_re_created_under_a_new_name(tmp_path):
    """nats-py re-creates an ordered consumer (a new inbox, from the next stream sequence) after a
    gap or a stalled heartbeat, while the old one may still exist; a tenant may create consumers
    only by name on the filtered-create subject (captionbus.core.tenancy.Named). Forced here through
    nats-py's own re-creation (`reset_ordered_consumer`, what its gap and heartbeat checks call):
    a Named follow of the tenant's events takes a new name and goes on with every event after the
    reset, with no refusal; the same follow under one fixed name is refused its re-creation (the
    server keeps the old consumer) and misses them, which is why Named exists."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from captionbus.core.tenancy import named

    async def follow_across_a_reset(js, config) -> tuple[list[str], str, str]:
        sub = await js.subscribe(subjects.tenant_events("rival"), ordered_consumer=True, config=config)
        seen: list[str] = []

        async def publish(n: int) -> None:
            for _ in range(n):
                job = new_job_id("rival")
                await js.publish(subjects.job_event(job, "cancel_requested"),
                                 JobCancelRequested(job_id=job).model_dump_json().encode(), timeout=2)

        async def read(n: int, timeout: float) -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while len(seen) < n:
                        seen.append((await sub.next_msg(timeout=None)).subject)

        try:
            await publish(2)
            await read(2, 5)
            before = sub._consumer
            jsi = sub._sub._jsi
            await jsi.reset_ordered_consumer(jsi._sseq + 1)
            await publish(2)
            await read(len(seen) + 2, 3)
            return seen, before, sub._consumer
        finally:
            await sub.unsubscribe()

    async def main():
        async with secured_fleet(tmp_path, callout=True, worker=False) as fleet:
            errors: list = []
            rival = fleet.nc["rival"]
            rival._error_cb = lambda e: _noted(errors, e)
            js = rival.jetstream()
            named_run = await follow_across_a_reset(js, named(ConsumerConfig(deliver_policy=DeliverPolicy.NEW)))
            fixed_run = await follow_across_a_reset(js, ConsumerConfig(name="one-name", deliver_policy=DeliverPolicy.NEW))
            return named_run, fixed_run, errors

    (seen, before, after), (fixed_seen, fixed_before, fixed_after), errors = asyncio.run(asyncio.wait_for(main(), 90))
    assert len(seen) == 4 and before != after, (seen, before, after)
    assert len(fixed_seen) == 2 and fixed_before == fixed_after == "one-name", fixed_seen
    # nats-py reports the refused re-creation: an update of the live consumer (measured, nats-server
    # 2.15.1: 10012 "deliver policy can not be updated")
    refusals = [(getattr(e, "err_code", None), getattr(e, "description", None)) for e in errors]
    assert [code for code, _ in refusals] == [10012], refusals
    assert violations(tmp_path / "server.log") == []


def test_a_tenants_reader_goes_on_after_its_consumer_is_deleted(tmp_path):
    """The real trigger of a re-creation: the server stops heartbeats (here the reader's consumer is
    deleted, by the worker, a role that may delete object-store consumers). nats-py's activity
    check re-creates it after two missed heartbeats, from the next stream sequence, under a new
    Named name on the filtered-create subject a tenant is granted: the tenant's reader gets the
    message published after the delete, with no refusal logged."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from captionbus.core.tenancy import named

    async def main():
        async with secured_fleet(tmp_path, callout=True, worker=False) as fleet:
            js, subject = fleet.js["rival"], f"{O}.C.rival.recreated"
            sub = await js.subscribe(subject, stream=OBJ, ordered_consumer=True, idle_heartbeat=0.5,
                                     config=named(ConsumerConfig(deliver_policy=DeliverPolicy.NEW)))
            try:
                await js.publish(subject, b"one", timeout=2)
                first = (await sub.next_msg(timeout=5)).data
                before = sub._consumer
                await fleet.js["worker"].delete_consumer(OBJ, before)
                await asyncio.sleep(2.5)  # two missed heartbeats (1 s), then the re-creation
                await js.publish(subject, b"two", timeout=2)
                second = (await sub.next_msg(timeout=5)).data
                return first, second, before, sub._consumer
            finally:
                await sub.unsubscribe()

    first, second, before, after = asyncio.run(asyncio.wait_for(main(), 60))
    assert (first, second) == (b"one", b"two") and before != after, (before, after)
    assert violations(tmp_path / "server.log") == []


async def _noted(errors: list, error: Exception) -> None:
    errors.append(error)


def test_a_tenant_reads_its_own_jobs_parts_under_its_own_keys_and_no_one_elses(tmp_path, monkeypatch):
    """A job's record is a head plus parts under keys of their own (subjects.job_part_key, written
    by the coordinator): each completed node, and a node's speaker summary. The job's tenant
    reads them through captionbus.client as it reads the record (client.job_state: the whole
    record; with_record_parts: with the summary); another tenant cannot read any of them, nor
    the parts of a job of no tenant (under `_`, which no tenant is; `<job>.<part>` would have lain
    under a tenant named like that job's id). The tenant's listing of its jobs reads its records'
    keys only (a consumer filtered to `$KV.cb_jobs.<tenant>.*`, which the callout's grant of
    `<tenant>.>` lets it create), not a message per part (before, review of 5ae3b0d: every part
    of every job of the tenant's, ~250 for a 2-hour film)."""
    from captionbus.contracts import JobSpec, JobState, NodeState, NodeStatus
    from captionbus.core import tenancy

    held, listings = tenancy.held, []

    async def counted(js, stream, subject, **kw):
        msgs, count = await held(js, stream, subject, **kw)
        listings.append((subject, [m.subject for m in msgs]))
        return msgs, count

    monkeypatch.setattr(tenancy, "held", counted)
    from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns, TurnSummary

    summary = TurnSummary.of(SpeakerTurns(duration=9, speakers=["Anna"], turns=[SpeakerTurn(start=1, end=4, speaker="Anna")]))
    turns = summary.model_dump_json().encode()

    def state_of(job_id: str) -> tuple[JobState, dict[str, bytes]]:
        """The record as the coordinator writes it, and its parts (key -> bytes)."""
        node = NodeState(stage="diarization", status=NodeStatus.completed, attempt=1,
                         worker={"worker_id": "gpu-1/diarization/0/9", "env": "diarization"},
                         speaker_turns_key=subjects.job_part_key(job_id, subjects.part_name(turns)))
        node.part = subjects.part_name(node.stored())
        state = JobState(spec=JobSpec(job_id=job_id, input={"key": "a" * 64, "name": "film.wav", "size": 1}),
                         nodes={"diarization": node})
        return state, {node.speaker_turns_key: turns, subjects.job_part_key(job_id, node.part): node.stored()}

    async def main():
        async with secured_fleet(tmp_path, worker=False, callout=True) as fleet:
            (ours, our_parts), (plain, plain_parts) = state_of(new_job_id("client")), state_of("j19a3c5e7f01-4b2d9e6a")
            kv = await fleet.js["coordinator"].key_value(subjects.JOBS_BUCKET)
            for state, parts in ((ours, our_parts), (plain, plain_parts)):
                for key, value in parts.items():
                    await kv.put(key, value)
                await kv.put(subjects.job_key(state.job_id), state.stored())
            with acting_for("client"):
                whole = await client.job_state(fleet.js["client"], ours.job_id)
                read = await client.speaker_turns(fleet.js["client"], whole, "diarization")
                shown = await client.with_record_parts(fleet.js["client"], whole)
                head = await client.job_head(fleet.js["client"], ours.job_id)
                listings.clear()
                listed = await client.list_jobs(fleet.js["client"], whole=False)
            tried = {f"{name} {key.rpartition('.')[2][:4]}": await answered(fleet.nc[user], f"$JS.API.DIRECT.GET.{KV}.{PRE}.{key}")
                     for name, user, keys in [("rival, the tenant's", "rival", our_parts),
                                              ("rival, no tenant's", "rival", plain_parts),
                                              ("client, no tenant's", "client", plain_parts)] for key in keys}
            return whole, read, shown, head, tried, listed

    whole, read, shown, head, tried, listed = asyncio.run(asyncio.wait_for(main(), 120))
    assert [s.job_id for s in listed] == [whole.job_id] and not listed[0].whole
    assert listings == [(f"{PRE}.client.*", [f"{PRE}.{subjects.job_key(whole.job_id)}"])], listings
    assert not head.whole and head.parts == {"diarization": whole.nodes["diarization"].part}
    assert whole.nodes["diarization"].worker["worker_id"] == "gpu-1/diarization/0/9"
    assert read == summary and shown.nodes["diarization"].speaker_turns == summary
    assert len(tried) == 6 and tried == {name: None for name in tried}
    refused = {s for user, s in violations(tmp_path / "server.log")}
    assert any(s.startswith(f"$JS.API.DIRECT.GET.{KV}.{PRE}._.j19a3c5e7f01-4b2d9e6a.") for s in refused), refused
