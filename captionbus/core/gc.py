"""Bounded storage: retention of artifacts, the stage cache and job history, and the GC that
enforces it (`captionbus gc [--dry-run] [--json]`).

What is kept, and for how long (`captionbus.core.settings`, CAPTIONBUS_RETENTION_* / _ARTIFACTS_MAX_BYTES):
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

Failures (issue 18): a run reads everything before it deletes anything, and a read that fails
stops it there (`GcError`: "gc stopped before deleting anything: cannot read ..."), never read as
"nothing referenced" — before, a listing that timed out after a network blip made a dry run name
all 114 objects of a fleet's store, completed jobs inside retention included. Malformed records are
skipped and reported (one garbage metadata message used to make every run exit 2). See `Collector`.

Races, and how they are closed: an object is deleted by a purge of its meta subject up to the
message this run listed, then of its chunks (`ObjectBucket.delete`: an object stored again meanwhile
keeps its new meta and is re-uploaded), a stage cache entry by a purge of its key up to the revision
read (a value written since stays), a job record by a purge marker the server takes only while the
value read is the key's last (a record rewritten since, a retried job, stays with its parts; see
`Collector._purge_job`), a job's events up to the last one listed (a retried job's new events
stay), and a local file only if its
mtime is unchanged, so an artifact stored again meanwhile (a new job's input: storing refreshes
the time) survives. The size limit evicts a live cache entry's artifact in two steps too: the
entry now, the bytes next run, so a worker that reused the entry a moment ago still finds them.
Just before the first deletion every finished job a deletion relies on is read again: one
rewritten since the listing (a retry runs it again, on the same input) keeps its artifacts and
events this run (`Collector._rewritten_since_listed`).

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

import asyncio
import json
import math
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.js import api

from captionbus.contracts import ArtifactRef, JobState, subjects
from captionbus.core.artifacts.transfer import ObjectBucket, connection
from captionbus.core.artifacts.transfer import timestamp as _ts
from captionbus.core.tenancy import LIST_TIMEOUT_S

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
    job_records: int = 0  # job records (KV cb_jobs) removed, each with its parts
    orphan_parts: int = 0  # jobs whose record was gone and whose record parts (subjects.job_part_key) were removed
    kept_for_unfinished_jobs: int = 0  # artifacts kept because an unfinished job references them
    object_store_bytes_before: int | None = None
    object_store_bytes_after: int | None = None  # measured on the stream (None: dry run / no bus)
    skipped: list[str] = field(default_factory=list)  # parts not collected, and why
    malformed: list[str] = field(default_factory=list)  # records that did not parse: skipped, kept
    deletions: list[dict[str, Any]] = field(default_factory=list)  # {kind, name, bytes}, in order made
    error: str | None = None  # why the run stopped (then the counts are what it did before)

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
            f"the leftover record parts of {self.orphan_parts} jobs",
        ]
        line = f"gc {verb}: " + ", ".join(parts) + f"; kept {self.kept_for_unfinished_jobs} artifacts unfinished jobs need"
        for reason in self.skipped:
            line += f"\nskipped: {reason}"
        for record in self.malformed:
            line += f"\nmalformed, skipped and kept: {record}"
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


class GcError(Exception):
    """A GC run that stopped. `report` holds what it did before: nothing when a listing or read
    failed (those all come before the first delete), else every deletion made until the failure.
    `bus`: the cause was the NATS server (unreachable, timed out, refused) rather than this host."""

    def __init__(self, reason: str, report: GcReport, *, bus: bool):
        done = len(report.deletions)
        when = "before deleting anything" if done == 0 or report.dry_run else f"after {done} deletions"
        super().__init__(f"gc stopped {when}: {reason}")
        self.report = report
        self.bus = bus
        report.error = str(self)


_BUS_ERRORS = (nats.errors.Error, nats.js.errors.Error, TimeoutError, ConnectionError)
HEX_KEY = re.compile(rb"[0-9a-f]{64}")  # an artifact key (sha256 hex) anywhere in unparsable bytes
_KV_GONE = ("DEL", "PURGE")


def _salvage(data: bytes) -> set[str]:
    """The artifact keys a record we cannot parse may reference: every 64-hex run in its bytes.
    Keeping too much is safe; keeping too little deletes what someone needs."""
    return {m.decode() for m in HEX_KEY.findall(data or b"")}


@dataclass
class _Object:
    info: Any  # nats ObjectInfo
    seq: int  # stream sequence of its metadata message (a delete is made only if still the last)


@dataclass
class _Deletion:
    kind: str  # object | torn upload | local file | cache entry | events | job record
    name: str
    size: int
    act: Callable[[], Awaitable[bool]]  # False: changed since it was listed, so left alone
    count: Callable[[], None]  # adds it to the report's counters
    jobs: frozenset[str] = frozenset()  # KV cb_jobs keys of the finished jobs whose listing let it go


class Collector:
    """One GC run, in three steps so that a failure can never be read as "nothing referenced":

    1. **read** everything that decides (job records, stage cache entries, object metadata, chunk
       sets, local files, event counts). Any listing or read error raises GcError here, before a
       single delete. "Not there" is an answer only where the server says so (a key purged
       between list and read, a bucket that was never made); a timeout or a refused request is
       never an empty list. Listings are paged (nats-server sends at most 100 000 subjects per
       stream-info reply) and checked against the server's total.
    2. **decide**: which of what was read goes, a pure function of the listing and `now` — the
       same for a dry run and a real run over the same state.
    3. **delete** what was decided, each deletion logged (and passed to `on_delete`) as it is made;
       a failure part-way raises GcError whose report says what was already deleted.

    Malformed records (a job record, cache entry or object metadata that does not parse: one
    client can publish garbage on `$O.<bucket>.M.*`) are skipped and listed in `report.malformed`,
    never fatal; the artifact keys their bytes contain are kept (for a job record, as if its job
    were unfinished), and a chunk set whose id appears in malformed metadata is not purged.

    `js`: the bus (None: local root only, nothing known about jobs — then only the unreferenced-
    artifact rules apply). `now` is injectable so a test can age things."""

    def __init__(self, settings, js=None, *, dry_run: bool = False, now: float | None = None,
                 bus: bool = True, local: bool = True,
                 on_delete: Callable[[str, str, int, bool], None] | None = None):
        self.settings = settings
        self.js = js
        self.dry_run = dry_run
        self.now = now if now is not None else datetime.now(timezone.utc).timestamp()
        self.bus = bus and js is not None
        self.local = local
        self.on_delete = on_delete
        self.report = GcReport(dry_run=dry_run)
        self.needs = Needs()
        self.unfinished: set[str] = set()
        self.cache_live: dict[str, dict[str, str]] = {}  # artifact key -> {cache entry id: entry name}
        self.cache_remove: dict[str, Callable[[], Awaitable[bool]]] = {}  # cache entry id -> remover
        self.plan: list[_Deletion] = []
        self.evicting: dict[str, str] = {}  # live cache entries the size limit takes: id -> name
        self.bucket: ObjectBucket | None = None
        # what step 1 read, for step 2
        self.objects: dict[str, _Object] = {}
        self.malformed_raw: list[bytes] = []
        self.chunk_sets: dict[str, int] = {}
        self.chunk_first: dict[str, float | None] = {}
        self.local_files: list[tuple[str, int, float, str]] = []  # key, size, mtime, path
        self.record_seqs: dict[str, int] = {}  # KV cb_jobs key -> the sequence of the value read
        self.released: dict[str, set[str]] = {}  # artifact key -> the finished jobs (record keys) naming it
        self.finished_at: dict[str, tuple[str, float]] = {}  # record key -> (job id, when it finished)

    async def run(self) -> GcReport:
        try:
            await self._read()
        except GcError:
            raise
        except Exception as e:
            raise GcError(f"cannot read {self._reading}: {_reason(e)}", self.report,
                          bus=isinstance(e, _BUS_ERRORS)) from e
        self._decide()
        await self._delete()
        return self.report

    # ---- 1. read ----------------------------------------------------------------------------

    _reading = "the bus"

    async def _read(self) -> None:
        s = self.settings
        if self.js is not None:
            self._reading = f"job records (KV {subjects.JOBS_BUCKET})"
            await self._jobs()
        else:
            self.report.skipped.append("no NATS server: job state unknown; local files judged by their age alone")
        if self.bus and s.use_object_store():
            self._reading = f"the stage cache (KV {subjects.STAGE_CACHE_BUCKET})"
            await self._kv_cache()
        if self.local:
            self._reading = f"the file stage cache ({s.home / 'stage-cache'})"
            await self._file_cache()
        self.report.kept_for_unfinished_jobs = len(self.unfinished)
        if self.bus and s.use_object_store():
            self._reading = f"the object store (stream OBJ_{subjects.ARTIFACTS_BUCKET})"
            await self._list_objects()
        if self.local:
            runs = private_runs(s)
            if runs:
                self.report.skipped.append(
                    f"local artifact root {s.artifacts_dir}: `captionbus run` (pid {', '.join(map(str, runs))}) "
                    "is running with a private bus whose jobs this GC cannot see")
            else:
                self._reading = f"the local artifact root ({s.artifacts_dir})"
                self._list_local_root()

    async def _subjects(self, stream: str, pattern: str) -> dict[str, int]:
        """subject -> messages, for every subject of `stream` matching `pattern`: all pages,
        checked against the total the server reports."""
        return await list_subjects(self.js, stream, pattern)

    async def _kv_entries(self, bucket: str) -> dict[str, Any]:
        """key -> its last message, for every live key of KV `bucket` (deleted/purged left out)."""
        stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
        found = {}
        for subject in await self._subjects(stream, f"{prefix}>"):
            msg = await _last_or_none(self.js, stream, subject)
            if msg is None:  # purged since the listing: gone, an answer
                continue
            if (msg.headers or {}).get("KV-Operation") in _KV_GONE:
                continue
            found[subject[len(prefix):]] = msg
        return found

    def _malformed(self, what: str, error: Exception) -> None:
        line = f"{what}: {_reason(error)[:160]}"
        self.report.malformed.append(line)
        log.warning("gc: malformed record skipped", record=what, error=_reason(error)[:300])

    async def _job_entries(self) -> dict[str, bytes]:
        """key -> value of every live key of KV cb_jobs. The listing (paged, checked against the
        server's count) says which keys there are; one ordered consumer (nats-py's `watchall`: the
        last message of each key) delivers their values at once, where a get per key cost ~1.4 ms
        (a 2-hour film's record has ~250 parts: a dry run over 10 such films, 2500 keys, took
        3.6 s with a get per key, 0.8 s so). A listed key it did not deliver is read alone."""
        stream, prefix = f"KV_{subjects.JOBS_BUCKET}", f"$KV.{subjects.JOBS_BUCKET}."
        listed = [subject[len(prefix):] for subject in await self._subjects(stream, f"{prefix}>")]
        delivered: dict[str, Any] = {}
        if listed:
            watcher = await (await self.js.key_value(subjects.JOBS_BUCKET)).watchall()
            try:
                async with asyncio.timeout(LIST_TIMEOUT_S + len(listed) / 1000):
                    async for entry in watcher:
                        if entry is None:  # the end of the values held
                            break
                        delivered[entry.key] = entry
            finally:
                await watcher.stop()
        found = {}
        for key in listed:
            entry = delivered.get(key)
            if entry is None:
                msg = await _last_or_none(self.js, stream, prefix + key)
                if msg is None:  # purged since the listing: gone, an answer
                    continue
                if (msg.headers or {}).get("KV-Operation") not in _KV_GONE:
                    found[key], self.record_seqs[key] = msg.data, msg.seq
            elif entry.operation not in _KV_GONE and entry.value is not None:
                found[key], self.record_seqs[key] = entry.value, entry.revision
        return found

    async def _jobs(self) -> None:
        s = self.settings
        # The events stream's last sequence before any record is read: a finished job's events are
        # purged up to it, so what is published after (a retry's new history) stays.
        events_last = await self._events_last_seq() if self.bus else 0
        entries = await self._job_entries()
        parts: dict[str, dict[str, bytes]] = {}  # job id -> part name -> bytes (subjects.job_part_key)
        for key, value in entries.items():
            if not subjects.is_job_key(key):
                parts.setdefault(subjects.job_id_of_part_key(key), {})[key.rpartition(".")[2]] = value
        for job_id in parts.keys() - {subjects.job_id_of_key(k) for k in entries if subjects.is_job_key(k)}:
            # Parts whose record is gone: a run that stopped between the two, or a part written
            # after a run purged its job's parts (a coordinator that read the record before).
            self._plan("record parts", f"{job_id} ({len(parts[job_id])} keys, no record)", 0,
                       lambda j=job_id: self._purge_orphan_parts(j), self._count_orphan_parts)
        for job_id, value in entries.items():
            if not subjects.is_job_key(job_id):
                continue
            own = parts.get(subjects.job_id_of_key(job_id), {})
            # Only what was read counts as malformed (a record or a part that does not parse, a
            # part it names that the bus does not hold); a read of a part that fails (a timeout,
            # a refusal, a reconnect) is a failed read: it stops the run (GcError), before any
            # delete, as every other read here does.
            try:
                head = JobState.model_validate_json(value)
                named = head.part_keys()
            except Exception as e:
                self._keep_malformed(job_id, value, own, e)
                continue
            own = {**own, **await self._late_parts(named, own)}  # outside: a failed read raises
            try:
                state = head.with_parts(own)
            except Exception as e:  # MissingParts, a part that does not parse or match its name
                self._keep_malformed(job_id, value, own, e)
                continue
            if not state.status.finished:
                for ref in job_refs(state):
                    self.needs.need(ref.key, FOREVER)
                    self.unfinished.add(ref.key)
                continue
            finished = state.updated_at.timestamp()
            self.finished_at[job_id] = (state.job_id, finished)
            for ref in job_refs(state):
                self.needs.need(ref.key, finished + s.retention_outputs)
                self.released.setdefault(ref.key, set()).add(job_id)
            if not self.bus or self.now - finished <= s.retention_events:
                continue
            subject = subjects.job_events(state.job_id)
            held = sum((await self._subjects(subjects.EVENTS_STREAM, subject)).values())
            if held and events_last:
                self._plan("events", f"{state.job_id} ({held} messages)", 0,
                           lambda subj=subject, seq=events_last: self._purge_events(subj, seq),
                           lambda n=held: self._count_events(n), jobs=frozenset({job_id}))
            if self.now - finished > s.retention_outputs:
                self._plan("job record", state.job_id, 0,
                           lambda j=state.job_id, seq=self.record_seqs[job_id]: self._purge_job(j, seq),
                           self._count_job_record, jobs=frozenset({job_id}))

    def _keep_malformed(self, job_id: str, value: bytes, own: dict[str, bytes], error: Exception) -> None:
        """A job record that does not parse, or whose parts do not: cannot tell finished from
        not, so whatever it names is kept, always."""
        self._malformed(f"job record {job_id}", error)
        for key in _salvage(value + b"".join(own.values())):
            self.needs.need(key, FOREVER)
            self.unfinished.add(key)

    async def _late_parts(self, named: dict[str, str], own: dict[str, bytes]) -> dict[str, bytes]:
        """The parts a record names (`named`: name -> key, JobState.part_keys) that the listing
        lacks, read now: written after the listing, the record read after it. A part the server
        says it holds no message for is left out (then JobState.with_parts raises MissingParts:
        malformed); any other failed read raises, as every read of step 1 does."""
        late = {}
        for name, key in named.items():
            if name in own:
                continue
            msg = await _last_or_none(self.js, f"KV_{subjects.JOBS_BUCKET}", f"$KV.{subjects.JOBS_BUCKET}.{key}")
            if msg is not None and (msg.headers or {}).get("KV-Operation") not in _KV_GONE:
                late[name] = msg.data
        return late

    async def _retry_pending(self, job_id: str, finished: float) -> bool:
        """Whether the job's last `retry_requested` event (`captionbus retry` publishes it; the
        coordinator then rewrites the record, running again) is newer than its finished record:
        a retry the coordinator has not applied yet (down, restarting, behind) still needs the
        job's input and history. Asked once per job a deletion relies on, just before the first
        deletion (`_rewritten_since_listed`), not for every finished job listed. Only with the bus's own rights (the gc user may read CB_EVENTS'
        messages); `--local-only` relies on the record's re-read alone. The two times come from
        the client's clock and the coordinator's; an event that does not parse counts as pending."""
        if not self.bus:
            return False
        msg = await _last_or_none(self.js, subjects.EVENTS_STREAM, subjects.job_event(job_id, "retry_requested"))
        if msg is None:
            return False
        try:
            asked = datetime.fromisoformat(json.loads(msg.data)["time"]).timestamp()
        except (ValueError, KeyError, TypeError):
            return True
        return asked >= finished

    async def _events_last_seq(self) -> int:
        """CB_EVENTS' last sequence now (0: the server says there is no such stream yet)."""
        try:
            return (await self.js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
        except nats.js.errors.NotFoundError as e:
            if getattr(e, "err_code", None) != STREAM_NOT_FOUND:
                raise
            return 0

    async def _purge_events(self, subject: str, last_seq: int) -> bool:
        """The job's events up to CB_EVENTS' last sequence when this run began reading (`seq`
        purges those below it): an event published since (`captionbus retry` of the job, its new
        history) stays."""
        await self.js.purge_stream(subjects.EVENTS_STREAM, subject=subject, seq=last_seq + 1)
        return True

    def _count_events(self, held: int) -> None:
        self.report.job_histories += 1
        self.report.event_messages += held

    async def _purge_job(self, job_id: str, seq: int) -> bool:
        """The record if it is still the value this run read (`seq`), then every part of it
        (subjects.job_part_keys: one purge filtered on the job's part keys, so a part written
        after this run listed them goes too, and no deletion marker is left per part). The
        record's purge is kv.purge's marker (a rollup of the key) published with
        Nats-Expected-Last-Subject-Sequence: a record written since the listing (`captionbus
        retry` of an old failed job: running again) makes the server refuse it (err_code
        WRONG_LAST_SEQUENCE), and the record and its parts are kept ("changed since listed"), as
        a stage cache entry written since is. A run that stops between, or a coordinator that
        read the record before and writes a part after, leaves parts no record names: the next
        run removes them (`_purge_orphan_parts`)."""
        try:
            await self.js.publish(f"$KV.{subjects.JOBS_BUCKET}.{subjects.job_key(job_id)}", b"", headers={
                "KV-Operation": "PURGE", "Nats-Rollup": "sub", "Nats-Expected-Last-Subject-Sequence": str(seq)})
        except nats.js.errors.APIError as e:
            if getattr(e, "err_code", None) != WRONG_LAST_SEQUENCE:
                raise
            return False
        await self._purge_parts(job_id)
        return True

    async def _purge_parts(self, job_id: str) -> None:
        parts = subjects.job_part_keys(job_id)
        assert parts.endswith(f".{job_id}.>"), parts  # this job's parts, never a tenant's keys
        await self.js.purge_stream(f"KV_{subjects.JOBS_BUCKET}", subject=f"$KV.{subjects.JOBS_BUCKET}.{parts}")

    async def _purge_orphan_parts(self, job_id: str) -> bool:
        """The parts of a job whose record is gone, if it still is (read again now: a record is
        written before any part of it, so a part listed without its record had one that was
        removed, but the listing is not one instant). Gone only where the server says it holds
        no message for the key (`_last_or_none`); any other answer, a 404 for the stream
        included, raises and purges nothing."""
        msg = await _last_or_none(self.js, f"KV_{subjects.JOBS_BUCKET}",
                                  f"$KV.{subjects.JOBS_BUCKET}.{subjects.job_key(job_id)}")
        if msg is not None and (msg.headers or {}).get("KV-Operation") not in _KV_GONE:
            log.info("gc: a record came back for parts listed without one; kept", job_id=job_id)
            return False
        await self._purge_parts(job_id)
        return True

    def _count_job_record(self) -> None:
        self.report.job_records += 1

    def _count_orphan_parts(self) -> None:
        self.report.orphan_parts += 1

    def _count_cache_entry(self) -> None:
        self.report.cache_entries += 1

    def _cache_entry(self, entry_id: str, name: str, data: bytes, written: float | None,
                     remove: Callable[[], Awaitable[bool]]) -> None:
        """Needs from one cache entry; an expired one is planned for removal, and its artifacts
        kept this run (see the module docstring)."""
        try:
            keys = {ArtifactRef.model_validate(r).key for r in json.loads(data)["outputs"].values()}
        except Exception as e:
            self._malformed(f"stage cache entry {name}", e)
            keys = _salvage(data)
        written = written if written is not None else self.now
        self.cache_remove[entry_id] = remove
        if self.now - written <= self.settings.retention_cache:
            for key in keys:
                self.needs.need(key, written + self.settings.retention_cache)
                self.cache_live.setdefault(key, {})[entry_id] = name
            return
        self._plan("cache entry", name, 0, remove, self._count_cache_entry)
        for key in keys:  # kept this run; see the module docstring
            self.needs.need(key, self.now + 1)

    async def _kv_cache(self) -> None:
        try:
            entries = await self._kv_entries(subjects.STAGE_CACHE_BUCKET)
        except nats.js.errors.NotFoundError as e:
            if getattr(e, "err_code", None) != STREAM_NOT_FOUND:
                raise
            self.report.skipped.append(f"no stage cache bucket {subjects.STAGE_CACHE_BUCKET!r} on this bus")
            return
        for key, msg in entries.items():

            async def remove(k: str = key, seq: int = msg.seq) -> bool:
                # A filtered purge up to what was read, not kv.purge: that is a rollup, which the
                # bucket refuses (captionbus.core.bus.NO_ROLLUP_STREAMS), and it would also take a value
                # written since the listing.
                await self.js.purge_stream(f"KV_{subjects.STAGE_CACHE_BUCKET}",
                                           subject=f"$KV.{subjects.STAGE_CACHE_BUCKET}.{k}", seq=seq + 1)
                return True

            self._cache_entry(f"kv:{key}", f"kv:{key}", msg.data, _ts(msg.time), remove)

    async def _file_cache(self) -> None:
        folder = self.settings.home / "stage-cache"
        try:
            entries = [e for e in os.scandir(folder) if e.name.endswith(".json")]
        except FileNotFoundError:
            return
        for entry in entries:
            try:
                written = entry.stat().st_mtime
                data = Path(entry.path).read_bytes()
            except FileNotFoundError:  # removed since the listing (a worker replaced it)
                continue

            async def remove(path: str = entry.path) -> bool:
                _unlink(path)
                return True

            self._cache_entry(f"file:{entry.path}", entry.path, data, written, remove)

    async def _list_objects(self) -> None:
        """Every object as readers see it (`ObjectBucket.object_at`: its first live, consistent,
        complete meta message, never the subject's last one; its mtime that of its latest refresh;
        the subject's last sequence for `delete`). A writer may append tombstones or bogus metas
        after a real upload; gc must not read those as "deleted" (and purge the real chunks as a
        torn upload) any more than a fetch does."""
        bucket = ObjectBucket(self.js, subjects.ARTIFACTS_BUCKET)
        self.bucket = bucket
        self.report.object_store_bytes_before = (await self.js.stream_info(bucket.stream)).state.bytes
        meta_prefix = f"$O.{bucket.name}.M."
        chunk_prefix = bucket.chunk_subject("")
        self.chunk_sets = {s[len(chunk_prefix):]: n
                           for s, n in (await self._subjects(bucket.stream, f"{chunk_prefix}>")).items()}
        for subject, count in (await self._subjects(bucket.stream, f"{meta_prefix}>")).items():
            found = await bucket.object_at(subject, self.chunk_sets, count)
            if found is not None:
                info, seq = found
                self.objects[info.name] = _Object(info, seq)
                continue
            # Nothing readable under this subject: say why from its last message.
            msg = await _last_or_none(self.js, bucket.stream, subject)
            if msg is None:  # purged since the listing
                continue
            try:
                info = api.ObjectInfo.from_response(json.loads(msg.data))
                if not info.name or bucket._meta_subject(info.name) != subject:
                    raise ValueError(f"names object {info.name!r}, not the one its subject is for")
            except Exception as e:
                self._malformed(f"object metadata {subject} (seq {msg.seq})", e)
                self.malformed_raw.append(msg.data or b"")
            # else: a tombstone, or a meta whose chunks are gone: no bytes to keep or delete here
        live = {o.info.nuid for o in self.objects.values()}
        for nuid in self.chunk_sets:
            if nuid not in live:
                self.chunk_first[nuid] = _ts(await bucket.first_chunk_time(nuid))

    def _list_local_root(self) -> None:
        root = Path(self.settings.artifacts_dir)
        try:
            shards = [d for d in os.scandir(root) if d.is_dir() and len(d.name) == 2]
        except FileNotFoundError:
            return
        for shard in shards:
            try:
                entries = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for entry in entries:
                if len(entry.name) != 64 or not entry.name.startswith(shard.name):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                self.local_files.append((entry.name, st.st_size, st.st_mtime, entry.path))

    # ---- 2. decide --------------------------------------------------------------------------

    def _plan(self, kind: str, name: str, size: int, act: Callable[[], Awaitable[bool]],
              count: Callable[[], None], jobs: frozenset[str] = frozenset()) -> None:
        self.plan.append(_Deletion(kind, name, size, act, count, jobs))

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
                key=lambda k: (k[3], k[0]))
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

    def _decide(self) -> None:
        s = self.settings
        if self.bucket is not None:
            bucket = self.bucket
            items = [(k, o.info.size or 0, _ts(o.info.mtime) or self.now) for k, o in sorted(self.objects.items())]
            for key, size in self._verdicts(items, s.retention_grace):
                obj = self.objects[key]
                self._plan("object", key, size, lambda o=obj: bucket.delete(o.info, o.seq),
                           lambda n=size: self.report.object_store.add(n), self._released_by(key))
            for nuid, chunks in sorted(self.chunk_sets.items()):
                first = self.chunk_first.get(nuid, None)
                if nuid not in self.chunk_first or first is None or self.now - first <= s.retention_grace:
                    continue  # live, or an upload in progress (it publishes its metadata last)
                if any(nuid.encode() in raw for raw in self.malformed_raw):
                    continue  # named by metadata we cannot read: not ours to judge
                size = chunks * self.bucket.chunk_size()  # an upper bound
                self._plan("torn upload", nuid, size, lambda n=nuid: self._purge_chunks(n),
                           lambda n=size: self.report.torn_uploads.add(n))
        if self.local_files:
            # With local artifacts (one host), the jobs of a `captionbus run` lived on a private
            # bus that is gone: their files are referenced by nothing we can see, so unreferenced
            # files get the finished jobs' retention. With the object store the root only caches it.
            unreferenced = s.retention_grace if s.use_object_store() else max(s.retention_grace, s.retention_outputs)
            files = {key: (size, mtime, path) for key, size, mtime, path in self.local_files}
            for key, size in self._verdicts(sorted((k, v[0], v[1]) for k, v in files.items()), unreferenced):
                _, mtime, path = files[key]
                self._plan("local file", key, size, lambda p=path, m=mtime: self._unlink_unchanged(p, m),
                           lambda n=size: self.report.local_root.add(n), self._released_by(key))
        # The live cache entries whose artifacts the size limit chose: removed now, their
        # artifacts next run (the same two steps as an expired entry's).
        for entry_id, name in sorted(self.evicting.items()):
            self._plan("cache entry", name, 0, self.cache_remove[entry_id], self._count_cache_entry)

    def _released_by(self, key: str) -> frozenset[str]:
        """The finished jobs whose listing let artifact `key` go (none: nobody referenced it)."""
        return frozenset(self.released.get(key, ()))

    async def _purge_chunks(self, nuid: str) -> bool:
        await self.bucket.purge_chunk_set(nuid)
        return True

    @staticmethod
    async def _unlink_unchanged(path: str, mtime: float) -> bool:
        try:  # stored again since it was listed (a new job's input): keep it
            if os.stat(path).st_mtime != mtime:
                return False
        except FileNotFoundError:
            return False
        _unlink(path)
        return True

    # ---- 3. delete --------------------------------------------------------------------------

    _ORDER = ("object", "torn upload", "local file", "cache entry", "events", "job record", "record parts")

    async def _rewritten_since_listed(self) -> set[str]:
        """The finished jobs (record keys) a planned deletion relies on whose record is no longer
        the value listed, or whose retry was asked since (`_retry_pending`): `captionbus retry` of an
        old job between the listing and now runs it again on the same input, and its earlier
        events are its history. Their artifacts and
        events are kept this run (its record's purge is refused by the server anyway,
        `_purge_job`). Read once, just before the first deletion, so the window left is the
        deletions' own time (milliseconds to seconds), not the listing's; a failed read stops the
        run with nothing deleted, as in step 1."""
        wanted = sorted({job for d in self.plan for job in d.jobs})
        changed = set()
        for key in wanted:
            try:
                msg = await _last_or_none(self.js, f"KV_{subjects.JOBS_BUCKET}", f"$KV.{subjects.JOBS_BUCKET}.{key}")
                job_id, finished = self.finished_at[key]
                if (msg is not None and msg.seq != self.record_seqs.get(key)) or await self._retry_pending(job_id, finished):
                    changed.add(key)
            except Exception as e:
                raise GcError(f"cannot re-read job record {key} before deleting: {_reason(e)}", self.report,
                              bus=isinstance(e, _BUS_ERRORS)) from e
        return changed

    async def _delete(self) -> None:
        """Artifacts first, the records that reference them last: a run that stops part-way
        leaves references to nothing rather than artifacts referenced by nothing."""
        rewritten = set() if self.dry_run or self.js is None else await self._rewritten_since_listed()
        for d in sorted(self.plan, key=lambda d: self._ORDER.index(d.kind)):
            if d.jobs & rewritten:
                log.info("gc: kept, its job was rewritten since listed", kind=d.kind, name=d.name,
                         jobs=sorted(d.jobs & rewritten))
                continue
            if not self.dry_run:
                try:
                    done = await d.act()
                except Exception as e:
                    raise GcError(f"deleting {d.kind} {d.name}: {_reason(e)}", self.report,
                                  bus=isinstance(e, _BUS_ERRORS)) from e
                if not done:
                    log.info("gc: kept, changed since listed", kind=d.kind, name=d.name)
                    continue
            d.count()
            self.report.deletions.append({"kind": d.kind, "name": d.name, "bytes": d.size})
            log.info("gc would delete" if self.dry_run else "gc deleted", kind=d.kind, name=d.name, bytes=d.size)
            if self.on_delete is not None:
                self.on_delete(d.kind, d.name, d.size, self.dry_run)
        if not self.dry_run and self.report.object_store_bytes_before is not None:
            self.report.object_store_bytes_after = (await self.js.stream_info(self.bucket.stream)).state.bytes


STREAM_NOT_FOUND = 10059  # JetStream: "stream not found"
NO_MESSAGE = 10037  # JetStream: "no message found"
WRONG_LAST_SEQUENCE = 10071  # JetStream: a publish's Nats-Expected-Last-Subject-Sequence is not the subject's last
SUBJECTS_PAGE = 100_000  # nats-server's JSMaxSubjectDetails


async def _last_or_none(js, stream: str, subject: str):
    """The last message of `subject` in `stream`; None only when the server says it holds none
    (err_code NO_MESSAGE). Every other "not found" (the stream itself: STREAM_NOT_FOUND) and
    every other failure raises: a read that failed is never "no record"."""
    try:
        return await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError as e:
        if getattr(e, "err_code", None) != NO_MESSAGE:
            raise
        return None


async def list_subjects(js, stream: str, pattern: str) -> dict[str, int]:
    """subject -> messages for every subject of `stream` matching `pattern`. nats-py's
    stream_info returns one page (at most 100 000 subjects) and drops the paging fields, so this
    asks page by page and fails if what came is less than the server's total."""
    found: dict[str, int] = {}
    total = None
    while total is None or len(found) < total:
        req = {"subjects_filter": pattern, "offset": len(found)}
        msg = await connection(js).request(f"{js._prefix}.STREAM.INFO.{stream}", json.dumps(req).encode(),
                                           timeout=js._timeout)
        resp = json.loads(msg.data)
        if "error" in resp:
            raise nats.js.errors.APIError.from_error(resp["error"])
        page = (resp.get("state") or {}).get("subjects") or {}
        total = resp.get("total", len(page)) if total is None else total
        before = len(found)
        found.update(page)
        if len(found) == before:
            break
    if total and len(found) < total:
        raise GcListingIncomplete(f"listing {pattern} on {stream} returned {len(found)} of {total} subjects")
    return found


class GcListingIncomplete(Exception):
    pass


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def collect(settings, js=None, *, dry_run: bool = False, now: float | None = None,
                  bus: bool = True, local: bool = True,
                  on_delete: Callable[[str, str, int, bool], None] | None = None) -> GcReport:
    """One GC run; see the module docstring and `Collector`. Raises GcError (with the report so
    far) when a read fails (nothing deleted) or a delete fails (what went before is reported).
    `on_delete(kind, name, bytes, dry_run)` is called after each deletion is made."""
    report = await Collector(settings, js, dry_run=dry_run, now=now, bus=bus, local=local,
                             on_delete=on_delete).run()
    log.info("gc finished", dry_run=dry_run, objects=report.object_store.count,
             object_bytes=report.object_store.bytes, local_files=report.local_root.count,
             local_bytes=report.local_root.bytes, cache_entries=report.cache_entries,
             job_histories=report.job_histories, job_records=report.job_records)
    return report
