"""What `captionbus gc` costs, and how fast a full object store fails an upload.

    python benchmarks/gc.py [--objects 2000] [--size 16384]

1. GC over a bucket of N objects (half referenced by unfinished jobs, half unreferenced and past
   the grace period): seconds for a dry run and for the real run, objects/s, and the bytes the
   object store's stream reclaimed.
2. An upload into a full bucket (max_bytes reached): seconds until it fails with the one-line
   "artifact store full" reason — up front from the bucket's own limit (`check_room`), and when
   another writer filled it meanwhile (the chunk's ack never comes; a synchronous probe names the
   reason after `ack_timeout`, 10 s), side by side. Before this change both were an unnamed "did not
   acknowledge" error after the ack timeout, retried per attempt and then redelivered.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nats.js.api import ObjectStoreConfig, StorageType  # noqa: E402

from captionbus.server import EmbeddedServer  # noqa: E402
from captionbus.contracts import JobSpec, JobState, JobStatus, NodeState, NodeStatus, subjects  # noqa: E402
from captionbus.core.artifacts import ArtifactStore, ArtifactStoreFull  # noqa: E402
from captionbus.core.artifacts.transfer import ObjectBucket  # noqa: E402
from captionbus.core.bus import connect, provision  # noqa: E402
from captionbus.core.gc import collect  # noqa: E402
from captionbus.core.settings import Settings  # noqa: E402


async def gc_run(url: str, home: Path, objects: int, size: int) -> None:
    nc = await connect(url, "bench-gc")
    js = nc.jetstream()
    await provision(js)
    settings = Settings(home=home, nats_url=url, artifacts_mode="object", retention_grace=60)
    store = ArtifactStore(settings, js)
    src = home / "src"
    src.mkdir(parents=True)
    refs = []
    t0 = time.perf_counter()
    for i in range(objects):
        path = src / f"a{i}.bin"
        path.write_bytes(os.urandom(size))
        refs.append(await store.put(path))
        path.unlink()
    upload_s = time.perf_counter() - t0
    kv = await js.key_value(subjects.JOBS_BUCKET)
    kept = refs[: objects // 2]
    for j in range(0, len(kept), 50):  # unfinished jobs holding half the objects
        batch = kept[j:j + 50]
        state = JobState(spec=JobSpec(job_id=f"job-{j}", input=batch[0]), status=JobStatus.running,
                         nodes={"n": NodeState(stage="asr", status=NodeStatus.completed,
                                               outputs={f"o{k}": r for k, r in enumerate(batch)})})
        await kv.put(state.job_id, state.model_dump_json().encode())
    later = datetime.now(timezone.utc).timestamp() + 3600
    t0 = time.perf_counter()
    dry = await collect(settings, js, dry_run=True, now=later)
    dry_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    real = await collect(settings, js, now=later)
    real_s = time.perf_counter() - t0
    print(f"gc over {objects} objects of {size} B (stored in {upload_s:.1f} s), {objects - len(kept)} deletable:")
    print(f"  dry run   {dry_s:6.2f} s  {objects / dry_s:8.0f} objects/s listed; would delete {dry.object_store.count}")
    print(f"  real run  {real_s:6.2f} s  {objects / real_s:8.0f} objects/s; deleted {real.object_store.count} "
          f"({real.object_store.bytes} B); stream {real.object_store_bytes_before} -> "
          f"{real.object_store_bytes_after} B; kept {real.kept_for_unfinished_jobs} for unfinished jobs")
    print(f"  real / dry: {real_s / dry_s:.2f}x")
    await nc.close()


async def full_store(url: str, home: Path) -> None:
    nc = await connect(url, "bench-full")
    js = nc.jetstream()
    await js.create_object_store(subjects.ARTIFACTS_BUCKET, config=ObjectStoreConfig(
        storage=StorageType.FILE, max_bytes=4 * 1024 * 1024))
    await provision(js)
    store = ArtifactStore(Settings(home=home, nats_url=url, artifacts_mode="object"), js)
    big = home / "big.bin"
    big.parent.mkdir(parents=True, exist_ok=True)
    big.write_bytes(os.urandom(6 * 1024 * 1024))

    async def timed() -> float:
        t0 = time.perf_counter()
        try:
            await store.put(big, copy=True)
        except ArtifactStoreFull:
            return time.perf_counter() - t0
        raise SystemExit("the upload did not fail as full")

    upfront = await timed()
    check_room = ObjectBucket.check_room

    async def no_check(self, ref):
        return None

    ObjectBucket.check_room = no_check  # as if another writer filled it after the check
    try:
        probed = await timed()
    finally:
        ObjectBucket.check_room = check_room
    print("upload into a full object store (6 MiB into a 4 MiB bucket), until 'artifact store full':")
    print(f"  from the bucket's limit  {upfront:7.3f} s")
    print(f"  from the probe           {probed:7.3f} s  ({probed / upfront:.0f}x; bounded by ack_timeout 10 s)")
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16384)
    args = parser.parse_args()
    for bench in ("gc", "full"):
        with tempfile.TemporaryDirectory() as tmp:
            server = EmbeddedServer(Path(tmp) / "nats")
            url = server.start()
            try:
                if bench == "gc":
                    asyncio.run(gc_run(url, Path(tmp) / "home", args.objects, args.size))
                else:
                    asyncio.run(full_store(url, Path(tmp) / "home"))
            finally:
                server.stop()


if __name__ == "__main__":
    main()
