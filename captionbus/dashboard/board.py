"""What the dashboard knows, kept in one process and fanned out to every open page.

Why derive everything here instead of having each service expose `/metrics`: stage services run
on many hosts, behind NAT, in venvs that must not carry launcher dependencies, and come and go;
the bus already carries everything an operator asks about. So one process with the read-only
`dashboard` role (or `dashboard_operator`, which may also cancel and retry: app.py) watches

- the job-state KV bucket (an ordered consumer: every job's current state, replayed at start),
- the job events (an ordered consumer from "now": progress, warnings, what each worker did),
- `$SRV.STATS` discovery every few seconds (which workers answer, how long since each did, and
  what each does: loading / idle / busy on which job, jobs done, last error — contracts.WorkerState),
- the `CB_REQUESTS` stream and its stage consumers (waiting, in flight, redelivered, oldest age),
- the gateways' webhook delivery records (KV `cb_webhooks`, webhooks.py; outside readiness),

and derives pages, Server-Sent Events and Prometheus metrics from them. A browser never talks to
the bus; N open pages cost one subscription (see Fanout).

Measured with benchmarks/dashboard.py (10,000 jobs in KV, 50 messages/s for 600 s, on a shared
2-core machine at load 10+, so upper bounds): first page 0.11 s, the page 0.23 s, a job page
0.31 s; event -> SSE client p50 0.007 s, p95 0.47 s; RSS 201 -> 202 MB over the 10 minutes;
all 27,000 events arrived. Loading the 10,000 job states took 10-32 s (pydantic parsing).
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from captionbus.client import workers as worker_replies
from captionbus.dashboard.stats import charts, job_duration, queue_wait, stage_duration
from captionbus.dashboard.webhooks import WebhookView
from captionbus.contracts import JobState, failure_class, parse_event, subjects
from captionbus.contracts.events import REOPENING_KIND, History
from captionbus.contracts.jobs import MissingParts
from captionbus.contracts.speech import TurnSummary
from captionbus.core.tasks import cancel_and_wait
from captionbus.core.tenancy import named

log = structlog.get_logger("captionbus.dashboard")

WORKER_POLL_S = 2.0  # $SRV.STATS and queue polls; a worker unseen for LOST_AFTER_S is "lost"
LOST_AFTER_S = 10.0
RECENT = 8  # requests listed per worker on the Workers view
NEVER = datetime.min.replace(tzinfo=timezone.utc)  # a request not finished sorts oldest
THROUGHPUT_WINDOW_S = 300.0
JOB_EVENTS_LIMIT = 2000  # a job page reads at most this many events of each kind
# A job page's history is every event of the job but these (a 1-hour asr reports ~14,000).
UNLISTED_KINDS = ("stage_progress",)
# Job-level events the timeline marks (a cancel, a retry, the end).
MARK_KINDS = ("cancel_requested", "cancelled", "retry_requested", "started", "branch_failed", "failed", "completed")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


class Fanout:
    """One queue per open page. A slow page loses its oldest messages, never slows the bus side."""

    def __init__(self, depth: int = 256):
        self.depth = depth
        self.queues: set[asyncio.Queue] = set()

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(self.depth)
        self.queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.queues.discard(queue)

    def publish(self, kind: str, data: Any) -> None:
        message = (kind, json.dumps(data, default=str))
        for queue in self.queues:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(message)


def job_failure_class(state: JobState) -> str | None:
    """Why a finished job did not complete, as a class (captionbus.contracts.failures); None otherwise."""
    if state.status.value == "cancelled":
        return "cancelled"
    if state.status.value != "failed":
        return None
    return state.failure_class or failure_class(None, state.error or "")


def job_summary(state: JobState, notes: dict[str, str] | None = None) -> dict[str, Any]:
    """`notes`: the last progress message of each node ("loading model" ...), from the events."""
    spec = state.spec
    notes = notes or {}
    return {
        "job_id": state.job_id,
        "workflow": spec.workflow,
        "status": state.status.value,
        "input": spec.input.name,
        "source_language": spec.source_language,
        "target_languages": spec.target_languages,
        "created_at": _iso(state.created_at),
        "created_ts": state.created_at.timestamp(),
        "updated_at": _iso(state.updated_at),
        # its started event to its end event; None while it runs (captionbus.dashboard.stats)
        "duration_s": job_duration(state),
        "error": state.error,
        "failure_class": job_failure_class(state),
        "failed_branches": state.failed_branches,
        "nodes": [{"node": name, "stage": node.stage, "status": node.status.value,
                   "progress": round(node.progress, 3), "message": notes.get(name, "")}
                  for name, node in state.nodes.items()],
    }


def media_duration(state: JobState) -> float | None:
    for node in state.nodes.values():
        value = node.metrics.get("media_duration_s") or node.metrics.get("audio_duration_s")
        if value:
            return float(value)
    return None


def realtime_factor(state: JobState, node_name: str) -> float | None:
    """The stage's own realtime factor when it reports one, else its handling time over the
    media duration that demux measured."""
    node = state.nodes[node_name]
    if "realtime_factor" in node.metrics:
        return float(node.metrics["realtime_factor"])
    duration, handled = media_duration(state), node.metrics.get("handle_s")
    return float(handled) / duration if duration and handled is not None else None


def parse_time(value: str) -> float | None:
    """An ISO 8601 time from a filter (`2026-01-31T10:00:00Z`, a date, or with an offset) as a
    timestamp; without a zone it is UTC. Empty: None. Raises ValueError with the bad value."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {value!r}") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def matches(summary: dict[str, Any], *, status: str = "", workflow: str = "", language: str = "",
            text: str = "", since: float | None = None, until: float | None = None) -> bool:
    if status and summary["status"] != status:
        return False
    if workflow and summary["workflow"] != workflow:
        return False
    if language and language != summary["source_language"] and language not in summary["target_languages"]:
        return False
    if text and text.lower() not in f"{summary['job_id']} {summary['input']}".lower():
        return False
    if since is not None and summary["created_ts"] < since:
        return False
    return until is None or summary["created_ts"] <= until


class Board:
    def __init__(self, nc: NATS, stages: list[str], metrics: Any = None):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.stages = stages
        self.jobs: dict[str, JobState] = {}  # whole (JobState.with_parts)
        # job -> part name -> bytes: parts of records (subjects.job_part_key) the watch delivered
        # (before the record naming them: written first) and no state of ours holds yet.
        self.parts: dict[str, dict[str, bytes]] = {}
        self.summaries: dict[str, dict[str, Any]] = {}
        self.workers: dict[str, dict[str, Any]] = {}  # worker id -> info + last_seen (monotonic)
        self.queues: dict[str, dict[str, Any]] = {}
        self.completions: dict[str, deque] = {}  # stage -> monotonic times of stage_completed
        # job -> node -> its last progress message, while the job runs: a page opened (or a
        # row listed) after a worker said "loading model" still shows it.
        self.notes: dict[str, dict[str, str]] = {}
        self.fanout = Fanout()
        self.metrics = metrics  # captionbus.dashboard.metrics.Metrics, fed as jobs change
        if metrics is not None:
            metrics.board = self
        self.jobs_loaded = asyncio.Event()
        self.events_seen = 0
        self.history = History()  # which live events are late (contracts.History): not fanned out
        self.restarted: set[str] = set()  # jobs the feed saw reopened (`started`) before the records loaded
        self.failing: dict[str, str] = {}  # watcher -> why it is restarting
        self.webhooks = WebhookView()  # the gateway's delivery records (KV cb_webhooks), outside readiness
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._forever(name, fn)) for name, fn in
                       (("job states", self._watch_jobs), ("job events", self._watch_events), ("polls", self._poll))]
        self._tasks.append(asyncio.create_task(self.webhooks.follow(self.js)))

    async def _forever(self, name: str, fn) -> None:
        """A watcher that fails (the bus went away for longer than the client's reconnects cover)
        starts again: the job-state replay is idempotent (metrics compare with the last state)."""
        while True:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # nats raises many unrelated types; the reason goes to the log and /readyz
                self.failing[name] = f"{name}: {type(e).__name__}: {e}"
                log.warning("dashboard watcher failed; restarting", watcher=name, error=str(e))
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        # cancelled again while one goes on: a poll's cancellation can be lost (core.tasks), and
        # `cancel(); await task` then waited forever (test_model's restart-dashboard hang)
        await cancel_and_wait(self._tasks)

    @property
    def ready(self) -> bool:
        return self.nc.is_connected and self.jobs_loaded.is_set() and not self.failing

    def not_ready_reason(self) -> str:
        if not self.nc.is_connected:
            return "not connected to NATS"
        if self.failing:
            return "; ".join(self.failing.values())
        return "loading job states"

    # -- job state (KV) ----------------------------------------------------------------------
    async def _watch_jobs(self) -> None:
        kv = await self.js.key_value(subjects.JOBS_BUCKET)
        watcher = await kv.watchall()
        async for entry in watcher:
            if entry is None:  # the end of the initial values
                # The live feed reads new events only (_watch_events): a job that ended before this
                # dashboard started is ended in its History too, or a late stage event of it (a worker
                # that had not seen the cancel) was shown live (contracts.History).
                # (Not one whose restart the feed read meanwhile: the watch's values may predate it.)
                self.history.ended.update(job_id for job_id, state in self.jobs.items()
                                          if state.status.finished and job_id not in self.restarted)
                self.restarted.clear()
                self.failing.pop("job states", None)
                self.jobs_loaded.set()
                log.info("job states loaded", jobs=len(self.jobs))
                continue
            if not subjects.is_job_key(entry.key):  # a part of a record (a node, a speaker summary)
                if entry.value and entry.operation not in ("DEL", "PURGE"):
                    job_id, name = subjects.job_id_of_part_key(entry.key), entry.key.rpartition(".")[2]
                    self.parts.setdefault(job_id, {})[name] = entry.value
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self.jobs.pop(subjects.job_id_of_key(entry.key), None)
                self.summaries.pop(subjects.job_id_of_key(entry.key), None)
                self.parts.pop(subjects.job_id_of_key(entry.key), None)
                self.history.ended.discard(subjects.job_id_of_key(entry.key))  # gc took the job: forget it
                continue
            try:
                state = self.whole(JobState.model_validate_json(entry.value))
            except ValidationError:
                continue  # a newer schema: not ours to interpret
            except (MissingParts, ValueError) as e:
                log.warning("job state names parts the watch has not delivered; its last state stays shown",
                            key=entry.key, error=str(e))
                continue
            self.apply_state(state)

    def whole(self, head: JobState) -> JobState:
        """`head` whole (JobState.with_parts, as every reader reads a record): its completed nodes
        from the state shown before (a part never changes) or from the parts the watch delivered,
        which leave `parts` once in a state. A finished job's leftovers (a speaker summary: the
        page reads it when asked, client.speaker_turns) are dropped."""
        if head.whole:
            return head
        previous = self.jobs.get(head.job_id)
        pending = self.parts.get(head.job_id, {})
        known: dict[str, Any] = {node.part: node for node in previous.nodes.values() if node.part} if previous else {}
        state = head.with_parts({**known, **pending})
        for name in head.parts.values():
            pending.pop(name, None)
        if state.status.finished or not pending:
            self.parts.pop(head.job_id, None)
        return state

    def apply_state(self, state: JobState) -> None:
        previous = self.jobs.get(state.job_id)
        self.jobs[state.job_id] = state
        if state.status.finished:
            self.notes.pop(state.job_id, None)
        summary = job_summary(state, self.notes.get(state.job_id))
        self.summaries[state.job_id] = summary
        if self.metrics is not None:
            self.metrics.observe(previous, state)
        if self.jobs_loaded.is_set():
            self.fanout.publish("job", summary)

    # -- live events ---------------------------------------------------------------------------
    async def _watch_events(self) -> None:
        sub = await self.js.subscribe(subjects.EVENTS_WILDCARD, ordered_consumer=True,  # named: roles.conf
                                      config=named(ConsumerConfig(deliver_policy=DeliverPolicy.NEW)))
        self.failing.pop("job events", None)
        async for msg in sub.messages:
            try:
                event = parse_event(msg.data)
            except ValueError:
                continue
            self.events_seen += 1
            if event.kind == REOPENING_KIND and not self.jobs_loaded.is_set():
                self.restarted.add(event.job_id)
            if not self.history.shown(event.job_id, event.kind):
                continue  # a late stage event: not in the job's history (contracts.History)
            if event.kind == "stage_completed":
                times = self.completions.setdefault(event.stage, deque())
                times.append(time.monotonic())
            if event.kind == "stage_progress":
                self._note(event.job_id, event.node, event.message)
            data = {"job_id": event.job_id, "kind": event.kind, "time": _iso(event.time)}
            for key in ("stage", "node", "attempt", "fraction", "message", "reason"):
                if hasattr(event, key):
                    data[key] = getattr(event, key)
            self.fanout.publish("event", data)

    def _note(self, job_id: str, node: str, message: str) -> None:
        notes = self.notes.setdefault(job_id, {})
        if notes.get(node, "") == message:
            return
        notes[node] = message
        for row in (self.summaries.get(job_id) or {}).get("nodes", []):
            if row["node"] == node:
                row["message"] = message

    async def job_events(self, job_id: str, timeout: float = 3.0) -> list[dict[str, Any]]:
        """The job's events but progress reports (UNLISTED_KINDS), from the events stream, in
        stream order, each with its stream sequence as `seq`: the same events, in the same order,
        as `captionbus events ID`, the gateway's SSE and webhooks carry.

        One ephemeral ordered consumer per kind the job has, each reading exactly as many
        messages as stream info counts on its subject: a long job's thousands of progress
        events are never read."""
        try:
            info = await self.js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subjects.job_events(job_id))
        except NotFoundError:
            return []
        unlisted = {subjects.job_event(job_id, kind) for kind in UNLISTED_KINDS}
        wanted = {subject: min(n, JOB_EVENTS_LIMIT) for subject, n in (info.state.subjects or {}).items()
                  if subject not in unlisted}
        read = await asyncio.gather(*(self._read(subject, n, timeout) for subject, n in wanted.items() if n))
        history = History()  # late stage events are not shown, as no other surface shows them
        return [{"seq": seq, **event} for seq, event in sorted((item for batch in read for item in batch),
                                                             key=lambda item: item[0])
                if history.shown(job_id, event["kind"])]

    async def _read(self, subject: str, count: int, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        out: list[tuple[int, dict[str, Any]]] = []
        sub = await self.js.subscribe(subject, ordered_consumer=True,  # named: roles.conf
                                      config=named(ConsumerConfig(deliver_policy=DeliverPolicy.ALL)))
        try:
            async with asyncio.timeout(timeout):
                async for msg in sub.messages:
                    with contextlib.suppress(ValueError):
                        event = json.loads(parse_event(msg.data).model_dump_json())
                        out.append((msg.metadata.sequence.stream, event))
                    if len(out) >= count or msg.metadata.num_pending == 0:
                        break
        except TimeoutError:
            log.warning("job events read timed out", subject=subject, read=len(out), expected=count)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out

    # -- workers and queues --------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            try:
                await self.poll_workers()
                await self.poll_queues()
            except Exception as e:  # the bus is reconnecting: keep the last view, say why in the log
                log.warning("poll failed", error=str(e))
            self.fanout.publish("workers", self.worker_rows())
            self.fanout.publish("queues", self.queue_rows())
            await asyncio.sleep(WORKER_POLL_S)

    async def poll_workers(self) -> None:
        now = time.monotonic()
        for reply in await worker_replies(self.nc, timeout=0.5):
            # Keyed by the $SRV instance id, unique per registered process: one row per reply
            # that `captionbus workers` lists, whatever a worker calls itself (a worker of an
            # older version names itself `<host>-<replica>`, the same for every stage of a host).
            key = reply.get("id") or reply["metadata"].get("worker_id")
            self.workers[key] = {"id": reply.get("id"), "metadata": reply["metadata"], "state": reply["state"],
                                 "last_seen": now}
        # forget workers gone for long; show recently lost ones as "lost"
        for worker_id in [w for w, info in self.workers.items() if now - info["last_seen"] > 600]:
            del self.workers[worker_id]

    def worker_rows(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        done: dict[str, int] = {}
        last_error: dict[str, str] = {}
        recent: dict[str, list[tuple]] = {}  # rows are built for the RECENT newest only
        for state in self.jobs.values():
            for name, node in state.nodes.items():
                wid = node.worker.get("worker_id")
                if not wid:
                    continue
                recent.setdefault(wid, []).append((node.finished_at or NEVER, state, name, node))
                if node.status.value == "completed":
                    done[wid] = done.get(wid, 0) + 1
                elif node.error:
                    last_error[wid] = node.error
        rows = []
        for info in sorted(self.workers.values(), key=lambda i: (i["metadata"].get("worker_id") or "", i["id"] or "")):
            meta, live = info["metadata"], info.get("state") or {}
            worker_id = meta.get("worker_id") or info["id"]
            age = now - info["last_seen"]
            # The worker's own state while it answers; `lost` once it stops answering.
            state = (live.get("state") or "live") if age < LOST_AFTER_S else "lost"
            rows.append({
                "worker_id": worker_id, "stage": meta.get("stage"), "host": meta.get("host"),
                "replica": meta.get("replica"), "pid": meta.get("pid"), "instance": info["id"],
                "env": meta.get("env"), "interpreter": meta.get("interpreter"),
                "python": meta.get("python_version"), "model": meta.get("model"), "backend": meta.get("backend"),
                "hardware": {k[3:]: v for k, v in meta.items() if k.startswith("hw.")},
                "packages": {k[4:]: v for k, v in meta.items() if k.startswith("pkg.")},
                "state": state, "state_since": live.get("since"), "heartbeat_age_s": round(age, 1),
                "current": live.get("current") or [] if state != "lost" else [],
                "jobs_done": live.get("jobs_done", done.get(worker_id, 0)),
                "jobs_failed": live.get("jobs_failed"),
                "last_error": live.get("last_error") or meta.get("setup_error") or last_error.get(worker_id),
                "recent": [_recent_row(*item[1:]) for item in
                           heapq.nlargest(RECENT, recent.get(worker_id, []), key=lambda item: item[0])],
            })
        return rows

    def charts(self) -> dict[str, Any]:
        return charts(self.jobs.values())

    def live_stages(self) -> set[str]:
        now = time.monotonic()
        return {info["metadata"].get("stage") for info in self.workers.values()
                if now - info["last_seen"] < LOST_AFTER_S}

    async def poll_queues(self) -> None:
        info = await self.js.stream_info(subjects.REQUESTS_STREAM, subjects_filter=subjects.REQUESTS_WILDCARD)
        counts = info.state.subjects or {}
        queues = {}
        stages = sorted(set(self.stages) | {s.rsplit(".", 1)[-1] for s in counts})
        for stage in stages:
            stored = counts.get(subjects.stage_request(stage), 0)  # work queue: waiting + in flight
            in_flight = redelivered = 0
            first_waiting_seq = 1
            consumer = True
            try:
                ci = await self.js.consumer_info(subjects.REQUESTS_STREAM, subjects.stage_consumer(stage))
                in_flight, redelivered = ci.num_ack_pending or 0, ci.num_redelivered or 0
                first_waiting_seq = (ci.delivered.stream_seq or 0) + 1 if ci.delivered else 1
            except NotFoundError:
                consumer = False  # no worker of this stage ever started
            waiting = max(stored - in_flight, 0)
            oldest_age = None
            if waiting:
                with contextlib.suppress(Exception):
                    msg = await self.js.get_msg(subjects.REQUESTS_STREAM, seq=first_waiting_seq,
                                                subject=subjects.stage_request(stage), next=True)
                    if msg.time:
                        oldest_age = max(0.0, time.time() - _timestamp(msg.time))
            cutoff = time.monotonic() - THROUGHPUT_WINDOW_S
            times = self.completions.get(stage, deque())
            while times and times[0] < cutoff:
                times.popleft()
            queues[stage] = {"stage": stage, "waiting": waiting, "in_flight": in_flight,
                             "redelivered": redelivered, "oldest_waiting_s": oldest_age,
                             "completed_5min": len(times), "consumer": consumer}
        self.queues = queues

    def queue_rows(self) -> list[dict[str, Any]]:
        live = self.live_stages()
        rows = []
        for stage, row in sorted(self.queues.items()):
            workers = sum(1 for w in self.workers.values() if w["metadata"].get("stage") == stage
                          and time.monotonic() - w["last_seen"] < LOST_AFTER_S)
            problem = None
            if (row["waiting"] or row["in_flight"]) and stage not in live:
                held = f" ({row['in_flight']} in flight, held by a lost worker until ack_wait)" if row["in_flight"] else ""
                problem = (f"{row['waiting']} request(s) waiting{held} and no live {stage} worker: "
                           f"start one (`captionbus serve {stage}`)")
            rows.append({**row, "workers": workers, "problem": problem})
        return rows


def _recent_row(state: JobState, name: str, node: Any) -> dict[str, Any]:
    """One request a worker handled (the last attempt of a node it ran, from the job's state)."""
    return {"job_id": state.job_id, "node": name, "stage": node.stage, "attempt": node.attempt,
            "status": node.status.value, "finished_at": _iso(node.finished_at), "duration_s": stage_duration(node),
            "queue_wait_s": queue_wait(node), "cache_hit": bool(node.metrics.get("cache_hit")), "error": node.error}


def _timestamp(value: Any) -> float:
    """RawStreamMsg.time is an RFC 3339 string with nanoseconds in nats-py 2.16."""
    if isinstance(value, datetime):
        return value.timestamp()
    text = str(value).replace("Z", "+00:00")
    head, _, rest = text.partition(".")
    if rest:
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    return datetime.fromisoformat(text).astimezone(timezone.utc).timestamp()


def _close(row: dict[str, Any], status: str, time: str) -> None:
    """An attempt that got no result of its own ends with the job event that ended it."""
    if row["end"] is None:
        row.update(end=time, status=status)


def _history_row(event: dict[str, Any]) -> dict[str, Any]:
    detail = event.get("reason") or event.get("message") or ""
    if event.get("kind") == "branch_failed":
        detail = f"branch {event.get('branch')}: {detail}"
    elif event.get("kind") == "stage_completed":
        detail = (event.get("worker") or {}).get("worker_id", "")
    return {"seq": event.get("seq"), "event_id": event.get("event_id"), "kind": event.get("kind"),
            "time": event.get("time"), "node": event.get("node"), "attempt": event.get("attempt"), "detail": detail}


def speaker_node(state: JobState) -> str | None:
    """The job's completed diarization node (one per film), or None."""
    return next((name for name, node in state.nodes.items()
                 if node.stage == "diarization" and node.status.value == "completed"), None)


def speaker_lane(node: str, summary: TurnSummary) -> dict[str, Any]:
    """The turns the bus recorded on the diarization node (NodeState.speaker_turns, a bounded copy of
    its turns.json) as the job page's speaker lane: the turns on the film's time axis, and per speaker
    (in order of first appearance) its seconds of speech and turns, counted over every turn."""
    total = sum(s.seconds for s in summary.speakers) or 1.0
    labels = [s.label for s in summary.speakers]
    return {"node": node, "duration": summary.duration, "requested": summary.requested,
            "speakers": [{"label": s.label, "seconds": round(s.seconds, 2), "turns": s.turns,
                          "share": round(s.seconds / total, 4), "color": n} for n, s in enumerate(summary.speakers)],
            "turns": [{"start": start, "end": end, "speaker": labels[speaker]} for start, end, speaker in summary.turns],
            "turns_total": summary.turns_total, "turns_truncated": summary.turns_truncated}


def job_detail(state: JobState, events: list[dict[str, Any]], downloads: bool = False) -> dict[str, Any]:
    """A job page: nodes with state, the timeline of every attempt, warnings, retries, and the
    job's event history (every event but progress reports, in stream order).

    An attempt that gets no result of its own ends with what ended it: the job's `cancelled`
    (status cancelled), its `failed`/`completed` or a later attempt of the same node (status
    abandoned). Before, such an attempt stayed `requested`, and a completed job kept a blue
    "asr #2 running" bar after a cancel and a retry (issue 19)."""
    attempts: dict[tuple[str, int], dict[str, Any]] = {}
    warnings, retries, marks = [], [], []
    for event in events:
        kind, node = event.get("kind"), event.get("node")
        key = (node, event.get("attempt"))
        if kind in MARK_KINDS:
            branch = f"branch {event['branch']}" if kind == "branch_failed" else None
            marks.append({"kind": kind, "time": event["time"], "seq": event.get("seq"),
                          "reason": event.get("reason") or branch})
        if kind in ("cancelled", "failed", "completed"):
            for row in attempts.values():
                _close(row, "cancelled" if kind == "cancelled" else "abandoned", event["time"])
        if kind == "stage_requested":
            for (other, _), row in attempts.items():
                if other == node:
                    _close(row, "abandoned", event["time"])
            attempts[key] = {"node": node, "stage": event.get("stage"), "attempt": event.get("attempt"),
                             "start": event["time"], "end": None, "status": "requested", "worker": {}}
        elif kind in ("stage_completed", "stage_failed") and key in attempts and attempts[key]["end"] is None:
            row = attempts[key]
            row.update(end=event["time"], status="completed" if kind == "stage_completed" else "failed",
                       worker=event.get("worker") or {}, reason=event.get("reason"),
                       delivery=(event.get("metrics") or {}).get("delivery"),
                       cache_hit=bool((event.get("metrics") or {}).get("cache_hit")))
            if kind == "stage_failed" and event.get("retryable"):
                retries.append({"node": node, "attempt": event.get("attempt"), "reason": event.get("reason")})
        elif kind == "stage_warning":
            warnings.append({"node": node, "message": event.get("message"), "time": event["time"]})
    # Nodes with no events (the events stream keeps 30 days; job state stays): their last
    # attempt from the job state, so the timeline still shows where the time went.
    seen_nodes = {node for node, _ in attempts}
    for name, node in state.nodes.items():
        if name not in seen_nodes and node.requested_at:
            attempts[(name, node.attempt)] = {
                "node": name, "stage": node.stage, "attempt": node.attempt, "start": _iso(node.requested_at),
                "end": _iso(node.finished_at), "status": node.status.value, "worker": node.worker,
                "delivery": node.metrics.get("delivery"), "cache_hit": bool(node.metrics.get("cache_hit"))}
    timeline = sorted(attempts.values(), key=lambda a: a["start"])
    for row in timeline:
        if row["start"] and row["end"]:
            row["duration_s"] = round(_seconds(datetime.fromisoformat(row["start"]),
                                               datetime.fromisoformat(row["end"])), 3)
    nodes = []
    for name, node in state.nodes.items():
        nodes.append({"node": name, "stage": node.stage, "status": node.status.value, "attempt": node.attempt,
                      "progress": node.progress, "error": node.error, "worker": node.worker,
                      "failure_class": (node.failure_class or failure_class(None, node.error or "")) if node.error
                      and node.status.value == "failed" else None,
                      "metrics": node.metrics, "duration_s": _seconds(node.requested_at, node.finished_at),
                      "realtime_factor": realtime_factor(state, name),
                      "redeliveries": max(int(node.metrics.get("delivery", 1)) - 1, 0)})
    return {
        **job_summary(state),
        "nodes": nodes,
        "timeline": timeline,
        "warnings": warnings,
        "retries": retries,
        "marks": marks,
        "history": [_history_row(event) for event in events],
        "outputs": [{"name": key, "file": ref.name, "size": ref.size,
                     "download": f"/api/jobs/{state.job_id}/outputs/{key}" if downloads else None}
                    for key, ref in sorted(state.outputs.items())],
        "downloads": downloads,
        "speakers_node": speaker_node(state),
    }
