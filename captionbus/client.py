"""What a user-side process does on the bus: submit a job, follow its events, fetch outputs.

Used by the CLI; also the small API for people who drive captionbus from their own code.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import AsyncIterator, Callable

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, InvalidKeyError, KeyDeletedError, KeyNotFoundError, NotFoundError
from pydantic import ValidationError

from captionbus.contracts import (
    ArtifactRef,
    JobCancelRequested,
    JobRetryRequested,
    JobSpec,
    JobState,
    JobSubmitted,
    new_job_id,
    parse_event,
    subjects,
    tenant_of,
)
from captionbus.contracts.events import HISTORY_KINDS, REOPENING_KIND, STAGE_KINDS, TERMINAL_KINDS, History
from captionbus.contracts.languages import LANGUAGES
from captionbus.contracts.speech import TurnSummary
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import BusError, publish_event, record_keys, through_failover
from captionbus.core.discovery import collect_replies, merge_state, stage_workers  # noqa: F401  (re-exported)
from captionbus.core.tenancy import held, jobs_kv, last_per_key, named


class SubmitError(ValueError):
    """The job was refused before anything ran; the message says how to fix it."""


class NotForTenants(ValueError):
    """A read a tenant's login is not granted (deploy/README.md, "Tenancy on the bus"); the
    message says what it cannot show and why (an empty answer would say there is nothing)."""


# The tenant this process acts for (deploy/README.md, "Tenancy on the bus"): set by the CLI when it
# logs in through the auth callout as a client (captionbus.core.bus.client_tenant). Then job ids
# are made in the tenant (`<tenant>_<id>`), and every read names the tenant in its subject:
# direct gets by key, consumers on the filtered-create subject, listings of the tenant's keys
# only (captionbus.core.tenancy), which is all the callout lets such a login do. None: a trusted
# role (the gateway, dashboards, `run` on one host) that reads every job.
TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("captionbus_tenant", default=None)


@contextlib.contextmanager
def acting_for(tenant: str | None):
    token = TENANT.set(tenant)
    try:
        yield
    finally:
        TENANT.reset(token)


def _consumer(config: ConsumerConfig) -> ConsumerConfig:
    """A consumer of the events stream: created on the named-create subject, as every reader's
    is (the unnamed one is granted to no role: deploy/nats/roles.conf, COORDINATOR_CONSUMERS), and
    a tenant's on the filtered one (captionbus.core.tenancy)."""
    return named(config)


def check_input_file(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise SubmitError(f"{path}: no such file")
    if not path.is_file():
        raise SubmitError(f"{path}: not a regular file")
    return path.resolve()


async def submit(
    js: JetStreamContext,
    store: ArtifactStore,
    media: Path,
    *,
    workflow: str = "transcribe",
    source_language: str | None = None,
    target_languages: list[str] | None = None,
    options: dict | None = None,
    job_id: str | None = None,
    name: str | None = None,
    copy: bool = True,
    owner: str | None = None,
    owner_proof: Callable[[JobSpec], str] | None = None,
    speaker_refs: dict[str, Path] | None = None,
) -> JobSpec:
    """`name`: the input's name when `media` is a temp file (an HTTP upload); `copy=False` lets
    the store hardlink a file nobody will edit afterwards; `owner`: the gateway key submitting it,
    and `owner_proof(spec)` its proof (the gateway's KeyRing.proof);
    `speaker_refs`: known speakers, name -> a reference clip already checked and converted
    (captionbus.core.speaker_refs.convert), uploaded as artifacts the diarization params name."""
    media = check_input_file(media)
    tenant = TENANT.get()
    if job_id and tenant and tenant_of(job_id) != tenant:
        raise SubmitError(f"job id {job_id!r} is not of your tenant {tenant!r}: start it with {tenant}_")
    store = artifacts_of(store, job_id)
    # Through a stream leader's failover (captionbus.core.bus.through_failover): both steps are idempotent,
    # the artifact key is the content hash and the event's Nats-Msg-Id its event id.
    ref = await through_failover(lambda: store.put(media, name=name or media.name, copy=copy), "upload")
    if speaker_refs:
        options = with_references(options or {}, {
            speaker: await through_failover(lambda clip=clip: store.put(clip, name=clip.name), "upload")
            for speaker, clip in speaker_refs.items()})
    job_id = job_id or new_job_id(tenant)
    spec = JobSpec(
        job_id=job_id,
        workflow=workflow,
        input=ref,
        source_language=source_language,
        target_languages=target_languages or [],
        options=options or {},
        owner=owner,
    )
    if owner_proof is not None:
        spec = spec.model_copy(update={"owner_proof": owner_proof(spec)})
    event = JobSubmitted(job_id=spec.job_id, spec=spec)
    await through_failover(lambda: publish_event(js, event), "submit")
    return spec


def with_references(options: dict, refs: dict[str, ArtifactRef]) -> dict:
    """`options` with the diarization stage's `references` (name -> uploaded clip) set, and the
    stage switched on (`speakers`: auto unless given): a known speaker needs diarization."""
    diarization = dict(options.get("diarization") or {})
    diarization.setdefault("speakers", "auto")
    diarization["references"] = {speaker: ref.model_dump(mode="json") for speaker, ref in refs.items()}
    return {**options, "diarization": diarization}


async def cancel(js: JetStreamContext, job_id: str) -> None:
    event = JobCancelRequested(job_id=job_id)  # one event id: a retried publish is deduplicated
    await through_failover(lambda: publish_event(js, event), "cancel")


async def retry(js: JetStreamContext, job_id: str) -> None:
    event = JobRetryRequested(job_id=job_id)
    await through_failover(lambda: publish_event(js, event), "retry")


def bus_reason(error: BaseException) -> str:
    """The server's own words for a failed request: `jetstream system temporarily unavailable
    (503)`, `timeout`, `no responders available for request`."""
    if isinstance(error, APIError) and error.description:
        return f"{error.description} ({error.code})" if error.code else error.description
    return str(error).removeprefix("nats: ").strip() or type(error).__name__


# How long a read keeps trying before the command says why it cannot answer (CLI exit 4). A leader
# election took 3-4 s in the chaos run, and reads failed for 8-10 s after a cut host healed.
READ_WINDOW_S = 20.0


async def read(step, what: str, window_s: float = READ_WINDOW_S):
    """`await step()`, a read of the bus, retried through a stream leader's election
    (captionbus.core.bus.through_failover) for at most `window_s`, then a BusError naming what could not be
    read and the server's last reason (CLI exit 4). Never an empty answer instead: `captionbus
    jobs --json` printed 0 jobs with exit 0 while 37 existed, for 8-10 s after a cluster host
    healed (issue 18), when every failed read here became "nothing"."""
    errors: list[BaseException] = []

    async def attempt():
        try:
            return await step()
        except Exception as e:
            errors.append(e)
            raise

    try:
        async with asyncio.timeout(window_s):
            return await through_failover(attempt, what)
    except BusError:
        raise
    except TimeoutError as e:  # the window closed, or nats' own last timeout (also a TimeoutError)
        raise BusError(f"{what}: no answer from NATS within {window_s:g} s "
                       f"(last: {bus_reason(errors[-1] if errors else e)})") from e
    except nats.errors.Error as e:
        raise BusError(f"{what}: {bus_reason(e)}") from e


async def job_head(js: JetStreamContext, job_id: str) -> JobState | None:
    """The job's record as stored, its completed nodes named and not read in (JobState.parts):
    its status, spec, outputs and open nodes, for a reader that shows no more (`job_state` reads
    the whole). None only when the bus says there is no such job. A direct get may be answered
    by any replica (the KV is `allow_direct`), and a replica that has just rejoined can lack
    recent keys: a "not found" is asked again of the stream's leader before it is believed."""

    try:
        key = subjects.job_key(job_id)
    except ValueError:  # not a job id at all (spaces, dots): no such job
        return None
    tenant = TENANT.get()
    if tenant and tenant_of(job_id) != tenant:  # not one of ours: the bus would refuse the read
        return None
    value = await read(lambda: _jobs_value(js, key), f"reading job {job_id}")
    return JobState.model_validate_json(value) if value else None


async def job_state(js: JetStreamContext, job_id: str) -> JobState | None:
    """The job's whole record: its head (`job_head`) with the completed nodes it names read in
    (`whole_record`), every node as the coordinator knows it. None only when the bus says there
    is no such job (also when gc removed it between the two reads); a part the bus lacks while
    the record is there is a RecordPartMissing, never a record short of nodes."""
    head = await job_head(js, job_id)
    if head is None or head.whole:
        return head
    try:
        return await whole_record(js, head)
    except RecordPartMissing:
        if await job_head(js, job_id) is None:  # collected (gc) between the reads: no such job now
            return None
        raise


PART_READS = 32  # reads of one record's parts at once


async def whole_record(js: JetStreamContext, state: JobState) -> JobState:
    """`state` with the completed nodes its record names by part (JobState.parts) read in, from
    the keys under the job's own (subjects.job_part_key), which every role that may read the
    record may read: one direct get each, PART_READS at once. A whole state is returned as it
    is. A failed read is a BusError, a named part the bus lacks a RecordPartMissing."""
    if state.whole:
        return state
    kv = jobs_kv(js) if TENANT.get() else await js.key_value(subjects.JOBS_BUCKET)
    reads = asyncio.Semaphore(PART_READS)

    async def get(name: str, key: str) -> tuple[str, bytes]:
        async with reads:
            value = await read(lambda: _jobs_value(js, key, kv), f"reading a part of job {state.job_id}'s record")
        if value is None:
            raise RecordPartMissing(f"job {state.job_id}'s record names {key} for one of its completed nodes, "
                                    "which the bus does not hold")
        return name, value

    return state.with_parts(dict(await asyncio.gather(*(get(n, k) for n, k in state.part_keys().items()))))


async def _jobs_value(js: JetStreamContext, key: str, kv=None) -> bytes | None:
    """The value of KV cb_jobs key `key`; None when the bus (its stream leader) has none."""
    tenant = TENANT.get()
    if kv is None:
        kv = jobs_kv(js) if tenant else await js.key_value(subjects.JOBS_BUCKET)
    try:
        entry = await kv.get(key)
    except InvalidKeyError:
        return None
    except (KeyNotFoundError, KeyDeletedError):
        if tenant:  # the leader's answer, through a consumer on this one key
            msg = (await last_per_key(js, key, headers_only=False)).get(key)
            return msg.data if msg is not None and msg.data else None
        try:
            msg = await js.get_msg(f"KV_{subjects.JOBS_BUCKET}", subject=f"$KV.{subjects.JOBS_BUCKET}.{key}")
        except NotFoundError:
            return None
        deleted = (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE")
        return None if deleted or not msg.data else msg.data
    return entry.value if entry and entry.value else None


class RecordPartMissing(BusError):
    """A job's record names a key of its own parts (JobState.parts, NodeState.speaker_turns_key)
    that the bus does not hold: written before the record that names it, so gone since (gc) or
    never stored."""


async def speaker_turns(js: JetStreamContext, state: JobState, node_id: str) -> TurnSummary | None:
    """Node `node_id`'s speaker summary: on the record (older coordinators), or read from the key
    the record names (NodeState.speaker_turns_key), which every role that may read the job's record
    may read (`subjects.job_part_key`). None: the node has none. A failed read is a BusError and
    a named key the bus lacks a RecordPartMissing, never None."""
    node = state.nodes[node_id]
    if node.speaker_turns is not None or node.speaker_turns_key is None:
        return node.speaker_turns
    key = node.speaker_turns_key
    value = await read(lambda: _jobs_value(js, key), f"reading {node_id}'s speaker turns of job {state.job_id}")
    if value is None:
        raise RecordPartMissing(f"job {state.job_id}'s record names {key} for {node_id}'s speaker turns, "
                                "which the bus does not hold")
    return TurnSummary.model_validate_json(value)


async def with_record_parts(js: JetStreamContext, state: JobState) -> JobState:
    """`state` whole, with every part of its record kept under its own keys read in: its
    completed nodes (`whole_record`) and their speaker summaries (`speaker_turns`): the whole
    record, as `status --json` and `run`'s job.json show it, the same as the record of a
    coordinator before parts held inline."""
    state = await whole_record(js, state)
    nodes = {node_id: node.model_copy(update={"speaker_turns": await speaker_turns(js, state, node_id)})
             if node.speaker_turns_key else node for node_id, node in state.nodes.items()}
    return state.model_copy(update={"nodes": nodes})


async def list_jobs(js: JetStreamContext, *, whole: bool = True) -> list[JobState]:
    """Every job record, oldest first; [] only when the bus says there are none. whole=False:
    their heads (`job_head`), for a reader that reads the nodes of the few it shows
    (`whole_record`) or none."""

    tenant = TENANT.get()

    async def keys():
        if tenant:  # the tenant's records only (not their parts): the callout grants no other listing
            return list(await last_per_key(js, subjects.tenant_records(tenant), headers_only=True))
        return await record_keys(js)

    states = []
    for key in filter(subjects.is_job_key, dict.fromkeys(await read(keys, "listing jobs"))):
        state = await (job_state if whole else job_head)(js, subjects.job_id_of_key(key))
        if state:  # a job deleted (gc) between the listing and the read
            states.append(state)
    return sorted(states, key=lambda s: s.created_at)


def _pending(msg) -> int:
    try:
        return msg.metadata.num_pending
    except Exception:  # not a JetStream message (no metadata): nothing known to be queued
        return 0


async def follow(
    js: JetStreamContext, job_id: str | None = None, *, stop_at_end: bool = True,
    since: datetime | None = None, stop_when_caught_up: bool = False,
) -> AsyncIterator:
    """Job events from the start of the stream (or from `since`), replayed and then live, in order.

    stop_at_end (one job): return at the job's real end (job_events: a retried job has several
    terminal events; replay goes through all of them, as SSE and webhooks do).
    stop_when_caught_up: return once every stored event is delivered (a replay, not a follow)."""
    if job_id and stop_at_end and not stop_when_caught_up:
        async for _, event in job_events(js, job_id, since=since):
            yield event
        return
    tenant = TENANT.get()
    subject = (subjects.job_events(job_id) if job_id else
               subjects.tenant_events(tenant) if tenant else subjects.EVENTS_WILDCARD)
    # Creating the consumer asks the meta leader; right after a node dies it may be electing one
    # (a timeout), like a stream's leader for submit (captionbus.core.bus.through_failover).
    sub = await through_failover(
        lambda: js.subscribe(subject, ordered_consumer=True, config=_consumer(_start(since=since))), "follow")
    # Late stage events (after a job's terminal event: contracts.History) are not shown. One
    # job read from `since` learns whether it was ended there (_Resumed); of every job's events
    # (`events --follow` with no job id) a job ended before `since` is not known to be.
    resumed = _Resumed(js, job_id, from_start=since is None) if job_id else None
    history = History()
    try:
        async for msg in sub.messages:
            pending = _pending(msg)
            try:
                event = parse_event(msg.data)
            except ValueError:
                event = None  # a newer schema or foreign publisher: not ours to interpret
            if event is not None and (await resumed.shown(msg, event.kind) if resumed
                                      else history.shown(event.job_id, event.kind)):
                yield event
            if stop_when_caught_up and pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


# A job whose state is finished and whose events are all read still gets this long for one more
# event before a reader ends: a worker's last progress report or late result can land just after
# the `cancelled` it had not seen yet (the runtime stops publishing within ~50 ms of it).
SETTLE_S = 0.5
RECHECK_S = 1.0


async def job_finished(js, job_id: str, terminal_seen: bool = False) -> bool:
    """Whether the job's KV state is finished now. A job with no state is finished only once its
    terminal event was seen (then gc collected it): a job just submitted has no state until the
    coordinator records it, and `run` follows it from its first moment (it read as finished and
    the follow ended before the first event: "lost the event stream"). A failed read is "not
    finished": the reader goes on, never ends early.

    The coordinator writes a decision's state with its events in an outbox, publishes them, then
    clears the outbox: a finished state with a full outbox is finished for a reader that has seen
    the terminal event (published from that outbox), and not yet for one that has not."""
    state = await _state_now(js, job_id)
    if state is None:
        return terminal_seen
    if state is False:
        return False
    # Events still in the outbox (the coordinator writes the state, then publishes them) are to come.
    return state.status.finished and (terminal_seen or not state.outbox)


async def _state_now(js, job_id: str) -> JobState | None | bool:
    """The job's KV state head (no parts read); None: it has none; False: unreadable (logged)."""
    try:
        kv = jobs_kv(js) if TENANT.get() else await js.key_value(subjects.JOBS_BUCKET)
        entry = await kv.get(subjects.job_key(job_id))
    except (KeyNotFoundError, KeyDeletedError):
        return None
    except Exception as e:  # noqa: BLE001  the bus is away: read on, check again at the next end
        structlog.get_logger("captionbus.client").warning(
            "job state unreadable; following on", job_id=job_id, error=f"{type(e).__name__}: {e}")
        return False
    return JobState.model_validate_json(entry.value) if entry.value else None


async def _retry_refused(js, job_id: str) -> bool:
    """Whether the coordinator refuses (has refused) a `retry_requested` of job `job_id` just
    read: the job completed (decide._Step.retry retries failed or cancelled jobs only, and a
    completed record never becomes either). A tenant may publish `retry_requested` for its own
    job without the gateway's 409; a follower that took it for a restart waited for a `started`
    that never came, forever: `events ID --follow`, SSE, and the webhook record the gateway
    reopened for it (measured: still following 15 s after a completed job's refused retry).
    Unreadable or no state: not known to be refused (the follower goes on as for a retry)."""
    state = await _state_now(js, job_id)
    return isinstance(state, JobState) and state.status.value == "completed"


async def job_events(js, job_id: str, after: int = 0, *, since: datetime | None = None,
                     settle_s: float = SETTLE_S) -> AsyncIterator[tuple[int, object]]:
    """(stream sequence, event) of one job after sequence `after`, in stream order, until the
    job's real end: every stored event is read, the job's state is finished, and nothing more
    came for `settle_s`. The gateway's SSE endpoint, its webhook deliveries and `captionbus events
    ID --follow` read this, so they carry the same events in the same order as `captionbus events
    ID` replays (the same stream, the same end).

    Why not "until the first terminal event" (what this did before issue 19): a job cancelled
    and then retried has `cancelled` in the middle of its history; SSE closed there and the
    webhook record was marked done, so integrators never heard `retry_requested`, `started` or
    `completed`. A terminal event ends the read only when nothing is stored after it and the
    job's state agrees (one KV read at that moment; a retry published later starts a new read:
    SSE clients reconnect with Last-Event-ID, webhook records are reopened by the dispatcher).
    `since`: start at that time instead (`events ID --follow --since`).
    Late stage events (stored after a terminal event the worker had not seen yet) are read but
    not yielded (contracts.History): the history ends at the terminal event on every surface."""
    sub = await through_failover(lambda: js.subscribe(subjects.job_events(job_id), ordered_consumer=True,
                                                      config=_consumer(_start(after, since))), "follow")
    history = _Resumed(js, job_id, from_start=not after and since is None)  # what is shown (contracts.History)
    try:
        # ending: the job was finished when last caught up; end after settle_s of silence.
        ended_since_start = False  # a terminal event read since the last (re)start
        ending = await job_finished(js, job_id)
        while True:
            # A terminal event whose state read said "not finished" (a stale replica's answer):
            # look again every RECHECK_S rather than wait for an event that may never come.
            timeout = settle_s if ending else RECHECK_S if ended_since_start else None
            try:
                msg = await (asyncio.wait_for(sub.next_msg(timeout=None), timeout) if timeout
                             else sub.next_msg(timeout=None))
            except TimeoutError:
                finished = await job_finished(js, job_id, ended_since_start)
                if finished and ending:
                    return
                ending = finished
                continue
            try:
                event = parse_event(msg.data)
            except (ValueError, ValidationError):
                continue  # a newer schema or a foreign publisher: not ours to interpret
            if await history.shown(msg, event.kind):
                yield msg.metadata.sequence.stream, event
            if event.kind in TERMINAL_KINDS:
                ended_since_start = True
            elif event.kind == REOPENING_KIND or (event.kind == "retry_requested"
                                                  and not await _retry_refused(js, job_id)):
                ended_since_start = ending = False
            if _pending(msg) == 0 and (ended_since_start or ending):
                ending = await job_finished(js, job_id, ended_since_start)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


# How long reading whether a job had ended before a resume point may take (_history_before).
HISTORY_READ_S = 10.0


class _Resumed:
    """contracts.History of one job read in stream order, from its start or from the middle
    (SSE's Last-Event-ID, a webhook record's cursor, `--since`). From the middle, whether the job
    was ended there is asked only when it matters: at the first stage event read before any
    terminal event or `started` (those say it themselves; job-level events are always shown). A
    webhook record reopened by a retry resumes after the job's terminal event: its first event is
    a late stage event stored after that end (then it asks) or the `retry_requested` (shown; the
    next stage event of the old attempt, before the coordinator's `started`, asks)."""

    def __init__(self, js, job_id: str, from_start: bool):
        self.js, self.job_id = js, job_id
        self.history = History() if from_start else None

    async def shown(self, msg, kind: str) -> bool:
        if self.history is None:
            if kind in STAGE_KINDS:
                self.history = await _history_before(self.js, self.job_id, msg)
            elif kind in TERMINAL_KINDS or kind == REOPENING_KIND:
                self.history = History()
            else:
                return True
        return self.history.shown(self.job_id, kind)


async def _history_before(js, job_id: str, first) -> History:
    """The History of job `job_id` just before message `first` (a reader that starts in the
    middle: SSE's Last-Event-ID, a webhook record's cursor, `--since`): whether the job was ended
    there, so a late stage event right after a `cancelled` is dropped by a reader that resumes
    after it as by one that read the `cancelled`.

    Only the kinds that decide it are read (contracts.HISTORY_KINDS: the terminal ones and the
    restart's `started`), one consumer per kind's subject, headers only (core.tenancy.held: the
    filtered create a tenant's login is granted, and a count from the create's answer), a handful
    of messages per job. Before, every earlier event was read, progress reports included: a long
    chunked film's tens of thousands made each resume cost ~0.8 s idle (20,001 events) and, under
    load, run into HISTORY_READ_S, failing every SSE reconnect and webhook resume of that job; and
    any tenant could make the gateway repeat it with `Last-Event-ID: 1`. Measured on this 2-core
    machine (load average ~3.2), a job of 20,000 progress reports then `cancelled`, resumed at a
    late report after it: every earlier event read in 0.87, 1.80 and 0.87 s; these four kinds in
    0.003, 0.006 and 0.003 s. A read that fails or stalls raises (a refused consumer create, a
    re-created consumer, HISTORY_READ_S): guessing "not ended" would show a cancelled job's late
    progress."""
    first_seq = first.metadata.sequence.stream

    async def read(kind: str) -> list[tuple[int, str]]:
        # (the consumer create asks the meta leader, which may be electing one: through_failover)
        msgs, _ = await through_failover(lambda: held(js, subjects.EVENTS_STREAM, subjects.job_event(job_id, kind),
                                                      headers_only=True, timeout=HISTORY_READ_S), "follow")
        return [(msg.metadata.sequence.stream, kind) for msg in msgs if msg.metadata.sequence.stream < first_seq]

    try:
        async with asyncio.timeout(HISTORY_READ_S):
            read_kinds = await asyncio.gather(*(read(kind) for kind in sorted(HISTORY_KINDS)))
    except TimeoutError:
        raise BusError(f"job {job_id}: its events before sequence {first_seq} were not read within "
                       f"{HISTORY_READ_S:.0f} s") from None
    history = History()
    for _, kind in sorted(item for batch in read_kinds for item in batch):
        history.shown(job_id, kind)
    return history


def _start(after: int = 0, since: datetime | None = None) -> ConsumerConfig:
    """Where a replay starts: after stream sequence `after`, at time `since`, or at the beginning."""
    if after:
        return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)
    if since is not None:
        start = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
    return ConsumerConfig(deliver_policy=DeliverPolicy.ALL)


def output_filename(stem: str, key: str, ref: ArtifactRef) -> str:
    """subtitle_gen.srt → clip.srt; srt-ta and srt_translated-ta → clip.ta.srt;
    translation-ta (json) → clip.translation.ta.json; mp4 → clip.subtitled.mp4."""
    ext = Path(ref.name).suffix.lstrip(".") or "bin"
    base, _, language = key.rpartition("-")
    if not base or language not in LANGUAGES:
        base, language = key, ""
    label = base.replace(ext, "").replace("translated", "").strip("-_.")
    if ext in ("mp4", "mkv", "mov"):
        label = f"subtitled.{label}" if label else "subtitled"
    return ".".join(part for part in (stem, label, language, ext) if part)


def artifacts_of(store: ArtifactStore, job_id: str | None) -> ArtifactStore:
    """`store` in the namespace of job `job_id`'s tenant (a tenant's jobs keep their artifacts
    there, captionbus/core/artifacts/transfer.py): as that tenant's own client when this process
    acts for one (TENANT), else as a trusted reader of every namespace."""
    tenant = TENANT.get()
    if tenant:
        return store.scoped(tenant, restricted=True)
    return store.scoped(tenant_of(job_id)) if job_id else store


async def fetch_outputs(
    store: ArtifactStore, outputs: dict[str, ArtifactRef], out_dir: Path, stem: str, job_id: str | None = None,
) -> dict[str, Path]:
    """`job_id`: the job whose outputs these are (its tenant's namespace holds them)."""
    store = artifacts_of(store, job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, ref in sorted(outputs.items()):
        # the store's own (read-only) copy: one copy out, no more
        local = await read(lambda ref=ref: store.get(ref), f"fetching {key}")
        target = out_dir / output_filename(stem, key, ref)
        shutil.copyfile(local, target)
        written[key] = target
    return written


async def workers(nc: NATS, timeout: float = 1.0, stage: str | None = None,
                  until: Callable[[list[dict]], bool] | None = None) -> list[dict]:
    """Every captionbus stage service's $SRV.STATS reply (or one stage's), through merge_state:
    metadata (WorkerInfo, flat) plus `state` (contracts.WorkerState); `until(workers so far)`
    ends the wait early (collect_replies). NotForTenants as a tenant:
    the callout grants no `$SRV` (a worker's state names the jobs it runs, of every tenant, and
    its last error), and an unanswered ask would read as "no workers"."""
    if TENANT.get():
        raise NotForTenants(f"tenant {TENANT.get()!r} cannot list the workers: their state names the jobs of every "
                            "tenant, so a tenant's login is not granted $SRV; ask the fleet's operator, or list "
                            "them with a trusted login (the dashboard user)")
    return await stage_workers(nc, stage, timeout, until)
