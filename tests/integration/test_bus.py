import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig

from captionbus.server import _free_port, nats_server_binary
from captionbus.contracts import subjects
from captionbus.core.bus import (
    BusError,
    StagePolicy,
    connect,
    effective_policy,
    ensure_stage_consumer,
    ensure_stage_consumer_info,
    provision,
    require_provisioned,
)
from tests.natsroles import denied as _denied
from tests.natsroles import roles_server, violations


def test_provision_is_idempotent_and_creates_everything(nats_server):
    async def main():
        nc = await connect(nats_server, "test")
        js = nc.jetstream()
        await provision(js)
        await provision(js)  # a second process doing the same must not fail
        names = {s.config.name for s in await js.streams_info()}
        assert {subjects.REQUESTS_STREAM, subjects.EVENTS_STREAM} <= names
        kv = await js.key_value(subjects.JOBS_BUCKET)
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"
        await js.object_store(subjects.ARTIFACTS_BUCKET)
        durable = await ensure_stage_consumer(js, "demux", StagePolicy())
        durable2 = await ensure_stage_consumer(js, "demux", StagePolicy())
        assert durable == durable2 == "stage-demux"
        await nc.close()

    asyncio.run(main())


def test_provision_keeps_existing_streams_and_buckets_as_they_are(nats_server):
    """Streams made by someone else (an operator, an older version, another replica count) are
    used as they are: only missing subjects are added, nothing else changes, nothing fails."""
    async def main():
        nc = await connect(nats_server, "test")
        js = nc.jetstream()
        await js.add_stream(StreamConfig(
            name=subjects.REQUESTS_STREAM, subjects=["ops.only"], retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE, description="made by ops", max_age=3600.0, num_replicas=1,
        ))
        await js.add_stream(StreamConfig(
            name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_WILDCARD], storage=StorageType.FILE,
            description="made by ops", max_age=7200.0, num_replicas=1,
        ))
        await js.create_key_value(KeyValueConfig(bucket=subjects.JOBS_BUCKET, history=12, description="ops"))
        await js.create_object_store(subjects.ARTIFACTS_BUCKET)
        await provision(js, replicas=1)
        await provision(js, replicas=1)
        requests = (await js.stream_info(subjects.REQUESTS_STREAM)).config
        assert requests.description == "made by ops" and requests.max_age == 3600.0
        assert requests.subjects == ["ops.only", subjects.REQUESTS_WILDCARD]  # the missing one added
        events = (await js.stream_info(subjects.EVENTS_STREAM)).config
        assert events.description == "made by ops" and events.max_age == 7200.0
        kv = (await js.stream_info(f"KV_{subjects.JOBS_BUCKET}")).config
        assert kv.max_msgs_per_subject == 12 and kv.description == "ops"  # not history=5: bound, kept
        await require_provisioned(js)
        await nc.close()

    asyncio.run(main())


def test_require_provisioned_names_the_missing_stream_and_creates_nothing(nats_server):
    async def main():
        nc = await connect(nats_server, "test")
        js = nc.jetstream()
        with pytest.raises(BusError) as missing:
            await require_provisioned(js)
        assert str(missing.value) == (
            "stream CB_REQUESTS missing: start the coordinator or `captionbus up` first"
        )
        assert await js.streams_info() == []
        await provision(js)
        await require_provisioned(js)
        await nc.close()

    asyncio.run(main())


def test_stage_consumer_is_created_once_and_never_updated(nats_server):
    async def main():
        nc = await connect(nats_server, "test")
        js = nc.jetstream()
        await provision(js)
        first = await ensure_stage_consumer_info(js, "asr", StagePolicy(ack_wait=4.0, max_deliver=2))
        second = await ensure_stage_consumer_info(js, "asr", StagePolicy(ack_wait=60.0, max_deliver=9))
        assert first.name == second.name == "stage-asr"
        stored = await js.consumer_info(subjects.REQUESTS_STREAM, "stage-asr")
        assert (stored.config.ack_wait, stored.config.max_deliver) == (4.0, 2)
        assert (effective_policy(second).ack_wait, effective_policy(second).max_deliver) == (4.0, 2)
        await nc.close()

    asyncio.run(main())


@pytest.fixture
def nats_cluster(tmp_path):
    """Three JetStream nodes on loopback; yields the client URL of the first."""
    # Six distinct ports: hold all the sockets open while picking, or two picks may coincide.
    held = [socket.socket() for _ in range(6)]
    for sock in held:
        sock.bind(("127.0.0.1", 0))
    numbers = [sock.getsockname()[1] for sock in held]
    for sock in held:
        sock.close()
    ports = list(zip(numbers[:3], numbers[3:]))
    routes = ",".join(f"nats://127.0.0.1:{c}" for _, c in ports)
    procs = []
    for i, (port, cport) in enumerate(ports):
        log = open(tmp_path / f"n{i}.log", "wb")
        procs.append(subprocess.Popen(
            [nats_server_binary(), "-js", "-sd", str(tmp_path / f"n{i}"), "-a", "127.0.0.1", "-p", str(port),
             "--server_name", f"n{i}", "--cluster_name", "cb", "--cluster", f"nats://127.0.0.1:{cport}",
             "--routes", routes],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        ))
    try:
        deadline = time.monotonic() + 30
        for i, ((port, _), proc) in enumerate(zip(ports, procs)):
            while True:
                assert proc.poll() is None, (tmp_path / f"n{i}.log").read_text()[-2000:]
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"cluster node n{i} never listened"
                    time.sleep(0.1)
        yield f"nats://127.0.0.1:{ports[0][0]}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def _until_meta_leader(js, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await js.account_info()
            await js.add_stream(StreamConfig(name="PROBE", subjects=["probe"], num_replicas=3))
            await js.delete_stream("PROBE")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


def test_provision_with_default_replicas_never_scales_an_r3_bus_down(nats_cluster, monkeypatch):
    """The bug: a host without CAPTIONBUS_REPLICAS updated R3 streams to R1, then the KV/object
    store create failed ("stream name already in use with a different configuration")."""
    monkeypatch.delenv("CAPTIONBUS_REPLICAS", raising=False)

    async def main():
        nc = await connect(nats_cluster, "test")
        # The cluster elects its meta leader and R3 creates need raft rounds across three
        # servers: on a loaded 2-core box both take a while. Probe with short requests, then
        # give the creates a long API timeout.
        await _until_meta_leader(nc.jetstream(timeout=5), timeout=90)
        js = nc.jetstream(timeout=30)
        await provision(js, replicas=3)  # the first coordinator, set up as deploy/ says
        await provision(js)  # any other process: CAPTIONBUS_REPLICAS unset, default 1
        for name in ("CB_REQUESTS", "CB_EVENTS", f"KV_{subjects.JOBS_BUCKET}", f"OBJ_{subjects.ARTIFACTS_BUCKET}"):
            assert (await js.stream_info(name)).config.num_replicas == 3, name
        await require_provisioned(js)
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 240))


# ---- deploy/nats: the role permissions, parsed and exercised by the real code paths ------------

NATS_DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nats"
ROLES = ("coordinator", "worker", "client", "gateway", "dashboard", "dashboard_downloads")


def _copy_nats_deploy(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for conf in NATS_DEPLOY.glob("*.conf"):
        shutil.copy(conf, dest / conf.name)


def test_deploy_accounts_conf_parses(tmp_path):
    """accounts.conf (+ roles.conf) as a loopback server without cluster/TLS would load it."""
    _copy_nats_deploy(tmp_path)
    (tmp_path / "test.conf").write_text(
        f'listen: 127.0.0.1:{_free_port()}\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        "include ./accounts.conf\n"
    )
    checked = subprocess.run([nats_server_binary(), "-t", "-c", str(tmp_path / "test.conf")],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_gateway_role_is_a_client_plus_the_webhook_state():
    """roles.conf cannot splice one list into another, so HTTP_GATEWAY repeats CLIENT's subjects:
    held together here (a right added to clients must reach the gateway that serves them)."""
    import re

    text = (NATS_DEPLOY / "roles.conf").read_text()

    def subjects_of(role: str) -> set[str]:
        block = re.search(rf"^{role} = {{\n(.*?)^}}$", text, re.S | re.M).group(1)
        # each role's own reply prefix (_INBOX_<user>.>) is the one right not shared
        return {s for s in re.findall(r'"([^"]+)"', re.sub(r"#.*", "", block)) if not s.startswith("_INBOX_")}

    client, gateway = subjects_of("CLIENT"), subjects_of("HTTP_GATEWAY")
    assert client < gateway
    assert {s for s in gateway - client if "webhooks" not in s} == {
        f"captionbus.job.{jobs}.{kind}" for jobs in ("*", "*.*", "*.*.*") for kind in ("completed", "failed", "cancelled")}


@pytest.fixture
def acl_server(tmp_path):
    """A server whose users have exactly the deploy/nats/roles.conf permissions (test passwords).
    Yields {role: url} and the server log, where violations are recorded."""
    with roles_server(tmp_path, {r: "HTTP_GATEWAY" if r == "gateway" else r.upper() for r in ROLES}) as served:
        yield served


def test_roles_allow_the_real_flows_and_nothing_more(acl_server, tmp_path):
    from captionbus.client import follow, job_state, list_jobs, submit, workers
    from captionbus.contracts import StageCompleted, StageFailed, StageRequest
    from captionbus.coordinator.decide import Policy
    from captionbus.core.bus import publish_event
    from captionbus.coordinator.service import Coordinator
    from captionbus.core.artifacts import ArtifactStore
    from captionbus.core.settings import Settings
    from captionbus.services.noop.stage import STAGE as NOOP
    from captionbus.services.runtime.serve import serve

    urls, server_log = acl_server

    def settings(role: str) -> Settings:
        return Settings(home=tmp_path / role, nats_url=urls[role], artifacts_mode="object", host_id=role)

    async def main():
        nc = {r: await connect(urls[r], f"acl-{r}") for r in ROLES}
        js = {r: c.jetstream() for r, c in nc.items()}

        # Nobody but the coordinator may create the bus; the others only find it missing.
        with pytest.raises(BusError, match="stream CB_REQUESTS missing"):
            await require_provisioned(js["worker"])
        assert await _denied(js["worker"].add_stream(StreamConfig(name="CB_REQUESTS", subjects=["x"])))
        await asyncio.sleep(0.2)
        denied_before = len(violations(server_log))
        await provision(js["coordinator"])
        for role in ROLES:
            await require_provisioned(js[role])

        async with Coordinator(nc["coordinator"], tick_interval_s=0.2, policy=Policy(result_secret=b"test-secret")):
            stop, ready = asyncio.Event(), asyncio.Event()
            worker = asyncio.create_task(serve(
                NOOP, settings("worker"), urls["worker"], env_name="acl", stop=stop, ready=ready,
                policy=StagePolicy(ack_wait=1.0, max_deliver=3),
            ))
            await asyncio.wait({worker, asyncio.ensure_future(ready.wait())}, timeout=20,
                               return_when=asyncio.FIRST_COMPLETED)
            if worker.done():
                worker.result()

            # Client: upload + submit, read state, list jobs and workers.
            media = tmp_path / "in.wav"
            media.write_bytes(b"RIFF" + os.urandom(300_000))
            client_store = ArtifactStore(settings("client"), js["client"])
            spec = await submit(js["client"], client_store, media, job_id="job-acl", source_language="en")
            deadline = time.monotonic() + 10
            while (state := await job_state(js["client"], "job-acl")) is None or state.status.value != "running":
                assert time.monotonic() < deadline, state
                await asyncio.sleep(0.1)
            assert "job-acl" in [s.job_id for s in await list_jobs(js["client"])]
            assert "captionbus-noop" in [w["name"] for w in await workers(nc["client"])]

            # Worker: a request (published by the coordinator's role) with an object-store input,
            # long enough to need heartbeats; output stored, completion published, acked.
            request = StageRequest(job_id="job-acl", stage="noop", node="noop", attempt=1,
                                   inputs={"media": spec.input}, params={"sleep_s": 2.5})
            await js["coordinator"].publish(subjects.stage_request("noop"), request.model_dump_json().encode())
            done = None
            async for event in follow(js["dashboard"], "job-acl", stop_at_end=False):
                if isinstance(event, StageCompleted) and event.stage == "noop":
                    done = event
                    break
            assert done.metrics["delivery"] == 1.0
            fetched = await client_store.get(done.outputs["media"], dest_dir=tmp_path / "out")
            assert fetched.read_bytes() == media.read_bytes()
            # The worker acks after it publishes stage_completed, so the ack may trail the event.
            deadline = time.monotonic() + 5
            while (consumer := await js["worker"].consumer_info(subjects.REQUESTS_STREAM, "stage-noop")
                   ).num_ack_pending and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert consumer.num_ack_pending == 0 and consumer.num_redelivered == 0

            # Dashboard: reads state, jobs and workers.
            assert (await job_state(js["dashboard"], "job-acl")).job_id == "job-acl"
            assert [s.job_id for s in await list_jobs(js["dashboard"])] == ["job-acl"]
            assert "captionbus-noop" in [w["name"] for w in await workers(nc["dashboard"])]

            # Worker: the stage cache (KV cb_stage_cache) round trip under its own rights.
            import structlog

            from captionbus.services.runtime.cache import StageCache

            cache = StageCache(js["worker"], ArtifactStore(settings("worker"), js["worker"]), structlog.get_logger())
            await cache.record("c" * 64, done.outputs, {"handle_s": 1.0}, ["kept ASR word times"])
            assert await cache.lookup("c" * 64) == (done.outputs, {"handle_s": 1.0}, ["kept ASR word times"], None)

            # The HTTP gateway's role: the terminal-event subscriptions and webhook state in KV
            # (a record created, its attempts written back, listed and read, swept, released).
            import httpx

            from captionbus.gateway.ends import job_events
            from captionbus.gateway.dispatch import DispatchConfig, Dispatcher
            from captionbus.gateway.ends import JobEnds

            await JobEnds().attach(nc["gateway"])
            async with httpx.AsyncClient() as http:
                hooks = Dispatcher(DispatchConfig(secret=b"s", allow=["http://127.0.0.1:9/"], subscribers=[],
                                                  lease_s=3), http, job_events)
                assert await hooks.add(js["gateway"], "job-acl", "callback", "http://127.0.0.1:9/")
                assert not await hooks.add(js["gateway"], "job-acl", "callback", "http://127.0.0.1:9/")
                deadline = time.monotonic() + 10
                while not (records := await hooks.records(js["gateway"], "job-acl"))[0].deliveries:
                    assert time.monotonic() < deadline, records
                    await asyncio.sleep(0.2)
                assert records[0].deliveries[0]["attempts"] >= 1 and records[0].deliveries[0]["status"] == "pending"
                assert await hooks.sweep(js["gateway"]) == 0  # its own, leased
                await hooks.stop()
                released = (await hooks.records(js["gateway"], "job-acl"))[0]
                assert released.owner is None and released.lease_until == 0  # a restart resumes at once

            allowed_so_far = violations(server_log)[denied_before:]

            # What each role must not do.
            event = b"{}"
            assert await _denied(js["worker"].publish(subjects.job_event("job-acl", "submitted"), event))
            assert await _denied(js["worker"].publish(subjects.job_event("job-x", "cancel_requested"), event))
            assert await _denied(js["client"].publish(subjects.job_event("job-acl", "stage_completed"), event))
            # webhook records are the gateway's: a client can neither edit nor read them
            assert await _denied(js["client"].publish("$KV.cb_webhooks.job-acl.callback", event))
            assert await _denied(js["client"].key_value(subjects.WEBHOOKS_BUCKET))
            assert await _denied(js["client"].publish(subjects.stage_request("noop"), event))
            assert await _denied(js["dashboard"].publish(subjects.job_event("job-acl", "cancel_requested"), event))
            assert await _denied(js["dashboard"].delete_consumer(subjects.REQUESTS_STREAM, "stage-noop"))
            assert await _denied(js["dashboard"].delete_consumer(subjects.EVENTS_STREAM, "coordinator"))
            assert await _denied(js["dashboard"].add_consumer(
                subjects.EVENTS_STREAM, durable_name="coordinator", name="coordinator", ack_wait=1.0))
            assert await _denied(js["client"].delete_stream(subjects.EVENTS_STREAM))
            assert await _denied(js["coordinator"].delete_stream(subjects.EVENTS_STREAM))
            assert await _denied(js["worker"].purge_stream(subjects.REQUESTS_STREAM))
            # A worker credential may publish stage results, but the coordinator applies only one
            # that carries the token of the request it sent: this worker (noop) was never handed
            # job-acl's demux request, so its forged failure is refused and the job runs on.
            forged = StageFailed(job_id="job-acl", stage="demux", node="demux", attempt=1,
                                 reason="forged by another stage's worker", token="f" * 32)
            await publish_event(js["worker"], forged)
            await asyncio.sleep(1.0)
            state = await job_state(js["client"], "job-acl")
            assert state.status.value == "running" and state.nodes["demux"].status.value == "requested"
            # Nobody but the captionbus/coordinator/GC may purge artifacts: a purge's filter cannot be limited
            # by subject permissions, so an unfiltered one would empty every job's outputs.
            artifacts_stream = f"OBJ_{subjects.ARTIFACTS_BUCKET}"
            assert await _denied(js["worker"].purge_stream(artifacts_stream))
            assert await _denied(js["client"].purge_stream(artifacts_stream))
            assert (await js["dashboard"].stream_info(artifacts_stream)).state.messages > 0  # still there
            await js["worker"].consumer_info(subjects.REQUESTS_STREAM, "stage-noop")  # still there
            stop.set()
            await asyncio.wait_for(worker, 15)

        for c in nc.values():
            await c.close()
        return allowed_so_far

    allowed_so_far = asyncio.run(asyncio.wait_for(main(), 90))
    assert allowed_so_far == [], f"the real flows hit permission violations: {allowed_so_far}"
    denied = violations(server_log)
    assert len(set(denied)) == 16 and {user for user, _ in denied} == {"worker", "client", "dashboard", "coordinator"}


def test_a_worker_listing_the_login_may_not_ask_is_an_error_not_an_empty_list(tmp_path):
    """`gc`'s role is granted no `$SRV` (it needs no workers). Its `$SRV.STATS` ask is refused
    by the server and no reply can come: client.workers returned [] ("no workers") before; now
    the refusal is a BusError naming the subject. A login that may ask (the dashboard's) gets
    the list, empty here because no worker runs: an empty answer is only ever a true one."""
    from captionbus.client import collect_replies, workers

    with roles_server(tmp_path, {"gc": "GC", "dashboard": "DASHBOARD"}) as (urls, server_log):
        async def main():
            gc, dashboard = await connect(urls["gc"], "acl-gc"), await connect(urls["dashboard"], "acl-dash")
            try:
                with pytest.raises(BusError, match=r"may not ask \$SRV\.STATS \(the server refused it"):
                    await workers(gc, 0.3)
                with pytest.raises(BusError, match=r"may not ask \$SRV\.PING"):
                    await collect_replies(gc, "$SRV.PING", 0.3)
                assert await workers(dashboard, 0.3) == []
                # submit's "no worker serves …" warning is a question, not a gate: it says it could not ask
                from rich.console import Console

                from captionbus.runner import warn_about_unserved_stages
                console = Console(record=True, width=200)
                await warn_about_unserved_stages(gc, ["asr"], console)
                said = console.export_text()
                assert "cannot check which stages are served" in said and "$SRV.PING" in said, said
                assert gc.is_connected  # a refused publish closes nothing
                await gc.flush()
            finally:
                await gc.close()
                await dashboard.close()

        asyncio.run(main())
        assert any(s == "$SRV.STATS" for _, s in violations(server_log)), violations(server_log)
