"""Issue 9's least-privilege leftovers and GC, under exactly the users of deploy/nats/roles.conf:
the gc user collects and nobody else may purge; `submit --wait` as a client; a local artifact
root serves nobody what the bus refuses them; a per-stage worker user (WORKER_ASR) takes and
reports for its own stage only."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from captionbus.contracts import JobSpec, JobState, JobStatus, JobSubmitted, NodeState, NodeStatus, StageCompleted, subjects
from captionbus.coordinator.decide import Policy
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import Coordinator
from captionbus.core.artifacts import ArtifactError, ArtifactStore
from captionbus.core.bus import StagePolicy, connect, ensure_stage_consumer, provision, publish_event, record_keys
from captionbus.core.gc import collect
from captionbus.core.settings import Settings
from captionbus.services.noop.stage import STAGE as NOOP
from captionbus.services.runtime.serve import serve
from tests.natsroles import denied as _denied
from tests.natsroles import role_variables, roles_server, violations

REPO = Path(__file__).resolve().parents[2]
DAY = 24 * 3600.0


async def _start_worker(definition, settings, url, **kw):
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(definition, settings, url, env_name="roles", stop=stop, ready=ready,
                                     policy=StagePolicy(ack_wait=2.0, max_deliver=3), **kw))
    await asyncio.wait({task, asyncio.ensure_future(ready.wait())}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    return stop, task


def test_gc_collects_as_the_gc_user_and_no_other_user_may_purge(tmp_path):
    users = {"coordinator": "COORDINATOR", "worker": "WORKER", "client": "CLIENT", "dashboard": "DASHBOARD", "gc": "GC"}
    with roles_server(tmp_path, users) as (urls, log):

        async def main():
            nc = {u: await connect(urls[u], f"roles-{u}") for u in users}
            js = {u: c.jetstream() for u, c in nc.items()}
            await provision(js["coordinator"])
            client_settings = Settings(home=tmp_path / "client", nats_url=urls["client"], artifacts_mode="object")
            media = tmp_path / "in.wav"
            media.write_bytes(os.urandom(400_000))
            ref = await ArtifactStore(client_settings, js["client"]).put(media)  # no job refers to it
            await publish_event(js["client"], JobSubmitted(job_id="job-x", spec=JobSpec(job_id="job-x", input=ref)))
            cache = await js["worker"].key_value(subjects.STAGE_CACHE_BUCKET)
            await cache.put("c" * 64, json.dumps({"outputs": {}}).encode())
            # A finished job's record and the part of its completed node, as the coordinator writes
            # them, and a part whose record is gone.
            jobs = await js["coordinator"].key_value(subjects.JOBS_BUCKET)
            node = NodeState(stage="noop", status=NodeStatus.completed, attempt=1)
            node.part = subjects.part_name(node.stored())
            await jobs.put(subjects.job_part_key("job-old", node.part), node.stored())
            await jobs.put("job-old", JobState(spec=JobSpec(job_id="job-old", input=ref), status=JobStatus.completed,
                                               nodes={"noop": node}).stored())
            await jobs.put(subjects.job_part_key("job-gone", subjects.part_name(b"{}")), b"{}")
            stream = f"OBJ_{subjects.ARTIFACTS_BUCKET}"
            before = len(violations(log))

            # Every other user is refused the deletes GC makes.
            chunk_filter = f"$O.{subjects.ARTIFACTS_BUCKET}.C.>"
            for user in ("coordinator", "worker", "client", "dashboard"):
                assert await _denied(js[user].purge_stream(stream, subject=chunk_filter)), user
                assert await _denied(js[user].purge_stream(subjects.EVENTS_STREAM, subject=subjects.job_events("job-x"))), user
                assert await _denied(js[user].purge_stream(f"KV_{subjects.JOBS_BUCKET}", subject="$KV.cb_jobs._.job-old.>")), user
            for user in ("worker", "client", "dashboard"):
                assert await _denied((await js[user].key_value(subjects.JOBS_BUCKET)).purge("job-x")), user
            assert (await js["gc"].stream_info(stream)).state.bytes >= ref.size
            refused = len(violations(log)) - before

            # The gc user: a dry run, then the real run a month on, with no violation.
            gc_settings = Settings(home=tmp_path / "gc", nats_url=urls["gc"], artifacts_mode="object")
            later = datetime.now(timezone.utc).timestamp() + 40 * DAY
            dry = await collect(gc_settings, js["gc"], dry_run=True, now=later)
            assert dry.object_store.count == 1 and dry.cache_entries == 1
            report = await collect(gc_settings, js["gc"], now=later)
            assert report.object_store == dry.object_store and report.object_store.bytes == ref.size
            assert report.cache_entries == 1
            assert report.object_store_bytes_after <= report.object_store_bytes_before - ref.size
            assert (await js["gc"].stream_info(subjects.EVENTS_STREAM)).state.messages == 1  # job-x has no record
            # job-old's record with its part (a purge filtered on its part keys), job-gone's part
            assert (report.job_records, report.orphan_parts) == (1, 1)
            assert subjects.is_job_key("job-old") and not await record_keys(js["gc"])
            held = await js["gc"].stream_info(f"KV_{subjects.JOBS_BUCKET}", subjects_filter=">")
            assert set(held.state.subjects or {}) == {"$KV.cb_jobs.job-old"}  # its purge marker only
            for c in nc.values():
                await c.close()
            return before, refused

        before, refused = asyncio.run(asyncio.wait_for(main(), 90))
        seen = violations(log)
        assert refused >= 10
        assert [v for v in seen[before:] if v[0] == "gc"] == []


def test_submit_wait_as_the_client_user(tmp_path):
    users = {"coordinator": "COORDINATOR", "worker": "WORKER", "client": "CLIENT"}
    config = tmp_path / "config"
    (config / "workflows").mkdir(parents=True)
    (config / "workflows" / "passthrough.yaml").write_text(
        "name: passthrough\ndescription: the input, through a noop stage\n"
        "nodes:\n  noop:\n    inputs:\n      media: job.input\n    outputs: [media]\n"
        "outputs:\n  media: noop.media\n")
    graphs = {"passthrough": Workflow.from_dict(
        {"name": "passthrough", "nodes": {"noop": {"inputs": {"media": "job.input"}, "outputs": ["media"]}},
         "outputs": {"media": "noop.media"}})}
    media = tmp_path / "talk.wav"
    media.write_bytes(b"RIFF" + os.urandom(200_000))
    with roles_server(tmp_path, users) as (urls, log):

        async def main():
            nc = await connect(urls["coordinator"], "roles-coordinator")
            await provision(nc.jetstream())
            async with Coordinator(nc, graphs=graphs, tick_interval_s=0.2, policy=Policy(result_secret=b"s")):
                stop, worker = await _start_worker(
                    NOOP, Settings(home=tmp_path / "worker", nats_url=urls["worker"], artifacts_mode="object"),
                    urls["worker"])
                env = {**os.environ, "NATS_URL": urls["client"], "CAPTIONBUS_HOME": str(tmp_path / "client"),
                       "CAPTIONBUS_CONFIG": str(config), "PYTHONPATH": str(REPO)}
                cli = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "captionbus", "submit", str(media), "-w", "passthrough", "--wait",
                    "--out", str(tmp_path / "out"), env=env, cwd=tmp_path,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(cli.communicate(), 120)
                stop.set()
                await asyncio.wait_for(worker, 15)
            await nc.close()
            return cli.returncode, out.decode(), err.decode()

        code, out, err = asyncio.run(asyncio.wait_for(main(), 180))
        assert code == 0, err[-2000:]
        printed = {Path(line).name: Path(line) for line in out.splitlines() if line.strip()}
        assert sorted(printed) == ["talk.job.json", "talk.media.wav"], out
        assert printed["talk.media.wav"].read_bytes() == media.read_bytes()  # fetched under the client role
        assert json.loads(printed["talk.job.json"].read_text())["status"] == "completed"
        assert violations(log) == [], "submit --wait under the client role hit permission violations"


def test_local_root_serves_only_what_the_bus_user_may_read(tmp_path):
    users = {"coordinator": "COORDINATOR", "client": "CLIENT", "dashboard": "DASHBOARD"}
    with roles_server(tmp_path, users) as (urls, log):

        async def main():
            nc = {u: await connect(urls[u], f"roles-{u}") for u in users}
            await provision(nc["coordinator"].jetstream())
            home = tmp_path / "shared-home"  # one host: the client's fetches fill this root
            media = tmp_path / "in.wav"
            media.write_bytes(os.urandom(150_000))
            client = ArtifactStore(Settings(home=home, nats_url=urls["client"], artifacts_mode="object"),
                                   nc["client"].jetstream())
            ref = await client.put(media)
            assert client.local_path(ref) is not None  # the root holds it
            assert (await client.get(ref)).read_bytes() == media.read_bytes()
            dashboard = ArtifactStore(Settings(home=home, nats_url=urls["dashboard"], artifacts_mode="object"),
                                      nc["dashboard"].jetstream())
            assert dashboard.local_path(ref) is not None  # the bytes are right there ...
            with pytest.raises(ArtifactError, match="may not read the artifact store"):
                await dashboard.get(ref)  # ... and still not served
            with pytest.raises(ArtifactError, match="may not read the artifact store"):
                await dashboard.get(ref, dest_dir=tmp_path / "dash-out")
            assert not (tmp_path / "dash-out").exists()
            for c in nc.values():
                await c.close()

        asyncio.run(asyncio.wait_for(main(), 60))
        assert {user for user, _ in violations(log)} == {"dashboard"}


def test_a_stage_worker_user_takes_and_reports_for_its_own_stage_only(tmp_path):
    """WORKER_ASR (roles.conf) serves asr; it cannot see, pull or create another stage's
    consumer, so it never holds a demux request's token, and its forged demux result is refused;
    it cannot write a demux stage-cache entry either."""
    users = {"coordinator": "COORDINATOR", "client": "CLIENT", "worker": "WORKER", "worker-asr": "WORKER_ASR"}
    graphs = {"two": Workflow.from_dict({
        "name": "two",
        "nodes": {"asr": {"inputs": {"media": "job.input"}, "outputs": ["media"]},
                  "demux": {"inputs": {"media": "asr.media"}, "outputs": ["media"]}},
        "outputs": {"media": "demux.media"}})}
    asr_stage = replace(NOOP, name="asr")  # noop's pass-through, under the asr stage's name
    demux_stage = replace(NOOP, name="demux")
    with roles_server(tmp_path, users) as (urls, log):

        async def main():
            nc = {u: await connect(urls[u], f"roles-{u}") for u in users}
            js = {u: c.jetstream() for u, c in nc.items()}
            await provision(js["coordinator"])
            await ensure_stage_consumer(js["worker"], "demux", StagePolicy(ack_wait=2.0, max_deliver=3))
            from captionbus.client import job_state, submit

            async with Coordinator(nc["coordinator"], graphs=graphs, tick_interval_s=0.2,
                                   policy=Policy(result_secret=b"per-stage")):
                stop_asr, asr_worker = await _start_worker(
                    asr_stage, Settings(home=tmp_path / "asr", nats_url=urls["worker-asr"], artifacts_mode="object"),
                    urls["worker-asr"])
                media = tmp_path / "in.wav"
                media.write_bytes(os.urandom(100_000))
                client_store = ArtifactStore(Settings(home=tmp_path / "client", nats_url=urls["client"],
                                                      artifacts_mode="object"), js["client"])
                await submit(js["client"], client_store, media, workflow="two", job_id="job-two")
                deadline = time.monotonic() + 30
                while ((state := await job_state(js["client"], "job-two")) is None
                       or state.nodes["demux"].status.value != "requested"):
                    assert time.monotonic() < deadline, state
                    await asyncio.sleep(0.1)
                assert state.nodes["asr"].status.value == "completed"  # served by worker-asr
                allowed = len(violations(log))

                # Another stage's requests: no consumer info, no pull, no consumer of its own.
                assert await _denied(js["worker-asr"].consumer_info(subjects.REQUESTS_STREAM, "stage-demux"))
                assert await _denied(js["worker-asr"].add_consumer(
                    subjects.REQUESTS_STREAM, durable_name="stage-demux2", filter_subject="captionbus.req.demux"))
                sub = await js["worker-asr"].pull_subscribe_bind(durable="stage-demux", stream=subjects.REQUESTS_STREAM)
                assert await _denied(sub.fetch(1, timeout=0.5))
                # Nor plant a stage-cache entry a demux worker would answer from (keys lead with
                # the stage: captionbus/services/runtime/cache.py); its own stage's entries it may write.
                cache_kv = await js["worker-asr"].key_value(subjects.STAGE_CACHE_BUCKET)
                assert await _denied(cache_kv.put("demux." + "0" * 64, b'{"outputs": {}}'))
                assert await cache_kv.put("asr." + "0" * 64, b'{"outputs": {}}')
                with_refusals = len(violations(log))
                # Reporting for it: the result subject is open to every worker, but without the
                # demux request's token the coordinator does not apply it.
                forged = StageCompleted(job_id="job-two", stage="demux", node="demux", attempt=1,
                                        outputs=state.nodes["asr"].outputs, token="0" * 32)
                await publish_event(js["worker-asr"], forged)
                await asyncio.sleep(1.5)
                state = await job_state(js["client"], "job-two")
                assert state.status.value == "running" and state.nodes["demux"].status.value == "requested"
                # The demux request is still there for its own workers: the job completes.
                stop_demux, demux_worker = await _start_worker(
                    demux_stage, Settings(home=tmp_path / "demux", nats_url=urls["worker"], artifacts_mode="object"),
                    urls["worker"])
                deadline = time.monotonic() + 30
                while (state := await job_state(js["client"], "job-two")).status.value != "completed":
                    assert time.monotonic() < deadline, state
                    await asyncio.sleep(0.1)
                for stop, task in ((stop_asr, asr_worker), (stop_demux, demux_worker)):
                    stop.set()
                    await asyncio.wait_for(task, 15)
            for c in nc.values():
                await c.close()
            return allowed, with_refusals

        allowed, with_refusals = asyncio.run(asyncio.wait_for(main(), 120))
        seen = violations(log)
        assert seen[:allowed] == [], f"the per-stage worker's own flow hit violations: {seen[:allowed]}"
        refused = seen[allowed:with_refusals]
        assert refused and {user for user, _ in refused} == {"worker-asr"}
        assert all("stage-demux" in subject or "demux" in subject for _, subject in refused), refused


def test_only_the_coordinator_may_consume_partitions_or_hold_their_leases(tmp_path):
    """Job ownership's objects (the partition consumers `coordinator-p<N>` on CB_EVENTS, KV
    cb_coordinators) are the coordinator role's alone: a worker, client or dashboard that could
    consume a partition could ack its events away from the coordinators, one that could create or
    update its consumer could rewrite its filter (the partition's events then reach no
    coordinator), one that could write a lease could keep a partition from every coordinator.
    Each way in is tried: the durable create, the named create, the unnamed create the client
    and dashboard roles are granted (the name in the body), a pull of the coordinator's consumer,
    its info, a lease write. Each is refused; the coordinator role may do each."""
    from captionbus.coordinator.service import partition_consumer_config

    # every role but the coordinator's (roles.conf's blocks), each user named after its block
    users = {variable.lower().replace("_", "-"): variable for variable in role_variables()}
    attackers = [user for user, variable in users.items() if variable != "COORDINATOR"]
    with roles_server(tmp_path, users) as (urls, log):

        async def main():
            nc = {u: await connect(urls[u], f"roles-{u}") for u in users}
            js = {u: c.jetstream() for u, c in nc.items()}
            await provision(js["coordinator"])
            await js["coordinator"].add_consumer(subjects.EVENTS_STREAM, partition_consumer_config(0))
            await publish_event(js["coordinator"], JobSubmitted(job_id="victim", spec=JobSpec(
                job_id="victim", workflow="noop", input={"key": "0" * 64, "name": "in.mp4", "size": 1})))
            victim = subjects.job_partition("victim")
            await js["coordinator"].add_consumer(subjects.EVENTS_STREAM, partition_consumer_config(victim))
            bucket = subjects.COORDINATORS_BUCKET
            lease = f"$KV.{bucket}.{subjects.partition_lease_key(0)}"
            await js["coordinator"].publish(lease, b"coordinator-x")  # the bucket's stream exists
            hijack = replace(partition_consumer_config(victim), filter_subjects=None,
                             filter_subject=f"{subjects.PREFIX}.job.nobody.>")

            async def attack(user: str) -> None:
                j, c = js[user], nc[user]
                assert await _denied(j.add_consumer(subjects.EVENTS_STREAM, partition_consumer_config(1))), user
                assert await _denied(j.add_consumer(subjects.EVENTS_STREAM, replace(
                    hijack, durable_name=None, name=subjects.partition_consumer(victim)))), user
                # the unnamed create, the coordinator's name in the body (the name is in no
                # subject permissions can see): refused to every role now, not only made harmless
                for body in ({"durable_name": subjects.partition_consumer(victim)},
                             {"name": subjects.partition_consumer(victim)}):
                    raw = json.dumps({"stream_name": subjects.EVENTS_STREAM, "config": {
                        **body, "filter_subject": f"{subjects.PREFIX}.job.nobody.>", "ack_policy": "explicit"}})
                    assert await _denied(c.request(f"$JS.API.CONSUMER.CREATE.{subjects.EVENTS_STREAM}",
                                                   raw.encode(), timeout=0.75)), (user, body)
                assert await _denied(j.pull_subscribe_bind(
                    durable=subjects.partition_consumer(victim), stream=subjects.EVENTS_STREAM)) or \
                    await _denied(_pull_one(j, victim)), user
                assert await _denied(j.consumer_info(subjects.EVENTS_STREAM, subjects.partition_consumer(victim))), user
                # the leases: a lease, a member key (fake members shrink each coordinator's share),
                # a purge of the bucket, a read of it
                assert await _denied(j.publish(lease, user.encode())), user
                assert await _denied(j.publish(f"$KV.{bucket}.member.{user}", b"{}")), user
                assert await _denied(c.request(f"$JS.API.STREAM.PURGE.KV_{bucket}", b"{}", timeout=0.75)), user
                assert await _denied(c.request(f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}."
                                               f"{subjects.partition_lease_key(0)}", b"", timeout=0.75)), user

            await asyncio.gather(*(attack(user) for user in attackers))
            # the coordinator's consumer is as it made it, and still holds the victim's event
            info = await js["coordinator"].consumer_info(subjects.EVENTS_STREAM, subjects.partition_consumer(victim))
            assert info.config.filter_subjects == subjects.partition_filters(victim), info.config
            assert info.num_pending == 1
            sub = await js["coordinator"].pull_subscribe_bind(
                durable=subjects.partition_consumer(victim), stream=subjects.EVENTS_STREAM)
            [msg] = await sub.fetch(1, timeout=5)
            assert msg.subject == subjects.job_event("victim", "submitted")
            await js["coordinator"].publish(lease, b"coordinator-x")
            for c in nc.values():
                await c.close()

        asyncio.run(asyncio.wait_for(main(), 90))
        assert {v[0] for v in violations(log)} == set(attackers)


async def _pull_one(js, partition: int):
    sub = await js.pull_subscribe_bind(durable=subjects.partition_consumer(partition), stream=subjects.EVENTS_STREAM)
    return await sub.fetch(1, timeout=0.5)
