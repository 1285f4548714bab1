"""captionbus.core.gc on one host without a bus: the local root and file stage cache, by age; a running
`captionbus run` (its private bus: jobs this GC cannot see) keeps the local root untouched."""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from captionbus.core.artifacts import ArtifactStore
from captionbus.core.gc import collect
from captionbus.core.settings import Settings

HOUR = 3600.0


def _stored(store: ArtifactStore, folder: Path, name: str, age_s: float):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(os.urandom(10_000))
    ref = asyncio.run(store.put(path, copy=True))
    then = time.time() - age_s
    os.utime(store.local_path(ref), (then, then))
    return ref


def test_local_root_by_age_and_never_under_a_running_private_run(tmp_path):
    settings = Settings(home=tmp_path / "home", artifacts_mode="local", retention_outputs=24 * HOUR,
                        retention_grace=HOUR, retention_cache=48 * HOUR)
    store = ArtifactStore(settings, None)
    old = _stored(store, tmp_path / "src", "old.srt", 30 * HOUR)  # past the outputs' retention
    recent = _stored(store, tmp_path / "src", "recent.srt", 2 * HOUR)  # past grace, not retention
    cached = _stored(store, tmp_path / "src", "cached.json", 30 * HOUR)  # a live cache entry's output
    cache_dir = settings.home / "stage-cache"
    cache_dir.mkdir()
    (cache_dir / f"{'a' * 64}.json").write_text(json.dumps({"outputs": {"out": cached.model_dump(mode="json")}}))

    # A `captionbus run` with a private bus is running (this process stands in for it).
    (settings.nats_dir / f"run-{os.getpid()}").mkdir(parents=True)
    held = asyncio.run(collect(settings, None))
    assert held.local_root.count == 0 and any("captionbus run" in reason for reason in held.skipped)
    assert store.local_path(old) is not None

    (settings.nats_dir / f"run-{os.getpid()}").rmdir()
    dry = asyncio.run(collect(settings, None, dry_run=True))
    assert (dry.local_root.count, dry.local_root.bytes) == (1, old.size)
    assert store.local_path(old) is not None
    done = asyncio.run(collect(settings, None))
    assert (done.local_root.count, done.local_root.bytes) == (1, old.size)
    assert store.local_path(old) is None
    assert store.local_path(recent) is not None and store.local_path(cached) is not None
    assert "no NATS server" in done.summary()
