"""`captionbus.core.gc` against a real nats-server: what retention deletes, and what it never does."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import nats.js.errors
import pytest

from captionbus.contracts import JobSpec, JobState, JobStatus, JobSubmitted, NodeState, NodeStatus, subjects
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import connect, provision, publish_event
from captionbus.core.gc import collect
from captionbus.core.settings import Settings
from captionbus.core.tenancy import last_per_key
from tests.natsroles import users_server

DAY = 24 * 3600.0


def _file(folder: Path, name: str, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(os.urandom(size))
    return path


async def _write_job(js, state: JobState) -> None:
    kv = await js.key_value(subjects.JOBS_BUCKET)
    await kv.put(state.job_id, state.model_dump_json().encode())
    await publish_event(js, JobSubmitted(job_id=state.job_id, spec=state.spec))


async def _write_parted(js, state: JobState) -> list[str]:
    """`state` as the coordinator writes it (each completed node in a part of its own, before
    the record naming it, and a speaker summary's key), and its event; the parts' keys."""
    kv = await js.key_value(subjects.JOBS_BUCKET)
    turns = b'{"duration": 1.0, "job": "%s"}' % state.job_id.encode()
    keys = [subjects.job_part_key(state.job_id, subjects.part_name(turns))]
    await kv.put(keys[0], turns)
    for node in state.nodes.values():
        if node.status == NodeStatus.completed:
            node.speaker_turns_key = keys[0]
            node.part = subjects.part_name(node.stored())
            keys.append(subjects.job_part_key(state.job_id, node.part))
            await kv.put(keys[-1], node.stored())
    await kv.put(subjects.job_key(state.job_id), state.stored())
    await publish_event(js, JobSubmitted(job_id=state.job_id, spec=state.spec))
    return keys


async def _every_key(js) -> list[str]:
    """Every live key of KV cb_jobs, parts included (what nats-py's kv.keys() lists; its watch can
    end empty under load: core.bus.record_keys says why)."""
    return list(await last_per_key(js, ">", headers_only=True))


async def _bus(url: str, settings: Settings, name: str):
    """A provisioned bus and an artifact store on it."""
    nc = await connect(url, name)
    js = nc.jetstream()
    await provision(js)
    return nc, js, ArtifactStore(settings, js)


def test_gc_deletes_an_old_finished_jobs_artifacts_and_keeps_a_running_jobs(nats_server, tmp_path):
    settings = Settings(home=tmp_path / "home", nats_url=nats_server, artifacts_mode="object",
                        retention_outputs=7 * DAY, retention_events=5 * DAY, retention_cache=30 * DAY,
                        retention_grace=3600)

    async def main():
        nc, js, store = await _bus(nats_server, settings, "gc-test")
        src = tmp_path / "src"
        shared = await store.put(_file(src, "film.wav", 200_000))  # input of both jobs
        old_out = await store.put(_file(src, "old.srt", 600_000))  # the finished job's output
        running_mid = await store.put(_file(src, "audio.wav", 300_000))  # the running job's intermediate
        cached = await store.put(_file(src, "cached.json", 100_000))  # a stage cache entry's output

        now = datetime.now(timezone.utc)
        old = JobState(spec=JobSpec(job_id="job-old", input=shared), status=JobStatus.completed,
                       nodes={"asr": NodeState(stage="asr", status=NodeStatus.completed, outputs={"srt": old_out})},
                       outputs={"srt": old_out}, updated_at=now)
        running = JobState(spec=JobSpec(job_id="job-running", input=shared), status=JobStatus.running,
                           nodes={"demux": NodeState(stage="demux", status=NodeStatus.completed,
                                                     outputs={"audio": running_mid}),
                                  "asr": NodeState(stage="asr", status=NodeStatus.requested)})
        # As the coordinator stores them: each completed node in a part of its own, which the
        # record names (the running job's intermediate is named by its part only), and each job's
        # speaker summary under a key of its own (NodeState.speaker_turns_key): gone with the
        # record, and never read as a record (malformed) or as a job of its own.
        parts = [await _write_parted(js, old), await _write_parted(js, running)]
        assert b"audio.wav" not in (await (await js.key_value(subjects.JOBS_BUCKET)).get("job-running")).value
        cache = await js.key_value(subjects.STAGE_CACHE_BUCKET)
        await cache.put("c" * 64, json.dumps({"outputs": {"out": cached.model_dump(mode="json")}}).encode())

        stream = f"OBJ_{subjects.ARTIFACTS_BUCKET}"
        bytes_at_start = (await js.stream_info(stream)).state.bytes
        every = [shared, old_out, running_mid, cached]

        # Today: the finished job's outputs are inside their retention; nothing goes.
        today = await collect(settings, js)
        assert (today.object_store.count, today.local_root.count, today.job_records) == (0, 0, 0)
        assert today.malformed == []
        assert all([await store.exists(r) for r in every])

        # Eight days on, dry run: the old job's output is named, with its bytes; nothing is deleted.
        later = now.timestamp() + 8 * DAY
        dry = await collect(settings, js, dry_run=True, now=later)
        assert dry.object_store.count == 1 and dry.object_store.bytes == old_out.size
        assert dry.job_histories == 1 and dry.job_records == 1 and len(await _every_key(js)) == 6
        assert (await js.stream_info(stream)).state.bytes == bytes_at_start
        assert all([await store.exists(r) for r in every])
        assert (await js.stream_info(subjects.EVENTS_STREAM)).state.messages == 2

        # For real: gone from the object store and the local root, bytes reclaimed; the running
        # job's input (shared with the old job) and intermediate, and the cache entry's output, kept.
        done = await collect(settings, js, now=later)
        assert done.object_store.count == 1 and done.object_store.bytes == old_out.size
        assert done.local_root.count == 1 and done.local_root.bytes == old_out.size
        assert done.object_store_bytes_before - done.object_store_bytes_after >= old_out.size
        assert (await js.stream_info(stream)).state.bytes <= bytes_at_start - old_out.size
        assert not await store.exists(old_out)
        assert store.local_path(old_out) is None
        for ref in (shared, running_mid, cached):
            assert await store.exists(ref), ref.name
            assert (await store.get(ref, dest_dir=tmp_path / "check")).stat().st_size == ref.size
        assert done.kept_for_unfinished_jobs == 2
        # The old job's events and record are gone; the running job's are not.
        events = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter="captionbus.job.>")
        assert set(events.state.subjects) == {subjects.job_event("job-running", "submitted")}
        assert sorted(await _every_key(js)) == sorted([*parts[1], "job-running"])

        # A month on, the cache entry has expired: removed now, its artifact one run later.
        month = now.timestamp() + 31 * DAY
        first = await collect(settings, js, now=month)
        assert first.cache_entries == 1 and await store.exists(cached)
        second = await collect(settings, js, now=month)
        assert second.object_store.count == 1 and not await store.exists(cached)
        assert await store.exists(shared) and await store.exists(running_mid)  # still running
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_gc_removes_every_part_with_its_record_and_parts_whose_record_is_gone(nats_server, tmp_path, monkeypatch):
    """A collected job's record goes with every part of it, one written after this run listed
    the job's keys too (a coordinator that read the record before: review, "a key written after
    gc listed its job stays"); parts whose record is gone (such a part written after the purge,
    or a run that stopped between) go in the next run, unless a record is there again by then."""
    from captionbus.core import gc

    settings = Settings(home=tmp_path / "home", nats_url=nats_server, artifacts_mode="object",
                        retention_outputs=7 * DAY, retention_events=5 * DAY)

    async def main():
        nc, js, store = await _bus(nats_server, settings, "gc-parts")
        film = await store.put(_file(tmp_path / "src", "film.wav", 1000))
        srt = await store.put(_file(tmp_path / "src", "film.srt", 1000))
        now = datetime.now(timezone.utc)
        await _write_parted(js, JobState(
            spec=JobSpec(job_id="acme_old", input=film), status=JobStatus.completed, updated_at=now,
            nodes={"asr": NodeState(stage="asr", status=NodeStatus.completed, outputs={"srt": srt})}))
        kv = await js.key_value(subjects.JOBS_BUCKET)
        gone = [subjects.job_part_key(job_id, subjects.part_name(job_id.encode())) for job_id in ("j-gone", "j-back")]
        for key in gone:
            await kv.put(key, b"{}")
        late = subjects.job_part_key("acme_old", subjects.part_name(b"late"))
        delete = gc.Collector._delete

        async def listed_then_written(self):
            await kv.put(late, b"late")  # after the listing, before the deletions
            await kv.put(subjects.job_key("j-back"), JobState(spec=JobSpec(job_id="j-back", input=film)).stored())
            await delete(self)
        later = now.timestamp() + 8 * DAY
        dry = await collect(settings, js, dry_run=True, now=later)
        assert (dry.job_records, dry.orphan_parts) == (1, 2) and len(await kv.keys()) == 5
        monkeypatch.setattr(gc.Collector, "_delete", listed_then_written)
        done = await collect(settings, js, now=later)
        monkeypatch.setattr(gc.Collector, "_delete", delete)
        assert (done.job_records, done.orphan_parts) == (1, 1)
        assert sorted(await kv.keys()) == sorted(["j-back", gone[1]])  # a record came back for j-back's
        await kv.purge("j-back")
        await kv.put(subjects.job_part_key("acme_old", subjects.part_name(b"after")), b"after")  # after the purge
        again = await collect(settings, js, now=later)
        assert (again.job_records, again.orphan_parts) == (0, 2)
        with pytest.raises(nats.js.errors.NoKeysError):
            await kv.keys()
        held = await js.stream_info(f"KV_{subjects.JOBS_BUCKET}", subjects_filter=">")
        assert set(held.state.subjects or {}) <= {"$KV.cb_jobs.acme.acme_old", "$KV.cb_jobs.j-back"}  # markers
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_record_rewritten_after_the_listing_is_kept_with_its_parts(nats_server, tmp_path, monkeypatch):
    """`captionbus retry` of an old failed job between gc's listing and its deletions rewrites the
    record (running again): the purge of the record, bounded by the sequence gc read
    (Nats-Expected-Last-Subject-Sequence), is refused by the server, so the record and every part
    of it stay; another old job, not rewritten, goes with its parts. Before (review of 5ae3b0d)
    the retried job's record and parts were purged under the coordinator running it."""
    from captionbus.core import gc

    settings = Settings(home=tmp_path / "home", nats_url=nats_server, artifacts_mode="object",
                        retention_outputs=7 * DAY, retention_events=5 * DAY)

    async def main():
        nc, js, store = await _bus(nats_server, settings, "gc-retry")
        film = await store.put(_file(tmp_path / "src", "film.wav", 1000))
        now = datetime.now(timezone.utc)
        old = {job_id: JobState(spec=JobSpec(job_id=job_id, input=film), status=JobStatus.failed, updated_at=now,
                                nodes={"demux": NodeState(stage="demux", status=NodeStatus.completed,
                                                          outputs={"audio": film}),
                                       "asr": NodeState(stage="asr", status=NodeStatus.failed, error="x")})
               for job_id in ("job-retried", "job-gone")}
        parts = {job_id: await _write_parted(js, state) for job_id, state in old.items()}
        kv = await js.key_value(subjects.JOBS_BUCKET)
        delete = gc.Collector._delete

        async def retried_then_deleted(self):  # as the coordinator applies a retry: running again
            retried = old["job-retried"].model_copy(update={"status": JobStatus.running})
            retried.nodes["asr"] = NodeState(stage="asr", status=NodeStatus.requested, retry_base=1)
            await kv.put(subjects.job_key("job-retried"), retried.stored())
            await delete(self)

        monkeypatch.setattr(gc.Collector, "_delete", retried_then_deleted)
        done = await collect(settings, js, now=now.timestamp() + 8 * DAY)
        assert done.job_records == 1
        assert [d["name"] for d in done.deletions if d["kind"] == "job record"] == ["job-gone"]
        assert sorted(await kv.keys()) == sorted(["job-retried", *parts["job-retried"]])
        assert JobState.model_validate_json((await kv.get("job-retried")).value).status == JobStatus.running
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_job_retried_after_the_listing_keeps_its_input_and_every_event(nats_server, tmp_path, monkeypatch):
    """`captionbus retry` of an old failed job between gc's listing and its deletions runs it again
    on its input and adds to its history: gc reads each finished job a deletion relies on again
    just before the first deletion, and one rewritten since keeps its artifacts and events this
    run; the events purge of every job stops at the events stream's last sequence when the run
    began reading. A job whose retry was asked before the run but not yet applied (the record
    still failed) is kept whole. Another old job, not retried, goes with its own input and events. Before (the
    leftover of the jobparts review) the retried job's input was deleted under it (its record's
    purge was refused, its objects' were not) and its events purged, the retry's new ones too."""
    from captionbus.contracts.events import JobRetryRequested
    from captionbus.core import gc

    settings = Settings(home=tmp_path / "home", nats_url=nats_server, artifacts_mode="object",
                        retention_outputs=7 * DAY, retention_events=5 * DAY)

    async def main():
        nc, js, store = await _bus(nats_server, settings, "gc-retry-input")
        inputs = {job_id: await store.put(_file(tmp_path / "src", f"{job_id}.wav", 1000))
                  for job_id in ("job-retried", "job-gone", "job-asked")}
        now = datetime.now(timezone.utc)
        old = {job_id: JobState(spec=JobSpec(job_id=job_id, input=film), status=JobStatus.failed, updated_at=now,
                                nodes={"asr": NodeState(stage="asr", status=NodeStatus.failed, error="x")})
               for job_id, film in inputs.items()}
        for state in old.values():
            await _write_parted(js, state)
        # Retried before the run, but the coordinator has not applied it yet (down, behind): the
        # record still says failed.
        await publish_event(js, JobRetryRequested(job_id="job-asked"))
        kv = await js.key_value(subjects.JOBS_BUCKET)
        delete = gc.Collector._delete

        async def retried_then_deleted(self):  # as `captionbus retry` and the coordinator do
            await publish_event(js, JobRetryRequested(job_id="job-retried"))
            retried = old["job-retried"].model_copy(update={"status": JobStatus.running})
            retried.nodes["asr"] = NodeState(stage="asr", status=NodeStatus.requested, retry_base=1)
            await kv.put(subjects.job_key("job-retried"), retried.stored())
            await publish_event(js, JobSubmitted(job_id="job-gone", spec=old["job-gone"].spec))  # a late one
            await delete(self)

        monkeypatch.setattr(gc.Collector, "_delete", retried_then_deleted)
        done = await collect(settings, js, now=now.timestamp() + 8 * DAY)
        assert [(d["kind"], d["name"]) for d in done.deletions] == [
            ("object", inputs["job-gone"].key), ("local file", inputs["job-gone"].key),  # the root caches it
            ("events", "job-gone (1 messages)"), ("job record", "job-gone")]
        assert await store.exists(inputs["job-retried"]) and await store.exists(inputs["job-asked"])
        assert not await store.exists(inputs["job-gone"])
        held = (await js.stream_info(subjects.EVENTS_STREAM, subjects_filter="captionbus.job.>")).state.subjects
        assert held == {subjects.job_event(job, kind): 1 for job, kind in (
            ("job-retried", "submitted"), ("job-retried", "retry_requested"), ("job-asked", "submitted"),
            ("job-asked", "retry_requested"), ("job-gone", "submitted"))}, held  # job-gone's: the one published late
        assert sorted(k for k in await _every_key(js) if subjects.is_job_key(k)) == ["job-asked", "job-retried"]
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_only_no_message_is_a_record_gone_another_not_found_purges_nothing(nats_server, tmp_path, monkeypatch):
    """gc's re-check of a job record before it purges the parts listed without one (and every get
    of a listed key) takes the server's "no message" (err_code 10037) for "gone"; any other 404,
    "stream not found" (10059: the bucket itself missing) among them, raises and purges nothing.
    Before (review of 5ae3b0d) every NotFoundError read as "no record"."""
    from captionbus.core import gc

    settings = _gc_settings(nats_server, tmp_path, "home")

    async def main():
        nc, js, _ = await _bus(nats_server, settings, "gc-404")
        orphan = subjects.job_part_key("j-orphan", subjects.part_name(b"orphan"))
        await (await js.key_value(subjects.JOBS_BUCKET)).put(orphan, b"{}")
        purge, purged = gc.Collector._purge_parts, []

        async def seen(self, job_id):
            purged.append(job_id)
            await purge(self, job_id)

        monkeypatch.setattr(gc.Collector, "_purge_parts", seen)
        collector = gc.Collector(settings, js)
        assert await collector._purge_orphan_parts("j-orphan") is True and purged == ["j-orphan"]
        held = await js.stream_info(f"KV_{subjects.JOBS_BUCKET}", subjects_filter=">")
        assert not held.state.subjects
        await js.delete_stream(f"KV_{subjects.JOBS_BUCKET}")
        with pytest.raises(nats.js.errors.NotFoundError) as missing:
            await collector._purge_orphan_parts("j-orphan")
        assert missing.value.err_code == gc.STREAM_NOT_FOUND and purged == ["j-orphan"]
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_gc_size_limit_evicts_the_oldest_finished_never_a_running_jobs(nats_server, tmp_path):
    settings = Settings(home=tmp_path / "home", nats_url=nats_server, artifacts_mode="object",
                        artifacts_max_bytes=500_000, retention_grace=60)

    async def main():
        nc, js, store = await _bus(nats_server, settings, "gc-size")
        src = tmp_path / "src"
        refs = {}
        now = datetime.now(timezone.utc)
        for i, status in enumerate([JobStatus.completed, JobStatus.completed, JobStatus.running]):
            job = f"job-{i}"
            refs[job] = await store.put(_file(src, f"{job}.wav", 300_000))
            state = JobState(spec=JobSpec(job_id=job, input=refs[job]), status=status,
                             updated_at=datetime.fromtimestamp(now.timestamp() + i, timezone.utc))
            await _write_job(js, state)
        # An hour on: all inside retention, 900 kB over a 500 kB limit. The older finished job's
        # input goes first, then the other finished one; the running job's stays whatever the limit.
        report = await collect(settings, js, now=now.timestamp() + 3600)
        assert report.object_store.count == 2
        assert not await store.exists(refs["job-0"]) and not await store.exists(refs["job-1"])
        assert await store.exists(refs["job-2"])
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_gc_cli_prints_counts_and_bytes_as_json(nats_server, tmp_path):
    env = {**os.environ, "NATS_URL": nats_server, "CAPTIONBUS_HOME": str(tmp_path / "home"),
           "CAPTIONBUS_RETENTION_GRACE": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    async def seed():
        nc = await connect(nats_server, "gc-cli")
        js = nc.jetstream()
        await provision(js)
        settings = Settings(home=tmp_path / "seed", nats_url=nats_server, artifacts_mode="object")
        ref = await ArtifactStore(settings, js).put(_file(tmp_path, "orphan.bin", 250_000))
        await nc.close()
        return ref

    orphan = asyncio.run(seed())
    time.sleep(0.05)
    cmd = [sys.executable, "-m", "captionbus", "gc", "--json"]
    # --local-only: this host's root only (a stale local copy goes), the bus's objects stay.
    local_settings = Settings(home=tmp_path / "home", artifacts_mode="local")
    local_copy = asyncio.run(ArtifactStore(local_settings, None).put(_file(tmp_path, "copy.bin", 120_000)))
    local = subprocess.run([*cmd, "--local-only"], env=env, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    report = json.loads(local.stdout)
    assert report["local_root"] == {"count": 1, "bytes": local_copy.size}
    assert report["object_store"] == {"count": 0, "bytes": 0} and report["object_store_bytes_before"] is None
    assert ArtifactStore(local_settings, None).local_path(local_copy) is None
    dry = subprocess.run([*cmd, "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True and report["object_store"] == {"count": 1, "bytes": orphan.size}
    real = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert real.returncode == 0, real.stderr
    report = json.loads(real.stdout)
    assert report["object_store"] == {"count": 1, "bytes": orphan.size}
    assert report["object_store_bytes_before"] - report["object_store_bytes_after"] >= orphan.size
    again = subprocess.run(cmd[:-1], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.startswith("gc deleted: 0 objects (0 B)"), again.stdout


def test_up_collects_periodically_on_its_embedded_bus(nats_server, tmp_path):
    from captionbus.runner import collect_periodically

    settings = Settings(home=tmp_path / "home", artifacts_mode="local", retention_outputs=3600, retention_grace=60)

    async def main():
        nc = await connect(nats_server, "gc-up")
        js = nc.jetstream()
        await provision(js)
        store = ArtifactStore(settings, None)
        old = await store.put(_file(tmp_path / "src", "old.srt", 50_000))
        young = await store.put(_file(tmp_path / "src", "young.srt", 50_000))
        two_hours_ago = time.time() - 7200
        os.utime(store.local_path(old), (two_hours_ago, two_hours_ago))
        task = asyncio.create_task(collect_periodically(settings, js, 0.2, first_after_s=0))
        deadline = time.monotonic() + 20
        while store.local_path(old) is not None:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # more runs: still nothing else goes, and the task lives on
        assert store.local_path(young) is not None and not task.done()
        task.cancel()
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_storing_an_old_artifact_again_restarts_its_grace_period(nats_server, tmp_path):
    """A re-submitted input already in the stores is referenced by no job until the coordinator
    records the new one: storing it again makes it "just written", so the GC waits its grace."""
    from nats.js.api import ObjectInfo

    settings = Settings(home=tmp_path / "home", nats_url=nats_server, artifacts_mode="object", retention_grace=3600)

    async def main():
        nc, js, store = await _bus(nats_server, settings, "gc-refresh")
        media = _file(tmp_path / "src", "film.wav", 100_000)
        ref = await store.put(media)
        # Age both copies by two hours: the object's metadata and the local root's file.
        old = datetime.fromtimestamp(time.time() - 7200, timezone.utc).isoformat()
        info = await store.objects.info(ref.key)
        aged = ObjectInfo.from_response({**info.as_dict(), "mtime": old})
        meta = store.objects._meta_subject(ref.key)  # the bucket refuses rollups: purge (an open test bus), then write
        await js.purge_stream(store.objects.stream, subject=meta)
        await js.publish(meta, json.dumps(aged.as_dict()).encode())
        os.utime(store.local_path(ref), (time.time() - 7200,) * 2)
        dry = await collect(settings, js, dry_run=True)
        assert (dry.object_store.count, dry.local_root.count) == (1, 1)  # unreferenced and past grace
        assert await store.put(media) == ref  # stored again (a new job's input): nothing uploaded ...
        kept = await collect(settings, js)
        assert (kept.object_store.count, kept.local_root.count) == (0, 0)  # ... and fresh again
        assert await store.exists(ref)
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_an_object_stored_again_after_gc_listed_it_is_not_deleted(nats_server, tmp_path, monkeypatch):
    from captionbus.core.artifacts import transfer

    settings = Settings(home=tmp_path / "home", nats_url=nats_server, artifacts_mode="object")

    async def main():
        nc, js, store = await _bus(nats_server, settings, "gc-race")
        media = _file(tmp_path / "src", "film.wav", 100_000)
        ref = await store.put(media)
        [(info, seq)] = await store.objects.list_objects()  # what a GC run read ...
        monkeypatch.setattr(transfer, "REFRESH_AFTER_S", -1.0)  # refresh now, not after 10 min
        await store.put(media)  # ... then a new job stores the same input again ...
        assert await store.objects.delete(info, seq) is False  # ... so the GC's delete does nothing
        assert (await store.get(ref, dest_dir=tmp_path / "out")).read_bytes() == media.read_bytes()
        [(info, seq)] = await store.objects.list_objects()
        assert await store.objects.delete(info, seq) is True
        assert await store.objects.info(ref.key) is None  # deleted for every reader of the bus
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_size_limit_takes_a_live_cache_entry_in_two_runs(nats_server, tmp_path):
    """Over the limit, a live cache entry's artifact goes in two steps (the entry, then the bytes
    one run later), so a worker that has just reused the entry still finds its outputs."""
    settings = Settings(home=tmp_path / "home", nats_url=nats_server, artifacts_mode="object",
                        artifacts_max_bytes=400_000, retention_grace=60)

    async def main():
        nc, js, store = await _bus(nats_server, settings, "gc-cache-size")
        running = await store.put(_file(tmp_path / "src", "running.wav", 300_000))
        cached = await store.put(_file(tmp_path / "src", "cached.json", 300_000))
        await _write_job(js, JobState(spec=JobSpec(job_id="job-r", input=running), status=JobStatus.running))
        cache = await js.key_value(subjects.STAGE_CACHE_BUCKET)
        await cache.put("d" * 64, json.dumps({"outputs": {"out": cached.model_dump(mode="json")}}).encode())
        later = time.time() + 3600  # past grace, inside every retention
        first = await collect(settings, js, now=later)
        assert first.cache_entries == 1 and first.object_store.count == 0
        assert await store.exists(cached)
        with pytest.raises(nats.js.errors.NoKeysError):  # the entry is gone
            await cache.keys()
        second = await collect(settings, js, now=later)
        assert second.object_store.count == 1 and second.object_store.bytes == cached.size
        assert not await store.exists(cached) and await store.exists(running)
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


# ---- fail-safe (issue 18): a failed read deletes nothing; garbage is skipped; dry run == real run

ALL = 'publish: ">", subscribe: ">"'


# Every way gc reads job records: gets of a key, and the consumer that delivers every key's value.
NO_JOB_READS = ("$JS.API.STREAM.MSG.GET.KV_cb_jobs", "$JS.API.DIRECT.GET.KV_cb_jobs.>",
                "$JS.API.CONSUMER.CREATE.KV_cb_jobs", "$JS.API.CONSUMER.CREATE.KV_cb_jobs.>")


def _all_but(*subjects_denied: str) -> str:
    return 'publish: {allow: ">", deny: [' + ", ".join(f'"{s}"' for s in subjects_denied) + ']}, subscribe: ">"'


async def _seed_mixed(js, store: ArtifactStore, tmp_path: Path, now: datetime) -> dict:
    """Old finished job (output and events past retention), running job, live cache entry,
    an orphan: what each kind of GC decision needs."""
    src = tmp_path / "src"
    refs = {name: await store.put(_file(src, f"{name}.bin", size)) for name, size in
            (("input", 150_000), ("old_out", 200_000), ("running_mid", 120_000), ("cached", 90_000),
             ("orphan", 80_000))}
    old = JobState(spec=JobSpec(job_id="job-old", input=refs["input"]), status=JobStatus.completed,
                   nodes={"asr": NodeState(stage="asr", status=NodeStatus.completed, outputs={"srt": refs["old_out"]})},
                   outputs={"srt": refs["old_out"]}, updated_at=now)
    running = JobState(spec=JobSpec(job_id="job-running", input=refs["input"]), status=JobStatus.running,
                       nodes={"demux": NodeState(stage="demux", status=NodeStatus.completed,
                                                 outputs={"audio": refs["running_mid"]})})
    await _write_job(js, old)
    await _write_job(js, running)
    cache = await js.key_value(subjects.STAGE_CACHE_BUCKET)
    await cache.put("e" * 64, json.dumps({"outputs": {"out": refs["cached"].model_dump(mode="json")}}).encode())
    return refs


def _gc_settings(url: str, tmp_path: Path, name: str) -> Settings:
    return Settings(home=tmp_path / name, nats_url=url, artifacts_mode="object", retention_outputs=7 * DAY,
                    retention_events=5 * DAY, retention_cache=30 * DAY, retention_grace=3600)


def test_gc_that_cannot_read_job_records_or_the_cache_deletes_nothing(tmp_path):
    """A refused read (the server gives no reply: what a blip or a leader election looks like to
    the client) aborts the run before its first delete and names what could not be read. Before
    issue 18 a failed listing read as "no jobs": this run would have deleted the running job's
    input and intermediate, past their grace period."""
    from captionbus.core.gc import GcError

    users = {"admin": ALL,
             "no-jobs": _all_but(*NO_JOB_READS),
             "no-cache": _all_but("$JS.API.STREAM.INFO.KV_cb_stage_cache")}
    with users_server(tmp_path, users) as urls:

        async def main():
            nc, js, store = await _bus(urls["admin"], _gc_settings(urls["admin"], tmp_path, "admin"), "gc-admin")
            now = datetime.now(timezone.utc)
            refs = await _seed_mixed(js, store, tmp_path, now)
            later = now.timestamp() + 8 * DAY
            bytes_at_start = (await js.stream_info(f"OBJ_{subjects.ARTIFACTS_BUCKET}")).state.bytes
            for user, what in (("no-jobs", "job records"), ("no-cache", "the stage cache")):
                unc = await connect(urls[user], f"gc-{user}")
                ujs = unc.jetstream(timeout=1.0)
                for dry_run in (True, False):
                    with pytest.raises(GcError) as failed:
                        await collect(_gc_settings(urls[user], tmp_path, user), ujs, dry_run=dry_run, now=later)
                    assert f"gc stopped before deleting anything: cannot read {what}" in str(failed.value)
                    assert failed.value.bus and failed.value.report.deletions == []
                    assert failed.value.report.object_store.count == 0
                await unc.close()
            assert (await js.stream_info(f"OBJ_{subjects.ARTIFACTS_BUCKET}")).state.bytes == bytes_at_start
            assert all([await store.exists(r) for r in refs.values()])
            assert sorted(await (await js.key_value(subjects.JOBS_BUCKET)).keys()) == ["job-old", "job-running"]
            # The same state read in full: the old job's output and the orphan go, nothing else.
            report = await collect(_gc_settings(urls["admin"], tmp_path, "admin"), js, now=later)
            gone = {d["name"] for d in report.deletions if d["kind"] == "object"}
            assert gone == {refs["old_out"].key, refs["orphan"].key}
            await nc.close()

        asyncio.run(asyncio.wait_for(main(), 90))


def test_gc_that_cannot_read_a_part_written_after_its_listing_deletes_nothing(tmp_path, monkeypatch):
    """A running job's node completes between gc's listing of KV cb_jobs and its read of the
    values: the record read names a part the listing lacks, which gc reads alone. When that read
    fails (here a user whose gets of KV cb_jobs go unanswered: a timeout, as after a blip), the
    run stops before its first delete (GcError, bus). Before (review of 5ae3b0d) the failed read
    was taken for a malformed record and the run went on, deleting the node's output, which
    only the unread part names. The same part purged from the bus (the server says "no
    message") is malformed: reported, and what the record still names is kept."""
    from captionbus.core import gc
    from captionbus.core.gc import GcError

    users = {"admin": ALL, "no-gets": _all_but(*NO_JOB_READS[:2])}
    with users_server(tmp_path, users) as urls:

        async def main():
            nc, js, store = await _bus(urls["admin"], _gc_settings(urls["admin"], tmp_path, "admin"), "gc-admin")
            src = tmp_path / "src"
            film, audio, srt = [await store.put(_file(src, f"{n}.bin", 50_000)) for n in ("film", "audio", "srt")]
            now = datetime.now(timezone.utc)
            running = JobState(spec=JobSpec(job_id="job-running", input=film), status=JobStatus.running,
                               nodes={"demux": NodeState(stage="demux", status=NodeStatus.completed,
                                                         outputs={"audio": audio}),
                                      "asr": NodeState(stage="asr", status=NodeStatus.requested)})
            await _write_parted(js, running)
            kv = await js.key_value(subjects.JOBS_BUCKET)
            listing = gc.Collector._subjects
            completed, tries = {}, []

            async def listed_then_completed(self, stream, pattern):
                found = await listing(self, stream, pattern)
                if stream == f"KV_{subjects.JOBS_BUCKET}" and not completed:  # asr completes now
                    asr = NodeState(stage="asr", status=NodeStatus.completed, outputs={"srt": srt},
                                    attempt=len(tries))  # a new part each run
                    asr.part = subjects.part_name(asr.stored())
                    completed["key"] = subjects.job_part_key("job-running", asr.part)
                    await kv.put(completed["key"], asr.stored())
                    whole = running.model_copy(update={"nodes": {**running.nodes, "asr": asr}})
                    await kv.put(subjects.job_key("job-running"), whole.stored())
                return found

            monkeypatch.setattr(gc.Collector, "_subjects", listed_then_completed)
            later = now.timestamp() + 8 * DAY  # every artifact past its grace period
            unc = await connect(urls["no-gets"], "gc-no-gets")
            for dry_run in (True, False):
                completed.clear()
                tries.append(dry_run)
                with pytest.raises(GcError) as failed:
                    await collect(_gc_settings(urls["no-gets"], tmp_path, "no-gets"), unc.jetstream(timeout=1.0),
                                  dry_run=dry_run, now=later)
                assert "gc stopped before deleting anything: cannot read job records" in str(failed.value)
                assert failed.value.bus and failed.value.report.deletions == []
                assert failed.value.report.malformed == []
            await unc.close()
            assert all([await store.exists(r) for r in (film, audio, srt)])
            # The part gone from the bus ("no message"): malformed, and what the record and the
            # job's parts listed name is kept.
            completed.clear()
            tries.append(None)
            monkeypatch.setattr(gc.Collector, "_subjects", listing)
            await listed_then_completed(gc.Collector(_gc_settings(urls["admin"], tmp_path, "admin"), js),
                                        f"KV_{subjects.JOBS_BUCKET}", ">")
            await js.purge_stream(f"KV_{subjects.JOBS_BUCKET}", subject=f"$KV.{subjects.JOBS_BUCKET}.{completed['key']}")
            report = await collect(_gc_settings(urls["admin"], tmp_path, "admin"), js, now=later)
            assert len(report.malformed) == 1 and "job record job-running" in report.malformed[0]
            assert "MissingParts" in report.malformed[0], report.malformed
            assert [d for d in report.deletions if d["kind"] == "object"] == []
            assert all([await store.exists(r) for r in (film, audio, srt)])  # srt: named by earlier parts
            await nc.close()

        asyncio.run(asyncio.wait_for(main(), 90))


def test_malformed_metadata_is_skipped_and_reported_never_fatal(nats_server, tmp_path):
    """One client's garbage on `$O.<bucket>.M.*` (not JSON; JSON naming another object) and a
    cache entry that does not parse: every run, dry or real, goes on, reports each, deletes none
    of them, and keeps the artifact keys a garbled record still names."""
    settings = _gc_settings(nats_server, tmp_path, "home")

    async def main():
        nc, js, store = await _bus(nats_server, settings, "gc-garbage")
        now = datetime.now(timezone.utc)
        refs = await _seed_mixed(js, store, tmp_path, now)
        kept_by_garbage = await store.put(_file(tmp_path / "src", "named-in-garbage.bin", 70_000))
        meta = f"$O.{subjects.ARTIFACTS_BUCKET}.M."
        await js.publish(meta + "zz", b"not json at all")
        info = await store.objects.info(refs["orphan"].key)
        await js.publish(meta + "yy", json.dumps(info.as_dict()).encode())  # claims to be the orphan
        cache = await js.key_value(subjects.STAGE_CACHE_BUCKET)
        await cache.put("f" * 64, b"{broken " + kept_by_garbage.key.encode())
        # A job record that does not parse (another schema, a torn write): what it names is kept
        # as if its job were unfinished, however old.
        named_by_record = await store.put(_file(tmp_path / "src", "named-in-record.bin", 60_000))
        jobs = await js.key_value(subjects.JOBS_BUCKET)
        await jobs.put("job-garbled", b'{"spec": {"input": {"key": "' + named_by_record.key.encode() + b'"')
        later = now.timestamp() + 8 * DAY
        for dry_run in (True, False):
            report = await collect(settings, js, dry_run=dry_run, now=later)
            assert len(report.malformed) == 4, report.malformed
            assert any("job record job-garbled" in m for m in report.malformed)
            assert any(f"{meta}zz" in m and "JSONDecodeError" in m for m in report.malformed)
            assert any(f"{meta}yy" in m and "names object" in m for m in report.malformed)
            assert any(f"stage cache entry kv:{'f' * 64}" in m for m in report.malformed)
            assert {d["name"] for d in report.deletions if d["kind"] == "object"} == {
                refs["old_out"].key, refs["orphan"].key}
            assert "malformed, skipped and kept: object metadata" in report.summary()
        assert await store.exists(kept_by_garbage) and await store.exists(refs["cached"])
        assert await store.exists(named_by_record)
        assert "job-garbled" in await _every_key(js)
        assert (await js.get_last_msg(f"OBJ_{subjects.ARTIFACTS_BUCKET}", meta + "zz")).data == b"not json at all"
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_dry_run_and_the_real_run_after_it_decide_the_same(nats_server, tmp_path):
    settings = _gc_settings(nats_server, tmp_path, "home")

    async def main():
        nc, js, store = await _bus(nats_server, settings, "gc-same")
        now = datetime.now(timezone.utc)
        refs = await _seed_mixed(js, store, tmp_path, now)
        # 31 days on: the cache entry has expired too, so every kind of decision is in play.
        later = now.timestamp() + 31 * DAY
        logged = []
        dry = await collect(settings, js, dry_run=True, now=later, on_delete=lambda *a: logged.append(a))
        real = await collect(settings, js, now=later, on_delete=lambda *a: logged.append(a))
        assert dry.deletions == real.deletions
        assert {d["kind"] for d in real.deletions} == {"object", "local file", "cache entry", "events", "job record"}
        assert (dry.object_store, dry.local_root, dry.cache_entries, dry.job_histories, dry.job_records) == (
            real.object_store, real.local_root, real.cache_entries, real.job_histories, real.job_records)
        # Each deletion was reported as it was made, in order, dry ones marked as such.
        assert [(k, n, b) for k, n, b, d in logged if d] == [(d["kind"], d["name"], d["bytes"]) for d in dry.deletions]
        assert [(k, n, b) for k, n, b, d in logged if not d] == [(d["kind"], d["name"], d["bytes"]) for d in real.deletions]
        again = await collect(settings, js, dry_run=True, now=later)
        # The expired cache entry's artifact, one run later.
        assert {(d["kind"], d["name"]) for d in again.deletions} == {("object", refs["cached"].key),
                                                                     ("local file", refs["cached"].key)}
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_gc_cli_fails_part_way_with_every_deletion_logged_and_the_summary(tmp_path):
    """A real run whose user may delete objects but not purge event history: the objects go (each
    line on stderr as it is made), the refused purge stops the run, the summary says what was
    deleted, and the exit code is the bus's (4). A user that cannot read job records: exit 4,
    nothing deleted, the summary printed all the same."""
    users = {"admin": ALL, "no-events": _all_but("$JS.API.STREAM.PURGE.CB_EVENTS"),
             "no-jobs": _all_but(*NO_JOB_READS)}
    with users_server(tmp_path, users) as urls:

        async def seed():
            nc, js, store = await _bus(urls["admin"], _gc_settings(urls["admin"], tmp_path, "admin"), "gc-admin")
            past = datetime.fromtimestamp(time.time() - 8 * DAY, timezone.utc)  # the old job finished 8 days ago
            refs = await _seed_mixed(js, store, tmp_path, past)
            await nc.close()
            return refs

        refs = asyncio.run(seed())
        env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "cli"), "CAPTIONBUS_RETENTION_GRACE": "0",
               "CAPTIONBUS_RETENTION_EVENTS": "432000", "CAPTIONBUS_RETENTION_OUTPUTS": "604800",
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        cmd = [sys.executable, "-m", "captionbus", "gc"]
        blind = subprocess.run(cmd, env={**env, "NATS_URL": urls["no-jobs"]}, capture_output=True, text=True,
                               timeout=120)
        assert blind.returncode == 4, blind.stderr
        assert blind.stdout.startswith("gc deleted: 0 objects (0 B)")
        assert "gc stopped before deleting anything: cannot read job records" in blind.stderr
        assert "deleted object" not in blind.stderr

        part = subprocess.run(cmd, env={**env, "NATS_URL": urls["no-events"]}, capture_output=True, text=True,
                              timeout=120)
        assert part.returncode == 4, part.stderr
        gone = {refs["old_out"].key, refs["orphan"].key}  # past retention, past grace (0 here)
        for key in gone:
            assert f"deleted object {key}" in part.stderr
        assert part.stdout.startswith("gc deleted: 2 objects"), part.stdout
        assert "events of 0 jobs" in part.stdout and "0 job records" in part.stdout
        last = part.stderr.strip().splitlines()[-1]
        assert "gc stopped after" in last and "deleting events job-old" in last, last

        async def check():
            nc, js, store = await _bus(urls["admin"], _gc_settings(urls["admin"], tmp_path, "admin"), "gc-check")
            exists = {name: await store.objects.info(r.key) is not None for name, r in refs.items()}  # on the bus
            keys = sorted(await (await js.key_value(subjects.JOBS_BUCKET)).keys())
            await nc.close()
            return exists, keys

        exists, keys = asyncio.run(check())
        assert exists == {"input": True, "old_out": False, "running_mid": True, "cached": True, "orphan": False}
        assert keys == ["job-old", "job-running"]  # records go last: not reached
