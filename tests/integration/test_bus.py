import asyncio
import os
import subprocess
import sys
import time

import pytest
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig

from captionbus.bus import (
    BusError,
    EmbeddedServer,
    StagePolicy,
    _free_port,
    connect,
    effective_policy,
    ensure_stage_consumer,
    ensure_stage_consumer_info,
    nats_server_binary,
    provision,
    require_provisioned,
)
from contracts import subjects


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
    ports = [(_free_port(), _free_port()) for _ in range(3)]
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
        js = nc.jetstream()
        await _until_meta_leader(js)
        await provision(js, replicas=3)  # the first coordinator, set up as deploy/ says
        await provision(js)  # any other process: CAPTIONBUS_REPLICAS unset, default 1
        for name in ("CB_REQUESTS", "CB_EVENTS", f"KV_{subjects.JOBS_BUCKET}", f"OBJ_{subjects.ARTIFACTS_BUCKET}"):
            assert (await js.stream_info(name)).config.num_replicas == 3, name
        await require_provisioned(js)
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))
