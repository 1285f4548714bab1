"""Clients and workers meeting a stream leader's failover (found by benchmarks/chaos.py): on a
3-node cluster at R3, kill -9 of the node leading a stream left requests to it failing ("no
response from stream", or a timeout) for seconds while the replicas elected a new leader.
`submit` exited with that error, and a stage service starting in that window crashed in its
stream check. Both now retry through the election (captionbus.core.bus.through_failover), and the retried
submit stores the job once."""
from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from benchmarks.chaos import Cluster, stream_leader
from captionbus.client import follow, submit
from captionbus.contracts import subjects
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import StagePolicy, connect, provision, through_failover
from captionbus.core.settings import Settings
from captionbus.services.noop.stage import STAGE as NOOP
from captionbus.services.runtime.serve import serve


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def _provisioned(cluster: Cluster, home: Path):
    nc = await connect(cluster.url(), "test-failover", Settings(home=home))
    js = nc.jetstream()
    deadline = time.monotonic() + 60
    while True:  # a fresh cluster may still be electing its meta leader
        try:
            await provision(js, replicas=3)
            return nc, js
        except Exception:  # noqa: BLE001 - any error while electing; bounded by the deadline
            assert time.monotonic() < deadline, "the cluster never took the streams"
            await asyncio.sleep(0.5)


async def _kill_leader(cluster: Cluster, js, stream: str) -> str:
    leader = cluster.by_name(await stream_leader(js, stream))
    assert leader is not None, f"no leader seen for {stream}"
    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait(10)
    return leader.name


def test_submit_rides_through_the_events_stream_leader_being_killed(cluster, tmp_path):
    media = tmp_path / "clip.mp4"
    media.write_bytes(b"not really a film, but submit only stores it")

    async def main():
        nc, js = await _provisioned(cluster, tmp_path / "client")
        store = ArtifactStore(Settings(home=tmp_path / "client", nats_url=cluster.url(), artifacts_mode="object"), js)
        await submit(js, store, media, source_language="en")  # all healthy: the baseline works

        killed = await _kill_leader(cluster, js, subjects.EVENTS_STREAM)
        spec = await submit(js, store, media, source_language="en")  # at once, mid-election

        kinds = [e.kind async for e in follow(js, spec.job_id, stop_at_end=False, stop_when_caught_up=True)]
        assert kinds == ["submitted"]  # stored once, whatever the retries
        info = await through_failover(lambda: js.stream_info(subjects.EVENTS_STREAM), "stream info")
        assert info.cluster.leader != killed
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_stage_service_starting_while_the_requests_leader_dies_comes_up(cluster, tmp_path):
    async def main():
        nc, js = await _provisioned(cluster, tmp_path / "admin")
        await _kill_leader(cluster, js, subjects.REQUESTS_STREAM)
        stop, ready = asyncio.Event(), asyncio.Event()
        settings = Settings(home=tmp_path / "worker", nats_url=cluster.url(), artifacts_mode="object", host_id="w")
        task = asyncio.create_task(serve(NOOP, settings, cluster.url(), env_name="test", stop=stop, ready=ready,
                                         policy=StagePolicy(ack_wait=2.0, max_deliver=3)))
        await asyncio.wait({task, asyncio.ensure_future(ready.wait())}, timeout=60,
                           return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what serve() raised: the crash this test is about
        assert ready.is_set(), "the stage service never became ready"
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 150))


def test_a_coordinator_started_with_a_fresh_cluster_provisions_it(tmp_path, monkeypatch):
    """The chaos run's first try: nodes listening, the cluster still electing its meta leader,
    and `captionbus coordinator` died in provision() with "internal error: TimeoutError". Its
    start-up steps now retry through the election."""
    from captionbus.coordinator.service import Coordinator

    monkeypatch.setenv("CAPTIONBUS_REPLICAS", "3")
    cluster = Cluster(tmp_path)
    cluster.start()  # returns once every node listens: the election is still under way

    async def main():
        nc = await connect(cluster.url(), "test-coordinator", Settings(home=tmp_path / "coordinator"))
        coordinator = Coordinator(nc, tick_interval_s=0.5)
        await coordinator.start()
        info = await nc.jetstream().stream_info(subjects.REQUESTS_STREAM)
        assert info.config.num_replicas == 3
        await coordinator.stop()
        await nc.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        cluster.stop()

