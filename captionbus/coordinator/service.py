"""The coordinator process: a thin NATS adapter around the pure `decide`.

For each job event (from the durable consumer of its job's partition on CB_EVENTS, which only the
holder of the partition's lease pulls: leases.py; `events_in_hand` pulls at once, one job's events
one at a time):
    read JobState (from KV, or the state we last read or wrote when that is recent:
    `_remembered`) → decide → write the state, with the decided stage requests and job events
    in its `outbox`, against the revision read, and publish the stage requests at the same time
    → ack the event, while a task of the job's publishes the outbox's events, in order, off the
    job's lock. What was published leaves the outbox with the job's next write (a finished job's
    at once, a waiting job's at its next tick).

Round trips of one stage hop, before and after (issue 22): a fetch per event, a KV read, the
request, the state write, each event, the outbox-clearing write = 6 sequential, one event at a
time; then the request and the state write, one after the other (the event arrives on a waiting
pull, the state is remembered, the events are pipelined and acked after), with 16 events of
different jobs at once; now the request and the state write at once: one round trip before the
next stage can start.

Stage requests go out *with* the write, not after it; that is safe (at-least-once, no double
effects):
  * If we crash after the request is stored and before the write lands, the event is
    redelivered (not acked) and decided again from the old state. The same decision yields the same ids: stage
    requests carry `Nats-Msg-Id: <job>.<node>.<attempt>`, so JetStream drops the repeats
    inside its duplicate window (2 min). Past the window a repeated request may run twice;
    its second completion finds the node already completed (or at another attempt) and is
    ignored.
  * If the write lands and the request does not (its publish failed, or we crashed before its
    ack), the request is in the written state's outbox and goes out again from there under the
    same id: ours at once (the decision is done and logged, its event acked: a request that did
    not go out is no failure of the event), another coordinator's once it is `OUTBOX_GRACE_S`
    old (the redelivered event finds itself already applied and flushes the outbox; so does the
    tick loop), none once it is `REQUEST_RESEND_LIMIT_S` old (inside the duplicate window; the
    node's deadline decides then: see REQUEST_RESEND_LIMIT_S).
  * If the write loses a revision race (another decision for the same job landed first), we
    re-read and re-decide. A request the losing decision published refers to a (node, attempt)
    the winning state either also requested (same id, deduplicated) or never will; a result
    for such an attempt fails the attempt check in `decide` and is ignored — wasted work at
    worst, never a wrong state.
Job events go out only *after* the write: clients stop at the first terminal event, so a
`failed` from a decision that lost the race (a deadline tick against a completion) would
report a failure that did not happen. They travel in the state's `outbox`: written with the
decision, published once the write succeeded, then cleared. A job's events are stored in the
order they were decided: each is published once the one before it is stored, and one whose
publish failed holds back the later ones until it is sent again (`_send`). A coordinator that
dies in between leaves them in the state; the tick loop (which scans every job at start)
publishes them. Their ids are derived from the transition, so a repeat is dropped by JetStream.
  * Acking only after the write means a crash never loses an event. An event that fails to
    apply `event_retry.max_attempts` times is dropped and its job failed (`JobFailed` with the id
    `<job>.failed.internal.<event id>`), so no client waits forever on it.

The background tasks (events, ticks) survive any one message or tick failing; should one end
anyway, `Coordinator.failed` / `wait_failed()` report it, and `run_coordinator` raises
`CoordinatorTaskDied` instead of running on with nothing advancing.

A tick loop applies `Tick` to running jobs every second (stage deadlines, retry backoff), and
a durable consumer on the stored max-deliveries advisories (stream CB_ADVISORIES) turns a request
that every delivery crashed on into a permanent StageFailed, so a poison request fails its job instead of hanging it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import (
    APIError,
    BadRequestError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from pydantic import ValidationError

from captionbus.contracts import (
    JobState,
    NodeState,
    NodeStatus,
    StageFailed,
    StageRequest,
    parse_event,
    request_key,
    subjects,
)
from captionbus.contracts.events import JobEvent, JobSubmitted
from captionbus.contracts.jobs import MissingParts, node_of_part, utcnow
from captionbus.coordinator.decide import Decision, Policy, Tick, decide, give_up, result_token
from captionbus.coordinator.consume import PullConsumer
from captionbus.coordinator.graph import Workflow, load_workflows
from captionbus.coordinator.leases import Leases, new_coordinator_id
from captionbus.core import settings as settings_mod
from captionbus.core.bus import provision, publish_event, record_keys, through_failover
from captionbus.core.discovery import COUNT_WAIT_S, Census
from captionbus.core.retry import RetryPolicy
from captionbus.core.settings import Settings
from captionbus.core.tasks import await_stack, cancel_and_wait

log = structlog.get_logger("captionbus.coordinator")

MAX_WRITE_CONFLICTS = 20  # re-decides per event before we nak it and try again later
# Events of one partition handled at once (consume.PullConsumer; one job's events one at a time:
# _owning): a coordinator holding all 8 partitions may hold 128.
EVENTS_IN_HAND = 16
# The events of publishers before job ownership (_consume_legacy): a few at once, under a key of
# self._pumps that is no partition.
LEGACY_IN_HAND, LEGACY_PUMP = 4, -1
# How long a state we read or wrote may stand in for the stored one (_remembered) when its job is
# not in a partition we have held since (an owned job's stands in as long as we hold it), and for
# how many jobs (least recently used out; a 2-hour film's state is ~1 MB of Python objects).
STATE_MEMORY_S = 20.0
STATE_MEMORY_JOBS = 1024
# Completed nodes (parts of records, JobState.parts) kept in memory, least recently used out: 16
# 2-hour films' (240 chunks each) at ~4 KB of Python objects a node; and reads of missing ones at once.
PARTS_KEPT = 4096
PART_READS = 32
PUBLISH_TIMEOUT_S = 5.0  # for a job event's ack
# stop(): how long the loops may take to finish the events in hand, and the job senders their
# publishes, before they are cancelled; and how long a cancelled task may take to end (a task that
# ignores its cancellation is logged with its stack, and left).
STOP_FINISH_S = 10.0
STOP_CANCEL_S = 5.0
# A result that its job's state cannot explain yet (decide's retry_later) is read again after
# these pauses before it is put back for EARLY_RESULT_RETRY_S: with several coordinators the one
# that published the request is usually still writing the state that explains it (a noop worker
# answers within that write's round trip; the 2 s put-back made 3 coordinators' hops slower than
# one's, benchmarks/fleet_sim.py --hops).
EARLY_REREAD_S = (0.002, 0.005, 0.02, 0.05)
DUPLICATE_IN_PROCESS = 10158  # JetStream: a message with this Nats-Msg-Id is being stored now
STORAGE_TYPE_FIXED = 10012  # JetStream: "storage type can not be updated" (a consumer that exists)
IN_PROCESS_RETRY_S = (0.005, 0.02, 0.1, 0.3)
# How long a job event handed to a coordinator may go unacked before another gets it: the
# CAPTIONBUS_EVENT_ACK_WAIT setting (Coordinator(event_ack_wait_s=...)); this is its default.
EVENT_ACK_WAIT_S: float = Settings.model_fields["event_ack_wait"].default
# An early stage result waits for the event that explains it, redelivered after the ack wait: it
# is put back every EARLY_RESULT_RETRY_S for EARLY_RESULT_PATIENCE ack waits.
EARLY_RESULT_RETRY_S = 2.0
EARLY_RESULT_PATIENCE = 4
# An event that fails to apply is redelivered after 1 s times the deliveries so far; one that
# failed 5 times is dropped and its job failed.
EVENT_RETRY = RetryPolicy(initial_s=1.0, growth="linear", max_attempts=5)


# A stage request in a job state's outbox (JobState.outbox): {"stage_request": <StageRequest JSON>}.
REQUEST_ENTRY = "stage_request"
# When a request in the outbox goes out again (resend_due). Its writer publishes it together with
# the write and takes it out of the outbox with its next write of the job or its next tick
# (tick_interval_s, 1 s). Another coordinator that finds it there cannot tell whether it was sent;
# sending it again on each of its writes of the job cost a replicated round trip per hop, under
# the job's lock, with several coordinators (a review of issue 22). So another coordinator's
# request goes out again only once it is OUTBOX_GRACE_S old (its writer has died or lost the bus,
# or it would have been taken out by now); this coordinator's own unsent request at once.
OUTBOX_GRACE_S = 5.0
# ... and no request once it is REQUEST_RESEND_LIMIT_S old. The requests stream drops a repeated
# Nats-Msg-Id only within its duplicate window (120 s: core.bus.provision); past that, a request
# that was stored after all (and perhaps done) would be stored and run a second time. 100 s leaves
# 20 s for the publish itself and for coordinators' clocks that disagree (the age is read from
# the node's `requested_at`, written by the coordinator that decided it). Such a request leaves
# the outbox unsent and its node stays `requested`: the node's deadline decides, as for any request
# a worker lost (the attempt fails retryably; the retry policy requests the next attempt, a new
# id). Only an outage or a coordinator gap longer than that leaves a request there so long; its
# jobs then wait for a deadline, where a resend could run a stage twice (a 4-hour film's asr, a
# stage with effects outside the bus), and a worker that did get the request answers as usual.
REQUEST_RESEND_LIMIT_S = 100.0


def request_entry(request: StageRequest) -> dict[str, Any]:
    return {REQUEST_ENTRY: request.model_dump(mode="json")}


def outbox_id(raw: Mapping[str, Any]) -> str | None:
    """What `Coordinator._published` and `_unsent` call an outbox entry (the one name of a stage
    request there, made from its entry's JSON: `request_entry`): a request's key or an event's id."""
    request = raw.get(REQUEST_ENTRY)
    if isinstance(request, Mapping):
        return f"request:{request_key(request.get('job_id'), request.get('node'), request.get('attempt'))}"
    return raw.get("event_id")


async def _stored(publish: Callable[[], Awaitable[Any]]) -> None:
    """Await a JetStream publish of a message with a Nats-Msg-Id until it is stored or a repeat.
    Two coordinators deciding on one film's state (each handed one of its chunk results) publish
    the same next request at once, and both send the events of an outbox one of them wrote;
    JetStream answers the second "duplicate message id is in process" (409, 10158) while it stores
    the first. That is retried shortly, when the answer becomes the plain duplicate it is: failing
    the event cost a second's redelivery each time (benchmarks/fleet_sim.py, 3 coordinators), and a
    job event that failed would hold back the job's later events (`Coordinator._send`)."""
    for pause in (*IN_PROCESS_RETRY_S, None):
        try:
            await publish()
            return
        except APIError as e:
            if e.err_code != DUPLICATE_IN_PROCESS or pause is None:
                raise
            await asyncio.sleep(pause)


async def _finish(tasks: Collection[asyncio.Task], within_s: float) -> None:
    """Wait up to `within_s` for `tasks` to end, then cancel those left and wait up to
    STOP_CANCEL_S for them to end, cancelling again while one goes on (core.tasks; one that still
    runs is logged with its await chain). What a task raised, or its cancellation, is logged, not raised (asyncio.wait,
    not wait_for or gather); the caller's own cancellation cancels the tasks and propagates."""
    tasks = set(tasks)
    if not tasks:
        return
    try:
        _, left = await asyncio.wait(tasks, timeout=within_s)
        left = await cancel_and_wait(left, STOP_CANCEL_S)  # again while one goes on: a lost cancellation
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        raise
    for task in left:
        log.error("coordinator task did not end when cancelled; left running", task=task.get_name(),
                  stack=await_stack(task))
    for task in tasks - left:
        if not task.cancelled() and task.exception() is not None:
            log.warning("coordinator task failed while stopping", task=task.get_name(), error=repr(task.exception()))


def misfiled_event(subject: str, event: JobEvent, legacy: bool = False) -> str | None:
    """Why an event may not be applied as it arrived on `subject`, or None. The bus authorises a
    publisher by the subject alone (a tenant: `captionbus.job.<tenant>.*.cancel_requested`), so
    a body naming another job (another tenant's, or one of no tenant) on a subject the publisher
    may use is refused here, and a submit's spec must be of the job it submits."""
    try:
        # `legacy`: an event from the consumer of the layout before job ownership (no partition)
        expected = (subjects.legacy_job_event if legacy else subjects.job_event)(event.job_id, event.kind)
    except ValueError as e:
        return str(e)
    if subject != expected:
        return f"its body is about job {event.job_id!r} ({event.kind}) but it came on {subject!r}"
    if isinstance(event, JobSubmitted) and event.spec.job_id != event.job_id:
        return f"it submits job {event.job_id!r} with the spec of {event.spec.job_id!r}"
    return None


def partition_consumer_config(partition: int, ack_wait_s: float = EVENT_ACK_WAIT_S) -> ConsumerConfig:
    """The durable consumer of one partition's events on CB_EVENTS (captionbus/coordinator/leases.py):
    the kinds a coordinator acts on, of the jobs whose subjects carry the partition
    (subjects.partition_filters), so each event is stored once and handed to the one coordinator
    that holds its partition. Created or updated by the coordinator that takes the partition's
    lease (JetStream updates what may change, such as the ack wait; one that exists with a config
    that cannot change, such as its storage, is used as it is). File-backed, as the one events
    consumer before job ownership was: CB_EVENTS keeps every event, so a consumer whose state were
    lost would start again from DeliverPolicy.ALL, every event of its partition ever stored."""
    return ConsumerConfig(
        durable_name=subjects.partition_consumer(partition),
        filter_subjects=subjects.partition_filters(partition),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_ack_pending=1024,
    )


def waiting_node(raw: Mapping[str, Any], state: JobState) -> NodeState | None:
    """The node of a request in the outbox, while it waits for that request (`requested` at the
    request's attempt); None for an event, or a node whose result came, that moved on to another
    attempt or was cancelled."""
    request = raw.get(REQUEST_ENTRY)
    if not isinstance(request, Mapping):
        return None
    node = state.nodes.get(str(request.get("node")))
    if node is None or node.status != NodeStatus.requested or node.attempt != request.get("attempt"):
        return None
    return node


def request_age_s(node: NodeState, now: datetime) -> float:
    """Seconds since the decision that requested `node`'s current attempt."""
    return (now - node.requested_at).total_seconds() if node.requested_at is not None else 0.0


def sendable_age_s(raw: Mapping[str, Any], state: JobState, now: datetime) -> float | None:
    """The age of a request in the outbox that may still go out (again): its node waits for it
    (`waiting_node`) and it is under REQUEST_RESEND_LIMIT_S old; else (an event too) None. A
    request no node waits for any more is never sent again; one that old is left to its node's
    deadline (see REQUEST_RESEND_LIMIT_S)."""
    node = waiting_node(raw, state)
    if node is None:
        return None
    age = request_age_s(node, now)
    return age if age < REQUEST_RESEND_LIMIT_S else None


def awaited(raw: Mapping[str, Any], state: JobState, now: datetime) -> bool:
    """Whether an outbox entry stays in the outbox until it is published: every event, and a
    request that may still go out (`sendable_age_s`)."""
    return REQUEST_ENTRY not in raw or sendable_age_s(raw, state, now) is not None


def resend_due(raw: Mapping[str, Any], state: JobState, now: datetime, own: bool) -> bool:
    """Whether a request in the outbox that this coordinator has not published goes out again
    now, if it may still go out (`sendable_age_s`): `own` (its publish after our write failed) at
    once, another coordinator's once it is OUTBOX_GRACE_S old."""
    age = sendable_age_s(raw, state, now)
    return age is not None and (own or age >= OUTBOX_GRACE_S)


class StateConflict(RuntimeError):
    pass


class CoordinatorTaskDied(RuntimeError):
    """A coordinator background task (events or ticks) ended while the coordinator ran:
    nothing advances any more. Raised by `Coordinator.wait_failed()` and `run_coordinator`."""


class Coordinator:
    """Owns job state. In-process use:

        coordinator = Coordinator(nc)            # graphs from config/workflows
        await coordinator.start()                # provisions, binds the consumer, starts loops
        ...
        await coordinator.stop()

    or `async with Coordinator(nc) as coordinator: ...`.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        graphs: Mapping[str, Workflow] | None = None,
        graphs_dir: str | Path | None = None,
        policy: Policy = Policy(),
        tick_interval_s: float = 1.0,
        events_in_hand: int = EVENTS_IN_HAND,
        clock: Callable[[], datetime] = utcnow,
        provision_bus: bool = True,
        rescan_interval_s: float = 30.0,
        event_retry: RetryPolicy = EVENT_RETRY,
        unserved_s: float | None = None,
        workers_interval_s: float = 2.0,
        event_ack_wait_s: float = EVENT_ACK_WAIT_S,
        workers_wait_s: float = COUNT_WAIT_S,
        coordinator_id: str | None = None,
    ):
        # The events consumer's ack wait, set as this coordinator starts (CAPTIONBUS_EVENT_ACK_WAIT).
        # Settings holds its floor for the CLI; a Coordinator built in code is held to it here.
        if not event_ack_wait_s >= settings_mod.EVENT_ACK_WAIT_MIN_S:  # NaN too
            raise ValueError(
                f"event_ack_wait_s={event_ack_wait_s!r}: at least {settings_mod.EVENT_ACK_WAIT_MIN_S:g} s "
                "(CAPTIONBUS_EVENT_ACK_WAIT's floor; core/settings.py Settings.event_ack_wait says why)")
        self.nc = nc
        self.event_ack_wait_s = event_ack_wait_s
        # Live replicas per stage whose fan-out nodes have a window (max_in_flight), counted by
        # $SRV STATS every workers_interval_s: decide() sizes each job's window to them. A count
        # waits up to workers_wait_s for the replicas it counted last time (core.discovery.Census).
        self.workers_interval_s = workers_interval_s
        self._workers: dict[str, int] = {}
        self._census = Census(wait_s=workers_wait_s)
        # A requested node whose stage no worker has served ($SRV PING) for this long fails with
        # that reason: a stage nobody runs (never started, or given up by `up` after crashing)
        # must not leave its job `running`. None or 0: never.
        self.unserved_s = unserved_s or None
        self._unserved_since: dict[str, float] = {}
        self._served_now: dict[str, bool] = {}
        self.js = nc.jetstream()
        self.graphs = dict(graphs) if graphs is not None else load_workflows(graphs_dir)
        self.policy = policy
        self.tick_interval_s = tick_interval_s
        self.events_in_hand = max(1, events_in_hand)
        self.clock = clock
        self.provision_bus = provision_bus
        self.rescan_interval_s = rescan_interval_s
        self.event_retry = event_retry
        self.kv: Any = None
        self._advisory_sub: Any = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()
        self._failed: asyncio.Future | None = None
        # The tick loop reads only jobs it believes running: those we wrote as running, plus
        # whatever a full key scan finds (at start, then now and then for other replicas' jobs).
        self._running: set[str] = set()
        self._finished: set[str] = set()
        self._last_scan = float("-inf")
        # job id -> (state, its revision, when we read or wrote it): see _remembered.
        self._states: OrderedDict[str, tuple[JobState, int, float]] = OrderedDict()
        # KV key -> the node a part of a job's record holds (NodeState.part), least recently used
        # out: a state read from the KV takes its completed nodes from here (_read_parts).
        self._parts: OrderedDict[str, NodeState] = OrderedDict()
        self._part_reads = asyncio.Semaphore(PART_READS)
        # job id -> [lock, users]: one event or tick of a job at a time in this process (_owning).
        self._locks: dict[str, list] = {}
        # job id -> ids (outbox_id) of the entries in its stored outbox that we have published.
        self._published: dict[str, set[str | None]] = {}
        # job id -> ids of the requests we wrote into its outbox whose publish failed (_commit).
        self._unsent: dict[str, set[str]] = {}
        # job id -> the task publishing its outbox off the job's lock (_flush_outbox); each waits
        # for the one before it, so a job's events go out in order. _sending: every such task
        # still running (stop() cancels those its wait leaves).
        self._senders: dict[str, asyncio.Task] = {}
        self._sending: set[asyncio.Task] = set()
        # Job ownership (captionbus/coordinator/leases.py): this coordinator's id (written into each
        # state it writes, JobState.written_by), the bus's partition count, the leases, and per
        # partition held: the task pulling its events (with its stop flag and subscriptions) and
        # an epoch, bumped at each gain and loss, that a remembered state must match (_remembered).
        self.id = subjects.coordinator_member_key(coordinator_id or new_coordinator_id())[len("member."):]
        self.partitions = 0
        self.leases: Leases | None = None
        self._pumps: dict[int, tuple[asyncio.Event, asyncio.Task, list[Any]]] = {}
        self._epochs: dict[int, int] = {}

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # Each step is idempotent and retried through a cluster that is electing a leader (a
        # fresh cluster, or a node just lost): the chaos run's coordinator died here with
        # "nats: timeout" when started with its cluster (benchmarks/chaos.py).
        if self.provision_bus:
            await through_failover(lambda: provision(self.js), "provision")  # streams, KV, object store
        self.kv = await through_failover(lambda: self.js.key_value(subjects.JOBS_BUCKET), "job state")
        self.partitions = subjects.PARTITIONS
        leases_kv = await through_failover(lambda: self.js.key_value(subjects.COORDINATORS_BUCKET), "leases")
        ttl = (await through_failover(lambda: self.js.stream_info(f"KV_{subjects.COORDINATORS_BUCKET}"),
                                      "leases")).config.max_age
        self.leases = Leases(self.js, leases_kv, self.id, self.partitions, ttl or 10.0,
                             on_gain=self._gain, on_loss=self._lose)
        self._advisory_sub = await through_failover(self._bind_advisories, "bind advisories")
        if self._windowed_stages():
            await self.count_workers()  # a film submitted right now gets a window of the workers there are
        self._stopping.clear()
        await self._consume_legacy()
        # The first round before we say we started: a lone coordinator holds every partition by then
        # (those a dead one held lapse within the leases' TTL, and are taken at a later round).
        try:
            await through_failover(self.leases.round, "partition leases")
        except Exception as e:  # the event loop's rounds go on trying
            log.warning("first round of partition leases failed; trying again", error=repr(e))
        self._failed = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._event_loop(), name="coordinator-events"),
            asyncio.create_task(
                self._pull_loop(self._advisory_sub, self._on_advisory_message, "advisories"),
                name="coordinator-advisories",
            ),
            asyncio.create_task(self._tick_loop(), name="coordinator-ticks"),
        ]
        if self._windowed_stages():
            self._tasks.append(asyncio.create_task(self._workers_loop(), name="coordinator-workers"))
        for task in self._tasks:
            task.add_done_callback(self._on_task_done)
        log.info("coordinator started", workflows=sorted(self.graphs), policy=str(self.policy),
                 coordinator=self.id, partitions=sorted(self.leases.held), of=self.partitions)

    async def stop(self) -> None:
        """Finish the events in hand, then stop; unacked events go to the next coordinator.

        Bounded, and nothing it started runs on: the loops get STOP_FINISH_S to finish the events
        in hand, then the jobs' senders PUBLISH_TIMEOUT_S to confirm the events on the wire, and
        what is left is cancelled (`_finish`; what a sender did not publish stays in its job's
        outbox, which the next coordinator's tick sends). A stop that is itself cancelled cancels
        them at once and raises CancelledError. It used to swallow its own cancellation
        (contextlib.suppress(CancelledError) around its waits) and to leave the senders running:
        a caller's timeout went unnoticed while stop waited (the same pattern in the dashboard's
        stop hid tests/system/test_model.py's 751 s hang: captionbus.core.tasks)."""
        self._stopping.set()
        for stop, _, _ in self._pumps.values():  # the partitions' consumers: take no more events
            stop.set()
        pumps = [task for _, task, _ in self._pumps.values()]
        try:
            await _finish([*self._tasks, *pumps], STOP_FINISH_S)
            await _finish(self._sending, PUBLISH_TIMEOUT_S)  # events on the wire: their acks, briefly
            if self.leases is not None:  # handed over now, not after the leases' TTL
                await asyncio.wait_for(self.leases.release_all(), STOP_CANCEL_S)
        finally:
            for task in (*self._tasks, *pumps, *self._sending):  # our own cancellation: nothing runs on
                task.cancel()
            self._tasks = []
            if self._failed is not None:
                if not self._failed.done():
                    self._failed.set_result(None)
                elif not self._failed.cancelled() and self._failed.exception() is not None:
                    # Already logged when it happened, and raised to whoever waits on wait_failed().
                    log.error("coordinator stopped after a background task died",
                              error=str(self._failed.exception()))
            for sub in (self._advisory_sub, *(sub for _, _, subs in self._pumps.values() for sub in subs)):
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
            self._pumps, self._advisory_sub = {}, None
        log.info("coordinator stopped")

    @property
    def failed(self) -> asyncio.Future:
        """Done when the coordinator stops: with `CoordinatorTaskDied` set as its exception when
        a background task died while it ran, with None after a plain `stop()`."""
        if self._failed is None:
            raise RuntimeError("the coordinator has not been started")
        return self._failed

    async def wait_failed(self) -> None:
        """Raise `CoordinatorTaskDied` as soon as a background task dies; return None once
        `stop()` ran without that. Cancelling the wait leaves `failed` as it is."""
        await asyncio.shield(self.failed)

    def _on_task_done(self, task: asyncio.Task) -> None:
        if self._stopping.is_set() or self._failed is None or self._failed.done():
            return
        if task.cancelled():
            error = CoordinatorTaskDied(f"coordinator task {task.get_name()} was cancelled")
        elif task.exception() is not None:
            cause = task.exception()
            error = CoordinatorTaskDied(f"coordinator task {task.get_name()} died: {cause!r}")
            error.__cause__ = cause
        else:
            error = CoordinatorTaskDied(f"coordinator task {task.get_name()} returned while running")
        log.error("coordinator task died; no job advances until the coordinator is restarted",
                  task=task.get_name(), error=str(error), exc_info=error.__cause__)
        self._failed.set_exception(error)

    async def __aenter__(self) -> "Coordinator":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _ensure_consumer(self, partition: int) -> None:
        try:
            await self.js.add_consumer(subjects.EVENTS_STREAM,
                                       partition_consumer_config(partition, self.event_ack_wait_s))
        except APIError as e:
            # It exists with another config (an older version of us, or an operator's choice such
            # as memory storage, which the server refuses to change with a 500): use it as it is.
            if not isinstance(e, BadRequestError) and e.err_code != STORAGE_TYPE_FIXED:
                raise
            log.warning("partition consumer exists with another config; binding to it", partition=partition,
                        error=str(e))

    # ------------------------------------------------------------ partitions (leases.py)

    def _partition(self, job_id: str) -> int:
        return subjects.job_partition(job_id, self.partitions)

    def _owns(self, job_id: str) -> bool:
        """Whether `job_id` is in a partition we hold (every job before the leases' first round)."""
        return self.leases is None or self.leases.holds(self._partition(job_id))

    def _new_epoch(self, partition: int) -> None:  # (only once started: self.partitions is known)
        """Forget what we remember of the partition's jobs (read fresh from now on)."""
        self._epochs[partition] = self._epochs.get(partition, 0) + 1
        for job_id in [j for j in self._states if self._partition(j) == partition]:
            self._forget(job_id)

    async def _gain(self, partition: int, share: int) -> None:
        """A lease taken: read the partition's jobs fresh, consume its events (up to
        `events_in_hand` of them in hand at once: consume.PullConsumer, one pull request topped
        up as events come), tick its running jobs (the next tick scans the job keys)."""
        self._new_epoch(partition)
        await self._ensure_consumer(partition)
        stop = asyncio.Event()
        consumer = PullConsumer(self.nc, subjects.EVENTS_STREAM, subjects.partition_consumer(partition),
                                self.events_in_hand, self._on_event_message, stop)
        task = asyncio.create_task(consumer.run(), name=f"coordinator-partition-{partition}")
        self._pumps[partition] = (stop, task, [])
        self._last_scan = float("-inf")

    async def _consume_legacy(self) -> None:
        """While the consumer `coordinator` of the coordinators before job ownership exists on
        CB_EVENTS (a bus being upgraded: deploy/README.md, *Job ownership among coordinators*),
        consume it too: events of publishers not yet upgraded (their subjects have no partition),
        a few at a time. A bus made since has none: nothing is pulled."""
        try:
            await self.js.consumer_info(subjects.EVENTS_STREAM, subjects.COORDINATOR_CONSUMER)
        except NotFoundError:
            return
        log.info("consuming the events of older publishers too", consumer=subjects.COORDINATOR_CONSUMER)
        stop = asyncio.Event()
        consumer = PullConsumer(self.nc, subjects.EVENTS_STREAM, subjects.COORDINATOR_CONSUMER, LEGACY_IN_HAND,
                                self._on_legacy_event_message, stop, "events of older publishers")
        self._pumps[LEGACY_PUMP] = (stop, asyncio.create_task(consumer.run(), name="coordinator-legacy-events"), [])

    async def _lose(self, partition: int) -> None:
        """A lease released or lost: stop pulling the partition's events (those in hand are
        finished and acked, or left to the next holder after the ack wait), forget its jobs."""
        stop, task, subs = self._pumps.pop(partition, (None, None, []))
        if stop is not None:
            stop.set()
            await _finish([task], STOP_FINISH_S)
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._new_epoch(partition)
        self._running.difference_update([j for j in self._running if self._partition(j) == partition])

    # ------------------------------------------------------------ events

    async def _bind_advisories(self) -> Any:
        """A durable consumer on the stream that stores max-deliveries advisories."""
        config = ConsumerConfig(
            durable_name=subjects.COORDINATOR_ADVISORY_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.event_ack_wait_s,
            max_deliver=10,  # an advisory we can never handle must not loop forever
        )
        try:
            await self.js.add_consumer(subjects.ADVISORIES_STREAM, config)
        except BadRequestError as e:
            log.warning("advisory consumer exists with another config; binding to it", error=str(e))
        return await self.js.pull_subscribe_bind(
            durable=subjects.COORDINATOR_ADVISORY_CONSUMER, stream=subjects.ADVISORIES_STREAM
        )

    async def _on_advisory_message(self, msg: Any) -> None:
        await self._on_max_deliveries(msg)
        await msg.ack()

    async def _event_loop(self) -> None:
        """The partitions' leases (renewed, taken and released every quarter of their TTL), which
        start and stop the partitions' event loops (_gain, _lose)."""
        assert self.leases is not None
        await self._every(self.leases.renew_s, self.leases.round, "partition lease round failed")

    async def _pull_loop(self, sub: Any, handle, what: str, stop: asyncio.Event | None = None) -> None:
        while not self._stopping.is_set() and not (stop is not None and stop.is_set()):
            try:
                # batch=1 on purpose: nats-py's fetch, once a first message arrives on a waiting
                # pull, waits out the whole timeout for the rest of the batch — a second of
                # latency per stage hop. Events are taken by several of these loops at once.
                msgs = await sub.fetch(batch=1, timeout=1.0)
            except asyncio.TimeoutError:  # nats raises its own subclass, or asyncio's, when idle
                continue
            except Exception as e:  # reconnecting, server restarting: try again shortly
                log.warning(f"fetching {what} failed", error=repr(e))
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                try:
                    await handle(msg)
                except Exception as e:  # e.g. an ack or nak lost in a reconnect: the server redelivers
                    log.exception(f"handling one of the {what} failed; it will be redelivered",
                                  subject=getattr(msg, "subject", None), error=repr(e))

    async def _later(self, msg: Any, event: Any) -> bool:
        """Put an early result back for a while (its triggering event is being redelivered);
        give up on it after EARLY_RESULT_PATIENCE ack waits so a stray one cannot circle forever."""
        deliveries = msg.metadata.num_delivered if msg.metadata else 1
        if deliveries * EARLY_RESULT_RETRY_S > EARLY_RESULT_PATIENCE * self.event_ack_wait_s:
            log.warning("early stage result never became applicable; dropped", job_id=event.job_id,
                        node=getattr(event, "node", None), attempt=getattr(event, "attempt", None))
            return False
        await msg.nak(delay=EARLY_RESULT_RETRY_S)
        return True

    async def _on_legacy_event_message(self, msg: Any) -> None:
        """An event in the subject layout before job ownership (an older publisher's, during an
        upgrade), from the consumer `coordinator` older coordinators shared: any coordinator
        applies it, whoever owns its job (the revision check of the write keeps one outcome)."""
        await self._on_event_message(msg, legacy=True)

    async def _on_event_message(self, msg: Any, legacy: bool = False) -> None:
        try:
            event = parse_event(msg.data)
        except ValidationError as e:
            log.error("unreadable job event dropped", subject=msg.subject, error=str(e).splitlines()[0])
            await msg.term()
            return
        if misfiled := misfiled_event(msg.subject, event, legacy):
            # Permissions see the subject, not the body: a tenant may publish only on its own jobs'
            # subjects, so an event is about the job its subject names or it is not applied.
            log.warning("job event refused", subject=msg.subject, job_id=event.job_id, reason=misfiled)
            await msg.term()
            return
        try:
            decision = await self.apply(event)
            if decision.retry_later and await self._later(msg, event):
                return
        except Exception as e:
            deliveries = msg.metadata.num_delivered if msg.metadata else 1
            if self.event_retry.exhausted(deliveries):
                # A bug or a broken state, not a blip: stop the hot loop, keep the evidence in the
                # log, and fail the job so that nobody waits for it forever.
                log.exception("applying event failed on every try; dropped, job failed", job_id=event.job_id,
                              kind=event.kind, event_id=event.event_id, tries=deliveries, error=str(e))
                await self._give_up(event, e, deliveries)
                await msg.term()
                return
            log.warning("applying event failed; will be redelivered", job_id=event.job_id,
                        kind=event.kind, error=str(e), tries=deliveries)
            await msg.nak(delay=self.event_retry.delay(deliveries))
            return
        await msg.ack()

    async def _give_up(self, event: Any, error: Exception, tries: int) -> None:
        """Fail the job of an event that could not be applied: mark its state failed (best
        effort: the state may be what is broken) and publish `JobFailed` in any case."""
        job_id = event.job_id
        jlog = log.bind(job_id=job_id, kind=event.kind)
        then = "submit the job again" if event.kind == "submitted" else f"`captionbus retry {job_id}`"
        reason = (
            f"coordinator error: could not apply the {event.kind} event {event.event_id} after {tries} tries "
            f"({type(error).__name__}: {error}); see the coordinator log, fix the cause, then {then}"
        )
        state = revision = None
        async with self._owning(job_id):
            try:
                state, revision = await self.read_state(job_id)
            except Exception as e:
                jlog.warning("could not read the job's state to fail it", error=repr(e))
            decision = give_up(state, job_id, event.event_id, reason, self.clock())
            if not decision.changed:
                jlog.warning("event dropped; the job had already finished", note=decision.note)
                return
            if decision.state is not None:
                try:
                    await self._commit(job_id, decision, revision, jlog)
                except Exception as e:
                    self._forget(job_id)
                    jlog.warning("could not mark the job failed in its state", error=repr(e))
        for failed in decision.events:  # already out through the outbox, or not: same id, deduplicated
            try:
                await self._publish_event(failed)
            except Exception as e:
                jlog.error("could not publish the job's failure", error=repr(e))
        jlog.warning("job failed", reason=reason)

    async def apply(self, event: Any) -> Decision:
        """Apply one event (or Tick) to its job: read, decide, publish, write; re-decide on conflict.

        The state comes from what this process last read or wrote of the job (`_remembered`)
        when that is recent, else from the KV; a decision on a remembered state is only ever
        kept through a revision-checked write. One that changes nothing (the event ignored, or
        put back for later) is made again on the stored state before it counts: a remembered
        state another coordinator has moved on from would otherwise drop a valid result."""
        job_id = event.job_id
        jlog = log.bind(job_id=job_id, kind=getattr(event, "kind", "tick"))
        async with self._owning(job_id):
            return await self._apply(event, job_id, jlog)

    async def _apply(self, event: Any, job_id: str, jlog: Any) -> Decision:
        remembered = self._remembered(job_id)
        # A job's submission, on no state, unread: the create is the check (it fails when the job
        # exists, and then the stored state is read and decided on), so the KV read that used to
        # come first is left out: one round trip less per job. Its requests go out once the create
        # has landed (`_commit`, after_write), so a create that fails publishes nothing, and no
        # worker can answer one before the job's state exists (another coordinator handed such a
        # result re-read the state up to four times, EARLY_REREAD_S).
        unread_submit = remembered is None and isinstance(event, JobSubmitted)
        rereads = list(EARLY_REREAD_S)
        for _ in range(MAX_WRITE_CONFLICTS):
            if remembered is not None:
                (state, revision), remembered, stored = remembered, None, False
            elif unread_submit:
                (state, revision), stored = (None, None), False
            else:
                (state, revision), stored = await self.read_state(job_id), True
            workflow = state.spec.workflow if state else getattr(getattr(event, "spec", None), "workflow", None)
            decision = decide(state, event, self.graphs.get(workflow), self.clock(), self.policy, self._workers)
            if not decision.changed and not stored:
                continue  # confirm it on the stored state
            if decision.retry_later and rereads:
                # Most often the coordinator that sent the request is writing its state right now.
                await asyncio.sleep(rereads.pop(0))
                continue
            if not decision.changed:
                if (decision.note or "").startswith("refused "):  # a result without its request's token
                    jlog.warning("forged result refused", note=decision.note,
                                 claimed_worker=getattr(event, "worker", None))
                else:
                    jlog.debug("event ignored", note=decision.note)
                if state is not None:
                    await self._flush_outbox(job_id, state, revision, jlog)
                return decision
            try:
                await self._commit(job_id, decision, revision, jlog, after_write=unread_submit)
            except KeyWrongLastSequenceError:
                self._forget(job_id)
                if stored:
                    jlog.info("job state changed under us; deciding again")
                unread_submit = False
                continue
            self._log_decision(decision, jlog)
            return decision
        raise StateConflict(f"job {job_id}: state kept changing; gave up after {MAX_WRITE_CONFLICTS} tries")

    async def read_state(self, job_id: str) -> tuple[JobState | None, int | None]:
        """The job's stored state and revision (None, None: no such job), remembered."""
        try:
            entry = await self.kv.get(subjects.job_key(job_id))
        except (KeyNotFoundError, KeyDeletedError):
            self._forget(job_id)
            return None, None
        state = JobState.model_validate_json(entry.value)
        if state.parts:
            state = state.with_parts(await self._read_parts(state))
        self._remember(job_id, state, entry.revision)
        return state, entry.revision

    async def _read_parts(self, head: JobState) -> dict[str, NodeState]:
        """The nodes `head` names by part (JobState.parts): from the parts this process wrote or
        read (a part never changes: it is named by its bytes), the rest read from the KV at once.
        A part the KV lacks is an error (MissingParts): the record names it, so it was
        written before the record, and gc collects both together."""
        found: dict[str, NodeState] = {}
        wanted: dict[str, str] = {}
        for name, key in head.part_keys().items():
            node = self._parts.get(key)
            if node is not None:
                self._parts.move_to_end(key)
                found[name] = node
            else:
                wanted[name] = key

        async def get(name: str, key: str) -> None:
            async with self._part_reads:
                try:
                    value = (await self.kv.get(key)).value
                except (KeyNotFoundError, KeyDeletedError):
                    # A direct get may be answered by a replica that lacks a part just written
                    # (another coordinator's): the stream's leader says whether it is there.
                    try:
                        msg = await self.js.get_msg(f"KV_{subjects.JOBS_BUCKET}",
                                                    subject=f"$KV.{subjects.JOBS_BUCKET}.{key}")
                    except NotFoundError:
                        raise MissingParts(head.job_id, [key]) from None
                    if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
                        raise MissingParts(head.job_id, [key]) from None
                    value = msg.data
            found[name] = node_of_part(name, value)
            self._keep_part(key, found[name])

        await asyncio.gather(*(get(name, key) for name, key in wanted.items()))
        return found

    def _keep_part(self, key: str, node: NodeState) -> None:
        self._parts[key] = node
        while len(self._parts) > PARTS_KEPT:
            self._parts.popitem(last=False)

    # ------------------------------------------------------------ what we last saw of a job

    def _remember(self, job_id: str, state: JobState, revision: int) -> None:
        if state.status.finished and not state.outbox:
            self._forget(job_id)
            return
        epoch = self._epochs.get(self._partition(job_id)) if self.leases is not None and self._owns(job_id) else None
        self._states[job_id] = (state, revision, time.monotonic(), epoch)
        self._states.move_to_end(job_id)
        while len(self._states) > STATE_MEMORY_JOBS:
            self._states.popitem(last=False)

    def _forget(self, job_id: str) -> None:
        self._states.pop(job_id, None)

    def _remembered(self, job_id: str) -> tuple[JobState, int] | None:
        """The state (and revision) we last read or wrote of `job_id`, if we have held its
        partition since (no other coordinator consumes its events: leases.py), or else if that
        was less than STATE_MEMORY_S ago; else None. Decisions on it skip the KV read (1 of a hop's 6 round
        trips, and the parse of the state: 4 ms for a 2-hour film's) and are checked by the
        revision of the write. Why STATE_MEMORY_S stays well under the requests stream's
        duplicate window (120 s): stage requests go out with the write (at the same time, not
        after it), so a decision on a state another coordinator has moved on from may publish
        one although its write fails. It
        asks for a (node, attempt) the remembered state had not requested; if the stored state
        has requested it since, that was less than STATE_MEMORY_S ago, so JetStream drops ours
        as a repeat of the same Nats-Msg-Id; if not, its result fails the attempt check (wasted
        work, as in any lost race)."""
        entry = self._states.get(job_id)
        if entry is None:
            return None
        owned = entry[3] is not None and self._owns(job_id) and entry[3] == self._epochs.get(self._partition(job_id))
        if not owned and time.monotonic() - entry[2] > STATE_MEMORY_S:
            return None
        return entry[0], entry[1]

    @contextlib.asynccontextmanager
    async def _owning(self, job_id: str):
        """One event or tick of `job_id` at a time in this coordinator (the event loops handle
        different jobs at once). Across coordinators the revision checks keep a job from being
        advanced twice, and JetStream hands an event whose coordinator died to another."""
        entry = self._locks.setdefault(job_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._locks.pop(job_id, None)

    async def _write_state(self, job_id: str, state: JobState, revision: int | None) -> int:
        if state.written_by != self.id:
            state = state.model_copy(update={"written_by": self.id})
        value = state.stored()
        if revision is None:
            written = await self.kv.create(subjects.job_key(job_id), value)
        else:
            written = await self.kv.update(subjects.job_key(job_id), value, last=revision)
        self._note_status(job_id, state)
        self._remember(job_id, state, written)
        return written

    def _note_status(self, job_id: str, state: JobState) -> None:
        # A finished job whose events are still in its outbox stays on the tick loop's list.
        if state.status.finished and not state.outbox:
            self._finished.add(job_id)
            self._running.discard(job_id)
        else:
            self._finished.discard(job_id)
            self._running.add(job_id)

    async def _commit(self, job_id: str, decision: Decision, revision: int | None, jlog: Any,
                      after_write: bool = False) -> None:
        """Carry out a decision: the stage requests and the state write at once (the write
        raises KeyWrongLastSequenceError when it loses the race), then the job events.

        The requests and the events are written into the state's outbox with the decision. The
        requests go out together with that write, not before or after it: one round trip on a
        hop's path instead of two (on the 3-node cluster each is a replicated, fsynced store,
        ~2 ms; on the 2-core machine of README's figures a hop waits for CPU instead, and its p50
        did not move: benchmarks/stage_hops.py --coordinators). Once the write has landed the
        decision is done, whatever became of its requests: one whose publish failed is logged,
        stays in the written outbox and goes out again from there (`_send`, at once and at the
        next tick), and the event that triggered it is acked as applied (failing it would count
        toward giving the job up, and its redelivery would find itself applied anyway). One
        published by a decision whose write lost the race refers to a (node, attempt) the winning
        state either also requested (same `Nats-Msg-Id`, deduplicated) or never will (its result
        fails the attempt check). The events are published only once the write succeeded, so a
        decision that lost the race never announces anything. With `after_write` (a decision on
        a state that was not read: a submission's, or a tick's on the remembered state) the
        requests too go out only once the write has landed: such a decision may be on a state
        that is gone or has moved on, and its write is what finds out.
        A running job's outbox is not cleared by a write of its own: what we published leaves
        it with the job's next write (or the tick loop's, when the job waits), which took a
        second state write off each stage hop.
        """
        state = decision.state
        # Before the state that names them (decide.PutRecordPart), all at once.
        await asyncio.gather(*(self.kv.put(part.key, part.value) for part in decision.parts))
        for node in state.nodes.values() if decision.parts else ():
            if node.part is not None:
                key = subjects.job_part_key(job_id, node.part)
                if key not in self._parts:
                    self._keep_part(key, node)
        requests = decision.requests
        entries = [request_entry(request) for request in requests]
        outbox = [*self._kept(job_id, state, self.clock(), jlog), *entries,
                  *(event.model_dump(mode="json") for event in decision.events)]
        state = state.model_copy(update={"outbox": outbox})
        publishes = (self._publish_request(request) for request in requests)
        if after_write:
            written = await self._write_state(job_id, state, revision)
            sent = await asyncio.gather(*publishes, return_exceptions=True)
        else:
            written, *sent = await asyncio.gather(self._write_state(job_id, state, revision), *publishes,
                                                  return_exceptions=True)
        if isinstance(written, BaseException):
            raise written
        # What we published of the outbox before this write is out of it now; what was published
        # since (by the job's sender, _send) and this write's requests are in it.
        kept = {outbox_id(raw) for raw in outbox}
        published = self._published.setdefault(job_id, set())
        published.intersection_update(kept)
        unsent = self._unsent.setdefault(job_id, set())
        unsent.intersection_update(kept)
        for request, entry, error in zip(requests, entries, sent, strict=True):
            if error is None:
                published.add(outbox_id(entry))
                continue
            unsent.add(outbox_id(entry))
            jlog.warning("stage request not sent; it goes out again from the job's outbox",
                         node=request.node, attempt=request.attempt, error=repr(error))
        if not unsent:
            self._unsent.pop(job_id, None)
        # A finished job's events go out now and its outbox is cleared, unless the job's sender is
        # still busy: then they go out after it, as a running job's, and a tick clears the outbox.
        await self._flush_outbox(job_id, state, written, jlog,
                                 clear=state.status.finished and not self._sender_busy(job_id))

    def _kept(self, job_id: str, state: JobState, now: datetime, jlog: Any) -> list[dict[str, Any]]:
        """The entries of `state`'s outbox that stay in it: those we have not published and that
        are still `awaited`. A request left there past REQUEST_RESEND_LIMIT_S is said in the log:
        its node's deadline decides what becomes of it."""
        published = self._published.get(job_id, set())
        kept = []
        for raw in state.outbox:
            if outbox_id(raw) in published:
                continue
            if awaited(raw, state, now):
                kept.append(raw)
            elif (node := waiting_node(raw, state)) is not None:
                jlog.warning("stage request not sent again: too old for the requests stream's duplicate window; "
                             "its node's deadline decides", node=raw[REQUEST_ENTRY].get("node"),
                             attempt=node.attempt, age_s=round(request_age_s(node, now)),
                             deadline_at=str(node.deadline_at))
        return kept

    def _others_due(self, job_id: str, state: JobState) -> bool:
        """Whether `state`'s outbox holds a request of another coordinator due to go out again."""
        published, unsent, now = self._published.get(job_id, set()), self._unsent.get(job_id, set()), self.clock()
        return any(REQUEST_ENTRY in raw and (entry := outbox_id(raw)) not in published and entry not in unsent
                   and resend_due(raw, state, now, own=False) for raw in state.outbox)

    async def _publish_request(self, request: StageRequest) -> None:
        """Publish one stage request (`_stored`)."""
        await _stored(lambda: self.js.publish(subjects.stage_request(request.stage),
                                              request.model_dump_json().encode(),
                                              headers={"Nats-Msg-Id": request.key}))

    async def _flush_outbox(self, job_id: str, state: JobState, revision: int | None, jlog: Any,
                            clear: bool = True) -> None:
        """Publish what of `state`'s outbox is ours to send (`_send`: the events we have not
        published, in order; the requests due to go out again), then (`clear`) write the state
        without what is out. Never raises: what is not published stays in the state, and the
        tick loop tries again.

        Without `clear` (a running job's own write) a task of its own publishes them (`_send`),
        not under the job's lock: the next event of the job (its next stage's result, which a
        fast stage sends within that round trip) is decided at once instead of one more
        replicated store later. That is safe because the entries stay in the written outbox
        until published: a later write of the job carries those not published yet, and its own
        task waits for this one before it publishes them (not twice, and no event ahead of an
        earlier one); what fails is sent again by the next write's task or the tick loop. With
        `clear`, nothing is sent or cleared while a task of the job still publishes (the tick
        loop tries again; it no longer waits for the task, which held up every job's tick behind
        one stuck publish).

        A clearing write keeps what still has to go out (another coordinator's request younger
        than OUTBOX_GRACE_S, which its writer sends) and is left out when it would change nothing."""
        if not state.outbox:
            return
        if not clear:
            self._running.add(job_id)  # the tick loop clears the outbox if no event does first
            task = asyncio.create_task(self._send(job_id, state, jlog, after=self._senders.get(job_id)),
                                       name=f"coordinator-send-{job_id}")
            self._senders[job_id] = task
            self._sending.add(task)
            task.add_done_callback(lambda done: self._sender_done(job_id, done))
            return
        if self._sender_busy(job_id):
            # Its sender still publishes (a slow or stuck bus: each publish may take PUBLISH_TIMEOUT_S):
            # it sends what it has, a later tick the rest and clears the outbox. Waiting for it here
            # held up the tick of every job after this one (and a finished job's write, its lock).
            self._running.add(job_id)
            return
        if not await self._send(job_id, state, jlog):
            return
        keep = self._kept(job_id, state, self.clock(), jlog)
        if keep:
            self._running.add(job_id)  # sent again by the tick loop once due
        if len(keep) == len(state.outbox):
            return
        try:
            await self._write_state(job_id, state.model_copy(update={"outbox": keep}), revision)
        except KeyWrongLastSequenceError:
            # The state moved on; its writer carried these entries along and publishes them too
            # (same ids: JetStream drops the repeats).
            self._forget(job_id)
            jlog.debug("outbox published; the state changed before it was cleared")
            return
        except Exception as e:
            jlog.warning("clearing the job's outbox failed; the tick loop tries again", error=repr(e))
            self._running.add(job_id)
            return
        if not keep:
            self._published.pop(job_id, None)
            self._unsent.pop(job_id, None)

    async def _send(self, job_id: str, state: JobState, jlog: Any, after: asyncio.Task | None = None) -> bool:
        """Publish, once `after` (the job's sender before this one) is done, the entries of
        `state`'s outbox we have not published: the requests due to go out again (`resend_due`)
        at once, and the events one after the other in outbox order (the order they were
        decided), each once the one before it is stored. The first event that fails holds back
        the rest: a later one stored ahead of it would reach the job's watchers and webhooks out
        of order (pipelined, an event whose publish failed was sent again by the tick loop after
        the next stage's events had been stored). It and those after it go out again, in order,
        with the job's next write or tick. True when nothing failed; never raises."""
        if after is not None:
            await asyncio.wait([after])
        now = self.clock()
        published = self._published.get(job_id, set())
        unsent = self._unsent.get(job_id, set())
        events, requests = [], []
        for raw in state.outbox:
            entry = outbox_id(raw)
            if entry in published:
                continue
            if REQUEST_ENTRY not in raw:
                events.append(raw)
            elif resend_due(raw, state, now, own=entry in unsent):
                requests.append(raw)
        if not events and not requests:
            return True
        done = await asyncio.gather(self._send_events(job_id, events, jlog),
                                    *(self._resend(job_id, raw, jlog) for raw in requests), return_exceptions=True)
        if all(result is True for result in done):
            return True
        self._running.add(job_id)
        return False

    async def _send_events(self, job_id: str, events: list[dict[str, Any]], jlog: Any) -> bool:
        for raw in events:
            try:
                event = parse_event(raw)
            except ValidationError as e:
                jlog.error("unreadable entry in the job's outbox dropped", error=str(e).splitlines()[0])
                self._published.setdefault(job_id, set()).add(outbox_id(raw))  # leaves with the next write
                continue

            async def publish(event: JobEvent = event) -> None:
                # js.publish, bounded as a whole: publish_async's permit wait has no bound (a
                # publish that raised after registering its ack never gives its permit back)
                await asyncio.wait_for(self._publish_event(event), PUBLISH_TIMEOUT_S)

            try:
                await _stored(publish)
            except Exception as e:
                jlog.warning("publishing a job event failed; it and the job's later events go out again, in order, "
                             "with its next write or tick", event_id=event.event_id, error=repr(e))
                return False
            self._published.setdefault(job_id, set()).add(event.event_id)
        return True

    async def _resend(self, job_id: str, raw: Mapping[str, Any], jlog: Any) -> bool:
        """Publish a request of the outbox again (its write went out without it, or its writer
        may have: the same Nats-Msg-Id, so a repeat inside the duplicate window is dropped)."""
        try:
            request = StageRequest.model_validate(raw[REQUEST_ENTRY])
        except ValidationError as e:
            jlog.error("unreadable entry in the job's outbox dropped", error=str(e).splitlines()[0])
            self._published.setdefault(job_id, set()).add(outbox_id(raw))
            return True
        try:
            await asyncio.wait_for(self._publish_request(request), PUBLISH_TIMEOUT_S)
        except Exception as e:
            jlog.warning("sending a stage request again failed; the next write or tick tries again",
                         node=request.node, attempt=request.attempt, error=repr(e))
            return False
        self._published.setdefault(job_id, set()).add(outbox_id(raw))
        self._unsent.get(job_id, set()).discard(outbox_id(raw))
        jlog.info("stage request sent again from the outbox", node=request.node, attempt=request.attempt)
        return True

    def _sender_done(self, job_id: str, task: asyncio.Task) -> None:
        self._sending.discard(task)
        if self._senders.get(job_id) is task:
            del self._senders[job_id]

    def _sender_busy(self, job_id: str) -> bool:
        """Whether a task still publishes `job_id`'s outbox (`_send`)."""
        task = self._senders.get(job_id)
        return task is not None and not task.done()

    async def _publish_event(self, event: JobEvent) -> None:
        await publish_event(self.js, event, secret=self.policy.result_secret)  # ids no outsider can take first

    @staticmethod
    def _log_decision(decision: Decision, jlog: Any) -> None:
        state = decision.state
        for request in decision.requests:
            jlog.info("stage requested", stage=request.stage, node=request.node, attempt=request.attempt)
        for event in decision.events:
            if event.kind == "failed":
                jlog.warning("job failed", reason=event.reason, node=event.node)
            elif event.kind in ("completed", "cancelled", "started"):
                jlog.info(f"job {event.kind}", status=state.status.value)
        waiting = [n for n, s in state.nodes.items() if s.status.value == "retry_wait"]
        if waiting:
            jlog.info("waiting to retry", nodes=waiting)

    # ------------------------------------------------------------ timers

    async def _every(self, interval_s: float, work: Callable[[], Any], failed: str) -> None:
        """await work() every interval_s until stopped; a failure is logged, the next goes on."""
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)
            if self._stopping.is_set():
                return
            try:
                await work()
            except Exception as e:
                log.warning(failed, error=str(e))

    async def _tick_loop(self) -> None:
        await self._every(self.tick_interval_s, self.tick_once, "tick failed")

    async def tick_once(self) -> None:
        """Apply Tick to every running job (deadlines, backoffs). Conflicts wait for the next tick."""
        if time.monotonic() - self._last_scan >= self.rescan_interval_s:
            await self._scan_keys()
        now = self.clock()
        self._served_now = {}  # one $SRV ping per stage per tick
        for job_id in sorted(self._running):
            if self._stopping.is_set():
                return
            if not self._owns(job_id):  # its partition's holder ticks it
                self._running.discard(job_id)
                continue
            try:
                await self._tick_job(job_id, now)
            except Exception as e:  # one broken job must not stop the clock for the others
                log.warning("tick failed", job_id=job_id, error=str(e))

    async def _tick_job(self, job_id: str, now: datetime) -> None:
        """Tick one job: on the state we remember when it is recent (most ticks change
        nothing and then cost no round trip; one that changes it is written at the remembered
        revision, its requests after the write), else on the stored one."""
        async with self._owning(job_id):
            remembered = self._remembered(job_id)
            state, revision = remembered if remembered is not None else await self.read_state(job_id)
            if state is None:
                self._running.discard(job_id)
                return
            self._note_status(job_id, state)
            jlog = log.bind(job_id=job_id, kind="tick")
            decision = None
            if not state.status.finished:
                if self.unserved_s:
                    await self._fail_unserved(state, jlog)
                decision = decide(state, Tick(now), self.graphs.get(state.spec.workflow), now, self.policy,
                                  self._workers)
                # A change decided on the remembered state is written at its revision with its
                # requests sent after the write (`_commit`, after_write): a state that moved on
                # makes the write fail and nothing go out, and the next tick reads the stored one.
                # (It used to read the stored state first and decide again: a read before a write
                # that already checks the revision.)
            if decision is None or not decision.changed:
                # What a coordinator wrote and did not get to publish (it died, the bus blinked).
                if remembered is not None and self._others_due(job_id, state):
                    # resend another coordinator's request only if the stored state still has it
                    state, revision = await self.read_state(job_id)
                    if state is None:
                        return
                await self._flush_outbox(job_id, state, revision, jlog)
                return
            try:
                await self._commit(job_id, decision, revision, jlog, after_write=remembered is not None)
            except KeyWrongLastSequenceError:
                self._forget(job_id)
                return  # an event got there first; the next tick sees its state
            self._log_decision(decision, jlog)

    def _windowed_stages(self) -> list[str]:
        """Stages of the fan-out nodes that have a window (max_in_flight), in any workflow."""
        return sorted({spec.stage_name(name) for graph in self.graphs.values()
                       for name, spec in graph.nodes.items() if spec.for_each and spec.max_in_flight})

    async def _workers_loop(self) -> None:
        await self._every(self.workers_interval_s, self.count_workers, "counting workers failed")

    async def count_workers(self) -> dict[str, int]:
        """Slots of the replicas of each windowed stage that answer $SRV STATS, those whose setup
        failed left out (they take no work); a replica still loading counts, it will serve. A
        replica counts for the requests it runs at once (its metadata's `slots`, WorkerInfo; 1
        when absent, as an older worker's), so one asr process with two decoders sharing its
        model (`run --replicas 2` on a CPU host) gets a film two chunks at once, as two
        processes did. Counted by one
        Census (core.discovery, the source `captionbus workers` and the dashboard read too): it
        waits for the replicas it counted last time, and keeps one that misses a single ask, so
        a worker answering late under load is not counted out of a film's window (it was, with
        a fixed 0.25 s wait); one that misses two asks in a row, or stops when it was the
        stage's last (the server says nothing subscribes), is out."""
        counts = {stage: await self._census.count(self.nc, stage) for stage in self._windowed_stages()}
        if counts != self._workers:
            log.info("live workers", **counts)
        self._workers = counts
        return counts

    async def _stage_served(self, stage: str) -> bool:
        """Whether any replica of `stage` answers a $SRV PING now (it registers once set up)."""
        if stage not in self._served_now:
            try:
                await self.nc.request(f"$SRV.PING.{subjects.micro_service_name(stage)}", b"", timeout=1.0)
                self._served_now[stage] = True
            except Exception:  # no responders, or a timeout
                self._served_now[stage] = False
            if self._served_now[stage]:
                self._unserved_since.pop(stage, None)
            else:
                self._unserved_since.setdefault(stage, time.monotonic())
        return self._served_now[stage]

    async def _fail_unserved(self, state: JobState, jlog: Any) -> None:
        """Publish a StageFailed for each requested node whose stage has had no worker for
        `unserved_s`; applied through our own consumer like any result (the id dedups)."""
        for node_id, node in state.nodes.items():
            if node.status != NodeStatus.requested or await self._stage_served(node.stage):
                continue
            waited = time.monotonic() - self._unserved_since[node.stage]
            if waited < self.unserved_s:
                continue
            secret = self.policy.result_secret
            failure = StageFailed(
                event_id=f"{state.job_id}.{node_id}.{node.attempt}.unserved",
                job_id=state.job_id, stage=node.stage, node=node_id, attempt=node.attempt,
                reason=(f"no worker serves {node.stage}: none has answered for {waited:.0f} s "
                        f"(CAPTIONBUS_UNSERVED_TIMEOUT); start one (`captionbus serve {node.stage}`) "
                        "or read why it stopped in its log"),
                error_type="unserved", retryable=False,
                token=result_token(secret, state.job_id, node_id, node.attempt) if secret else None,
            )
            jlog.warning("stage unserved; failing its node", node=node_id, stage=node.stage, seconds=round(waited))
            await self._publish_event(failure)

    async def _scan_keys(self) -> None:
        self._last_scan = time.monotonic()
        keys = await record_keys(self.js)
        self._running.update(j for j in map(subjects.job_id_of_key, filter(subjects.is_job_key, keys))
                             if j not in self._finished and self._owns(j))

    # ------------------------------------------------------------ poison requests

    async def _on_max_deliveries(self, msg: Any) -> None:
        """A request every delivery of which crashed or timed out: fail it for good.

        Advisories reach us through the CB_ADVISORIES stream (kept while no coordinator runs). We
        publish the failure as a StageFailed *event*: durable, visible to dashboards, applied by
        our own consumer like any other.
        Its id is derived from the request key, so a repeated advisory is applied once.
        """
        log.debug("max-deliveries advisory", subject=msg.subject)
        try:
            advisory = json.loads(msg.data)
            stream = advisory.get("stream") or subjects.REQUESTS_STREAM
            seq = int(advisory["stream_seq"])
            deliveries = advisory.get("deliveries")
            raw = await self.js.get_msg(stream, seq)
            request = StageRequest.model_validate_json(raw.data)
        except NotFoundError:
            return  # already removed: handled before
        except Exception as e:
            log.warning("max-deliveries advisory not understood", error=str(e), subject=msg.subject)
            return
        times = f"every one of {deliveries}" if deliveries else "every one of its"
        failure = StageFailed(
            event_id=f"{request.key}.max_deliveries",
            job_id=request.job_id, stage=request.stage, node=request.node, attempt=request.attempt,
            reason=f"stage {request.stage} crashed or timed out on {times} deliveries",
            error_type="max_deliveries", retryable=False, token=request.token,
        )
        log.warning("stage request exhausted its deliveries", job_id=request.job_id, stage=request.stage,
                    node=request.node, attempt=request.attempt, deliveries=deliveries)
        # Errors propagate: the advisory is not acked and comes back (the event id dedups).
        await self._publish_event(failure)
        # The work queue keeps a message that hit max_deliver; it will never be delivered again.
        await self.js.delete_msg(stream, seq)


def result_secret(settings: Settings) -> bytes:
    """The key of request tokens (captionbus.coordinator.decide.result_token): CAPTIONBUS_RESULT_SECRET, else
    HOME/coordinator.secret, created once (0600). Coordinators that share a bus must share it (set
    the variable on each); one restarted with the same home keeps its in-flight requests valid."""
    if settings.result_secret:
        return settings.result_secret.encode()
    path = settings.home / "coordinator.secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


async def run_coordinator(
    nc: NATS,
    graphs_dir: str | Path | None = None,
    policy: Policy = Policy(),
    stop_event: asyncio.Event | None = None,
    **options: Any,
) -> None:
    """Run until `stop_event` is set (forever without one). Options go to `Coordinator`.

    Raises `CoordinatorTaskDied` (after stopping the coordinator) as soon as one of its
    background tasks dies, so whoever awaits this notices instead of waiting on a coordinator
    that no longer advances anything.
    """
    settings = settings_mod.load()
    if policy.result_secret is None:
        policy = dataclasses.replace(policy, result_secret=result_secret(settings))
    options.setdefault("unserved_s", settings.unserved_timeout)
    options.setdefault("event_ack_wait_s", settings.event_ack_wait)
    coordinator = Coordinator(nc, graphs_dir=graphs_dir, policy=policy, **options)
    await coordinator.start()
    waits = [asyncio.ensure_future(coordinator.wait_failed())]
    if stop_event is not None:
        waits.append(asyncio.ensure_future(stop_event.wait()))
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for finished in done:
            finished.result()  # CoordinatorTaskDied from wait_failed
    finally:
        for wait in waits:
            wait.cancel()
        await coordinator.stop()
