"""Bounded storage: retention of artifacts, the stage cache and job history, and the GC that
enforces it (`captionbus gc [--dry-run] [--json]`).

What is kept, and for how long (`core.settings`, CAPTIONBUS_RETENTION_* / _ARTIFACTS_MAX_BYTES):
- every artifact an **unfinished** job references (its input, every node's outputs so far, the
  job's outputs) — always, whatever its age or the size limit: a running job never loses what
  it still needs;
- a **finished** job's artifacts: `retention_outputs` after it finished (its last state write);
- a **stage cache** entry: `retention_cache` after it was written, and every artifact it
  references while it lives. An entry removed by this run keeps its artifacts until the next
  run: a worker that hit it a moment ago is then still reporting outputs nobody else holds;
- an artifact nobody references (an input whose job is being submitted, an output a worker is
  reporting, a job whose record is gone): `retention_grace` after it was written (in the local
  root with local artifacts: `retention_outputs`, as `run`'s private buses leave no job records);
- a finished job's **events** (its subjects of CB_EVENTS): `retention_events` after it finished;
  its job record (KV cb_jobs) until both that and `retention_outputs` have passed;
- then, if `artifacts_max_bytes` > 0 and a store still holds more, its oldest artifacts that no
  unfinished job needs and that are past the grace period go first (by when they stopped being
  needed), until it fits.
Torn uploads (chunks no object's metadata names, older than the grace period) are purged too.

Races, and how they are closed: an object is deleted only if its metadata is still the message
this run listed (a publish with the expected last subject sequence), and a local file only if its
mtime is unchanged, so an artifact stored again meanwhile (a new job's input: storing refreshes
the time) survives. The size limit evicts a live cache entry's artifact in two steps too: the
entry now, the bytes next run, so a worker that reused the entry a moment ago still finds them.

Where: the object store and the KV stage cache on the bus (a fleet), and this host's local
artifact root and its file stage cache (`$CAPTIONBUS_HOME/stage-cache`). A `captionbus run`
without `up` keeps its jobs on a private bus this GC cannot see: while one runs (its
`nats/run-<pid>` dir with a live pid) the local root is left alone, and the report says so.

Who: deleting needs a user allowed to purge (`GC` in deploy/nats/roles.conf); the coordinator's
own user may not (it runs all the time, next to every job: the fewer rights the better), so the
coordinator does not collect. Run `captionbus gc` from a timer (deploy/systemd/captionbus-gc.*);
`--dry-run` deletes nothing (it lists what the `gc` user may list); `--local-only` deletes only
files on this host, and reads the bus with any user that may read job state.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from contracts import ArtifactRef, JobState, subjects
from core.artifacts.transfer import ObjectBucket
from core.artifacts.transfer import timestamp as _ts

log = structlog.get_logger("captionbus.gc")

FOREVER = math.inf


@dataclass
class StoreCount:
    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


@dataclass
class GcReport:
    """What a GC run deleted (or, dry run, would delete), and what it kept for running jobs."""

    dry_run: bool
    object_store: StoreCount = field(default_factory=StoreCount)  # artifacts deleted from the bucket
    torn_uploads: StoreCount = field(default_factory=StoreCount)  # chunk sets no object names
    local_root: StoreCount = field(default_factory=StoreCount)  # files deleted under the local root
    cache_entries: int = 0  # stage cache entries removed (KV and files)
    job_histories: int = 0  # finished jobs whose events were purged
    event_messages: int = 0  # event messages those held
    job_records: int = 0  # job records (KV cb_jobs) removed
    kept_for_unfinished_jobs: int = 0  # artifacts kept because an unfinished job references them
    object_store_bytes_before: int | None = None
    object_store_bytes_after: int | None = None  # measured on the stream (None: dry run / no bus)
    skipped: list[str] = field(default_factory=list)  # parts not collected, and why

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        parts = [
            f"{self.object_store.count} objects ({_size(self.object_store.bytes)})",
            f"{self.local_root.count} local files ({_size(self.local_root.bytes)})",
            f"{self.torn_uploads.count} torn uploads ({_size(self.torn_uploads.bytes)})",
            f"{self.cache_entries} cache entries",
            f"events of {self.job_histories} jobs ({self.event_messages} messages)",
            f"{self.job_records} job records",
        ]
        line = f"gc {verb}: " + ", ".join(parts) + f"; kept {self.kept_for_unfinished_jobs} artifacts unfinished jobs need"
        for reason in self.skipped:
            line += f"\nskipped: {reason}"
        return line


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def job_refs(state: JobState) -> list[ArtifactRef]:
    refs = [state.spec.input, *state.outputs.values()]
    for node in state.nodes.values():
        refs.extend(node.outputs.values())
    return refs


class Needs:
    """key -> until when it is needed (FOREVER: an unfinished job references it)."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}

    def need(self, key: str, until: float) -> None:
        if until > self.until.get(key, -math.inf):
            self.until[key] = until

    def get(self, key: str) -> float | None:
        return self.until.get(key)


def private_runs(settings) -> list[int]:
    """pids of `captionbus run`s on this host with a private bus (captionbus/stack.py)."""
    alive = []
    try:
        entries = list(os.scandir(settings.nats_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith("run-") and entry.name[4:].isdigit():
            pid = int(entry.name[4:])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass
            alive.append(pid)
    return alive


class Collector:
    """One GC run. `js`: the bus (None: local root only, nothing known about jobs — then only
    unreferenced-artifact rules apply). `now` is injectable so a test can age things."""

    def __init__(self, settings, js=None, *, dry_run: bool = False, now: float | None = None,
                 bus: bool = True, local: bool = True):
        self.settings = settings
        self.js = js
        self.dry_run = dry_run
        self.now = now if now is not None else datetime.now(timezone.utc).timestamp()
        self.bus = bus and js is not None
        self.local = local
        self.report = GcReport(dry_run=dry_run)
        self.needs = Needs()
        self.unfinished: set[str] = set()
        self.cache_live: dict[str, dict[str, Any]] = {}  # artifact key -> {cache entry id: async remover}
        self.evicting: dict[str, Any] = {}  # cache entries the size limit removes this run
        self.evicted: set[str] = set()

    async def run(self) -> GcReport:
        s = self.settings
        if self.js is not None:
            await self._jobs()
        else:
            self.report.skipped.append("no NATS server: job state unknown; local files judged by their age alone")
        cache_dying: set[str] = set()
        if self.bus and s.use_object_store():
            cache_dying |= await self._kv_cache()
        if self.local:
            cache_dying |= await self._file_cache()
        for key in cache_dying:  # kept this run; see the module docstring
            self.needs.need(key, self.now + 1)
        self.report.kept_for_unfinished_jobs = len(self.unfinished)
        if self.bus and s.use_object_store():
            await self._object_store()
        if self.local:
            runs = private_runs(s)
            if runs:
                self.report.skipped.append(
                    f"local artifact root {s.artifacts_dir}: `captionbus run` (pid {', '.join(map(str, runs))}) "
                    "is running with a private bus whose jobs this GC cannot see")
            else:
                await self._local_root()
        await self._evict_cache_entries()
        return self.report

    # ---- what is needed -------------------------------------------------------------------

    async def _jobs(self) -> None:
        kv = await self.js.key_value(subjects.JOBS_BUCKET)
        try:
            keys = await kv.keys()
        except Exception:  # NoKeysError: no jobs
            keys = []
        s = self.settings
        for key in keys:
            try:
                entry = await kv.get(key)
                state = JobState.model_validate_json(entry.value)
            except Exception as e:  # deleted meanwhile, or a record we cannot read: keep what it holds
                log.debug("job record unreadable; skipped", job_id=key, error=str(e)[:200])
                continue
            if not state.status.finished:
                for ref in job_refs(state):
                    self.needs.need(ref.key, FOREVER)
                    self.unfinished.add(ref.key)
                continue
            finished = state.updated_at.timestamp()
            for ref in job_refs(state):
                self.needs.need(ref.key, finished + s.retention_outputs)
            if not self.bus:
                continue
            if self.now - finished > s.retention_events:
                await self._purge_events(state.job_id)
                if self.now - finished > s.retention_outputs:
                    self.report.job_records += 1
                    if not self.dry_run:
                        await kv.purge(state.job_id)

    async def _purge_events(self, job_id: str) -> None:
        subject = f"{subjects.PREFIX}.job.{job_id}.>"
        info = await self.js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subject)
        held = sum((info.state.subjects or {}).values())
        if not held:
            return
        self.report.job_histories += 1
        self.report.event_messages += held
        if not self.dry_run:
            await self.js.purge_stream(subjects.EVENTS_STREAM, subject=subject)

    async def _cache_entry(self, entry_id: str, data: bytes, written: float | None, remove) -> set[str]:
        """Needs from one cache entry (`remove`: an async call that deletes it); returns the
        artifact keys of an entry removed now (expired)."""
        try:
            outputs = [ArtifactRef.model_validate(r) for r in json.loads(data)["outputs"].values()]
        except Exception:
            outputs = []
        written = written if written is not None else self.now
        if self.now - written <= self.settings.retention_cache:
            for ref in outputs:
                self.needs.need(ref.key, written + self.settings.retention_cache)
                self.cache_live.setdefault(ref.key, {})[entry_id] = remove
            return set()
        self.report.cache_entries += 1
        if not self.dry_run:
            await remove()
        return {ref.key for ref in outputs}

    async def _kv_cache(self) -> set[str]:
        try:
            kv = await self.js.key_value(subjects.STAGE_CACHE_BUCKET)
            keys = await kv.keys()
        except Exception:  # no bucket (an older bus) or no entries
            return set()
        dying: set[str] = set()
        stream = f"KV_{subjects.STAGE_CACHE_BUCKET}"
        for key in keys:
            try:
                msg = await self.js.get_last_msg(stream, f"$KV.{subjects.STAGE_CACHE_BUCKET}.{key}")
            except Exception:
                continue
            dying |= await self._cache_entry(f"kv:{key}", msg.data, _ts(msg.time), lambda k=key: kv.purge(k))
        return dying

    async def _file_cache(self) -> set[str]:
        dying: set[str] = set()
        folder = self.settings.home / "stage-cache"
        try:
            entries = [e for e in os.scandir(folder) if e.name.endswith(".json")]
        except FileNotFoundError:
            return dying
        for entry in entries:
            try:
                data = Path(entry.path).read_bytes()
                written = entry.stat().st_mtime
            except OSError:
                continue

            async def remove(path: str = entry.path) -> None:
                _unlink(path)

            dying |= await self._cache_entry(f"file:{entry.path}", data, written, remove)
        return dying

    async def _evict_cache_entries(self) -> None:
        """The live cache entries whose artifacts the size limit chose: removed now, their
        artifacts next run (the same two steps as an expired entry's)."""
        for entry_id, remove in list(self.evicting.items()):
            if entry_id in self.evicted:
                continue
            self.evicted.add(entry_id)
            self.report.cache_entries += 1
            if not self.dry_run:
                await remove()

    # ---- what may go ----------------------------------------------------------------------

    def _verdicts(self, items: list[tuple[str, int, float]], unreferenced_s: float) -> list[tuple[str, int]]:
        """(key, size, written) -> the (key, size) to delete: age rules, then the size limit.
        `unreferenced_s`: how long an artifact no job or cache entry references is kept."""
        s = self.settings
        doomed, kept = [], []
        for key, size, written in items:
            until = self.needs.get(key)
            if until is None:
                until = written + unreferenced_s
            if until >= self.now:
                kept.append((key, size, written, until))
            else:
                doomed.append((key, size))
        limit = s.artifacts_max_bytes
        total = sum(size for _, size, _, _ in kept)
        if limit and total > limit:
            # Oldest first: by when they stop being needed; never an unfinished job's, never
            # one inside its grace period.
            evictable = sorted(
                (k for k in kept if k[3] != FOREVER and self.now - k[2] > s.retention_grace
                 and k[0] not in self.unfinished),
                key=lambda k: k[3])
            for key, size, _, _ in evictable:
                if total <= limit:
                    break
                entries = self.cache_live.get(key)
                if entries:  # a live cache entry's: the entry goes now, the bytes next run
                    self.evicting.update(entries)
                else:
                    doomed.append((key, size))
                total -= size
        return doomed

    async def _object_store(self) -> None:
        bucket = ObjectBucket(self.js, subjects.ARTIFACTS_BUCKET)
        before = await self.js.stream_info(bucket.stream)
        self.report.object_store_bytes_before = before.state.bytes
        objects = await bucket.list_objects()
        by_key = {o.name: (o, seq) for o, seq in objects}
        items = [(o.name, o.size or 0, _ts(o.mtime) or self.now) for o, _ in objects]
        for key, size in self._verdicts(items, self.settings.retention_grace):
            if self.dry_run or await bucket.delete(*by_key[key]):  # False: stored again meanwhile
                self.report.object_store.add(size)
        live = {o.nuid for o, _ in objects}
        for nuid, chunks in (await bucket.chunk_sets()).items():
            if nuid in live:
                continue
            first = _ts(await bucket.first_chunk_time(nuid))
            if first is None or self.now - first <= self.settings.retention_grace:
                continue  # an upload in progress publishes its metadata last
            self.report.torn_uploads.add(chunks * bucket.chunk_size())  # an upper bound
            if not self.dry_run:
                await bucket.purge_chunk_set(nuid)
        if not self.dry_run:
            self.report.object_store_bytes_after = (await self.js.stream_info(bucket.stream)).state.bytes

    async def _local_root(self) -> None:
        root = Path(self.settings.artifacts_dir)
        items, paths, mtimes = [], {}, {}
        try:
            shards = [d for d in os.scandir(root) if d.is_dir() and len(d.name) == 2]
        except FileNotFoundError:
            return
        for shard in shards:
            for entry in os.scandir(shard.path):
                if len(entry.name) != 64 or not entry.name.startswith(shard.name):
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue
                items.append((entry.name, st.st_size, st.st_mtime))
                paths[entry.name] = entry.path
                mtimes[entry.name] = st.st_mtime
        # With local artifacts (one host), the jobs of a `captionbus run` lived on a private bus
        # that is gone: their files are referenced by nothing we can see, so unreferenced files
        # get the finished jobs' retention. With the object store the root only caches it.
        s = self.settings
        unreferenced = s.retention_grace if s.use_object_store() else max(s.retention_grace, s.retention_outputs)
        for key, size in self._verdicts(items, unreferenced):
            if not self.dry_run:
                try:  # stored again since it was listed (a new job's input): keep it
                    if os.stat(paths[key]).st_mtime != mtimes[key]:
                        continue
                except FileNotFoundError:
                    continue
                _unlink(paths[key])
            self.report.local_root.add(size)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def collect(settings, js=None, *, dry_run: bool = False, now: float | None = None,
                  bus: bool = True, local: bool = True) -> GcReport:
    """One GC run; see the module docstring."""
    report = await Collector(settings, js, dry_run=dry_run, now=now, bus=bus, local=local).run()
    log.info("gc finished", dry_run=dry_run, objects=report.object_store.count,
             object_bytes=report.object_store.bytes, local_files=report.local_root.count,
             local_bytes=report.local_root.bytes, cache_entries=report.cache_entries,
             job_histories=report.job_histories, job_records=report.job_records)
    return report
