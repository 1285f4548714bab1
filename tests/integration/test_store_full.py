"""A full artifact store fails the affected job with one line, the services stay up, and after
`gc` frees space the next job runs on the same worker and coordinator."""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from nats.js.api import ObjectStoreConfig, StorageType

from captionbus.client import job_state, submit
from captionbus.contracts import subjects
from captionbus.coordinator.decide import Policy
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import Coordinator
from captionbus.core.artifacts import ArtifactStore, ArtifactStoreFull
from captionbus.core.bus import StagePolicy, connect, provision
from captionbus.core.gc import collect
from captionbus.core.settings import Settings
from captionbus.services.noop.stage import STAGE as NOOP
from captionbus.services.runtime.serve import serve

GRAPHS = {"gen": Workflow.from_dict({
    "name": "gen",
    "nodes": {"noop": {"inputs": {"media": "job.input"}, "outputs": ["out"]}},
    "outputs": {"out": "noop.out"},
})}
LIMIT = 3_000_000  # bytes the object store may hold


async def _finished(js, job_id: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while (state := await job_state(js, job_id)) is None or not state.status.finished:
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.1)
    return state


def test_object_store_full_fails_the_job_with_one_line_and_gc_makes_room(nats_server, tmp_path):
    settings = Settings(home=tmp_path / "home", nats_url=nats_server, artifacts_mode="object")

    async def main():
        nc = await connect(nats_server, "store-full")
        js = nc.jetstream()
        # The operator's limit on the bucket (provision keeps an existing bucket as it is).
        await js.create_object_store(subjects.ARTIFACTS_BUCKET, config=ObjectStoreConfig(
            storage=StorageType.FILE, max_bytes=LIMIT))
        await provision(js)
        store = ArtifactStore(settings, js)
        async with Coordinator(nc, graphs=GRAPHS, tick_interval_s=0.2, policy=Policy(result_secret=b"full")) as co:
            stop, ready = asyncio.Event(), asyncio.Event()
            worker = asyncio.create_task(serve(
                NOOP, Settings(home=tmp_path / "worker", nats_url=nats_server, artifacts_mode="object"),
                nats_server, env_name="full", stop=stop, ready=ready, policy=StagePolicy(ack_wait=2.0, max_deliver=3)))
            await asyncio.wait({worker, asyncio.ensure_future(ready.wait())}, timeout=20,
                               return_when=asyncio.FIRST_COMPLETED)

            async def job(name: str, size: int):
                media = tmp_path / f"{name}.wav"
                media.write_bytes(os.urandom(100_000))
                await submit(js, store, media, workflow="gen", job_id=name, options={"noop": {"write_bytes": size}})
                return await _finished(js, name)

            first = await job("job-a", 1_200_000)
            assert first.status.value == "completed"
            full = await job("job-b", 2_000_000)  # 1.3 MB stored + 0.1 + 2.0 > 3 MB
            assert full.status.value == "failed"
            assert "artifact store full" in full.error and "captionbus gc" in full.error, full.error
            assert "\n" not in full.error and full.nodes["noop"].attempt == 1  # no redelivery loop
            assert not worker.done() and co.wait_failed is not None  # services up
            # A month on, both finished jobs' artifacts are past retention: gc makes room.
            report = await collect(settings, js, now=datetime.now(timezone.utc).timestamp() + 30 * 24 * 3600)
            assert report.object_store.bytes >= 1_200_000
            again = await job("job-c", 2_000_000)
            assert again.status.value == "completed", again.error
            assert (await store.get(again.outputs["out"])).stat().st_size == 2_000_000
            assert not worker.done()
            stop.set()
            await asyncio.wait_for(worker, 15)
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 150))


@contextlib.contextmanager
def _small_disk(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_under_the_local_root_is_one_clear_line_and_gc_frees_it(tmp_path):
    with _small_disk(tmp_path / "home", "2m") as home:
        settings = Settings(home=home, artifacts_mode="local", retention_grace=0, retention_outputs=0)
        store = ArtifactStore(settings, None)
        first = tmp_path / "first.bin"
        first.write_bytes(os.urandom(1_500_000))
        second = tmp_path / "second.bin"
        second.write_bytes(os.urandom(1_000_000))

        async def main():
            ref = await store.put(first, copy=True)
            with pytest.raises(ArtifactStoreFull) as full:
                await store.put(second, copy=True)
            assert "no space" in str(full.value) and "captionbus gc" in str(full.value)
            assert "\n" not in str(full.value)
            assert not list((home / "artifacts" / ".tmp").iterdir())  # no half-written file left
            report = await collect(settings, None)
            assert report.local_root.count == 1 and report.local_root.bytes == ref.size
            assert (await store.put(second, copy=True)).size == 1_000_000

        asyncio.run(main())


def test_submit_into_a_full_store_exits_1_with_one_line(nats_server, tmp_path):
    async def seed():
        nc = await connect(nats_server, "store-full-cli")
        js = nc.jetstream()
        await js.create_object_store(subjects.ARTIFACTS_BUCKET, config=ObjectStoreConfig(
            storage=StorageType.FILE, max_bytes=500_000))
        await provision(js)
        await nc.close()

    asyncio.run(seed())
    media = tmp_path / "film.wav"
    media.write_bytes(b"RIFF" + os.urandom(800_000))
    env = {**os.environ, "NATS_URL": nats_server, "CAPTIONBUS_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "captionbus", "submit", str(media), "-s", "en"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    # (the other lines: a warning that no worker serves the workflow's stages here)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "artifact store full" in line]
    assert len(lines) == 1 and "captionbus gc" in lines[0] and "film.wav" in lines[0], done.stdout + done.stderr
