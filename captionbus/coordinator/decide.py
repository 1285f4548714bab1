"""The coordinator's decisions: a pure function of (job state, event, graph, time, policy).

No I/O and no clocks here: `decide` returns the next state and the messages to publish, and
the adapter (`captionbus.coordinator.service`) does the publishing and the state write. Every id it
emits is derived from the state transition (request key, trigger event id), so deciding the
same thing twice publishes the same message ids and JetStream dedup swallows the repeat.
"""
from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Mapping, Union

from captionbus.contracts import (
    BranchFailed,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobFailed,
    JobRetryRequested,
    JobStarted,
    JobState,
    JobStatus,
    JobSubmitted,
    NodeState,
    NodeStatus,
    StageCompleted,
    StageFailed,
    StageRequest,
    StageRequested,
    request_key,
)
from captionbus.contracts import subjects
from captionbus.contracts.artifacts import ArtifactRef
from captionbus.contracts.failures import classify as failure_class
from captionbus.contracts.stage_specs import STAGES
from captionbus.contracts.events import JobEvent
from captionbus.coordinator.graph import JobPlan, PlannedNode, Source, Workflow
from captionbus.core.retry import RetryPolicy
from captionbus.core.text import one_line

APPLIED_KEPT = 500  # event ids remembered per job; older duplicates are caught by attempt checks
# Automatic retries of a failed node: 3 attempts (a manual retry grants as many again; a node's
# own max_attempts wins), waiting 2 s after the first failure, doubling, at most 2 minutes.
NODE_RETRY = RetryPolicy(initial_s=2.0, multiplier=2.0, max_s=120.0, max_attempts=3)


@dataclass(frozen=True)
class Tick:
    """Time passed: deadlines and retry backoffs may have come due.

    `decide` reads the time from its `now` argument for every event; `now` here says when the
    tick was made, for logs.
    """

    now: datetime


@dataclass(frozen=True)
class Policy:
    retry: RetryPolicy = NODE_RETRY  # per node; needs max_attempts
    stage_deadline_s: float = 3600.0  # when the workflow node sets none
    # With a secret, every request carries result_token(secret, job, node, attempt) and a result
    # without that token is refused: a worker credential can report only on requests it was
    # handed (it sees a request's token only by fetching that request). None: no check.
    result_secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.retry.max_attempts is None:
            raise ValueError("Policy.retry needs max_attempts: a node cannot be retried forever")


@dataclass(frozen=True)
class PublishRequest:
    request: StageRequest


@dataclass(frozen=True)
class PublishEvent:
    event: JobEvent


@dataclass(frozen=True)
class PutRecordPart:
    """Write `value` under KV cb_jobs key `key` (subjects.job_part_key) before the state that
    names it: a part of the record (a completed node, NodeState.part; a speaker summary,
    NodeState.speaker_turns_key) written once instead of with each rewrite of the record. Its
    key is named by its bytes (subjects.part_name): writing it again writes the same bytes."""
    key: str
    value: bytes


Action = Union[PublishRequest, PublishEvent, PutRecordPart]
Trigger = Union[
    JobSubmitted, StageCompleted, StageFailed, JobCancelRequested, JobRetryRequested, Tick
]


@dataclass(frozen=True)
class Decision:
    state: JobState | None  # the state to write; the input object itself when nothing changed
    actions: tuple[Action, ...] = ()
    changed: bool = False
    note: str | None = None  # why an event was ignored, for the log
    # The event cannot be explained by this state yet but may be later: apply it again after a
    # delay instead of dropping it (see _Step.stage_result).
    retry_later: bool = False

    @property
    def requests(self) -> list[StageRequest]:
        return [a.request for a in self.actions if isinstance(a, PublishRequest)]

    @property
    def events(self) -> list[JobEvent]:
        return [a.event for a in self.actions if isinstance(a, PublishEvent)]

    @property
    def parts(self) -> list[PutRecordPart]:
        return [a for a in self.actions if isinstance(a, PutRecordPart)]


def decide(
    state: JobState | None,
    event: Trigger,
    graph: Workflow | None,
    now: datetime,
    policy: Policy = Policy(),
    workers: Mapping[str, int] | None = None,
) -> Decision:
    """The next job state and what to publish, given one event (or a Tick).

    `workers`: live replicas per stage, as the adapter last counted them ($SRV discovery); it
    sizes the window of a fan-out node with `max_in_flight` (see _Step._window). None or a
    stage missing from it: the window is `max_in_flight` itself."""
    if isinstance(event, JobSubmitted):
        if state is not None:
            return _ignored(state, "job already submitted")
        return _Step(None, graph, now, policy, workers).submit(event)
    if state is None:
        if isinstance(event, (StageCompleted, StageFailed)) and _token_holds(policy, event):
            # A result for a job whose state this coordinator cannot read. The adapter once
            # published a job's first requests at the same time as it created the state, and
            # another coordinator was handed a result before that write landed (2-3
            # coordinators, a worker that answers in milliseconds: benchmarks/fleet_sim.py saw
            # such a result dropped, and its job wait forever). A submission's requests now go
            # out once its create has landed (service.py `_apply`); this stays as the guard:
            # its token shows a coordinator sent the request, so the adapter re-reads and
            # applies it again shortly (EARLY_REREAD_S) instead of dropping it.
            return Decision(None, (), False, f"early: no state of job {event.job_id!r} yet", retry_later=True)
        return _ignored(None, f"no job {getattr(event, 'job_id', '')!r}: {type(event).__name__} ignored")
    if not isinstance(event, Tick) and event.event_id in state.applied:
        return _ignored(state, "duplicate event, already applied")
    if isinstance(event, Tick):
        if state.status.finished:
            return _ignored(state, "job finished")
        return _Step(state, graph, now, policy, workers).tick()
    if isinstance(event, (StageCompleted, StageFailed)):
        return _Step(state, graph, now, policy, workers).stage_result(event)
    if isinstance(event, JobCancelRequested):
        return _Step(state, graph, now, policy, workers).cancel(event)
    if isinstance(event, JobRetryRequested):
        return _Step(state, graph, now, policy, workers).retry(event)
    return _ignored(state, f"{type(event).__name__} is not for the coordinator")


def _token_holds(policy: Policy, event: StageCompleted | StageFailed) -> bool:
    """Whether a result carries the token of its request (always, without a result secret)."""
    return policy.result_secret is None or hmac.compare_digest(
        event.token or "", result_token(policy.result_secret, event.job_id, event.node, event.attempt))


def result_token(secret: bytes, job_id: str, node: str, attempt: int) -> str:
    """The token of one attempt's request: HMAC-SHA256 of its key under the coordinator's secret.
    Derived, not stored: job state (which workers may read) never holds it, any coordinator with
    the secret can check it, and `decide` stays pure."""
    return hmac.new(secret, request_key(job_id, node, attempt).encode(), hashlib.sha256).hexdigest()[:32]


def give_up(state: JobState | None, job_id: str, event_id: str, reason: str, now: datetime) -> Decision:
    """The adapter could not apply event `event_id` however often it tried: fail the job, so
    its clients stop waiting. `JobFailed` has the id `<job>.failed.internal.<event_id>`; the
    job's open attempts become `cancelled` (a retry reruns them) and the event counts as
    applied. Without a state (a `submitted` that never applied) only the event is returned;
    a finished job is left alone.
    """
    failed = JobFailed(
        event_id=f"{job_id}.failed.internal.{event_id}", job_id=job_id, time=now, reason=one_line(reason)
    )
    if state is None:
        return Decision(None, (PublishEvent(failed),), True)
    if state.status.finished:
        return _ignored(state, f"job already {state.status.value}")
    step = _Step(state, None, now, Policy())
    step._stop_open_nodes()
    step._mark_applied(event_id)
    step.state.status = JobStatus.failed
    step.state.error = failed.reason
    step.state.failure_class = "internal"
    step._emit(failed)
    return step._decision()


def _working_copy(state: JobState) -> JobState:
    """A copy of `state` that a decision may change without touching `state`.

    Only what a decision changes in place is copied: the state's own containers and each node
    (a shallow copy: a decision assigns a node's dicts, it never edits them). A deep copy was the
    largest cost of decide(): 64 ms of a 2-hour film's (240 chunk nodes, 176 KB of JSON) 102 ms per
    event, measured on the 2-core machine; this one is about 1 ms. The purity properties
    (tests/unit/coordinator/test_coordinator_properties.py) check that the input is left as it was.
    """
    return state.model_copy(update={
        "nodes": {node_id: node.model_copy() for node_id, node in state.nodes.items()},
        "outputs": dict(state.outputs),
        "failed_branches": dict(state.failed_branches),
        "applied": list(state.applied),
        "outbox": list(state.outbox),
    })


def _ignored(state: JobState | None, note: str) -> Decision:
    return Decision(state, (), False, note)


class _Step:
    """One decision in progress: works on a copy of the state, collects actions."""

    def __init__(self, state: JobState | None, graph: Workflow | None, now: datetime, policy: Policy,
                 workers: Mapping[str, int] | None = None):
        self.workers = workers or {}
        self.original = state
        self.state = _working_copy(state) if state is not None else None
        self.graph = graph
        self.now = now
        self.policy = policy
        self.actions: list[Action] = []
        self._plan: JobPlan | None = None

    # ------------------------------------------------------------ entry points

    def submit(self, event: JobSubmitted) -> Decision:
        spec = event.spec
        self.state = JobState(spec=spec, created_at=self.now, updated_at=self.now)
        self._mark_applied(event.event_id)
        if self.graph is None:
            return self._fail_job(f"unknown workflow {spec.workflow!r}: no config/workflows/{spec.workflow}.yaml",
                                  failure="input")
        plan = self.plan
        for planned in plan.nodes.values():
            self.state.nodes[planned.id] = _new_node(planned)
        if plan.errors:
            return self._fail_job(one_line("; ".join(plan.errors)), failure="input")
        self.state.status = JobStatus.running
        self._emit(JobStarted(
            event_id=f"{spec.job_id}.started", job_id=spec.job_id, time=self.now,
            workflow=spec.workflow, nodes=[n.id for n in plan.active()],
        ))
        return self._advance()

    def stage_result(self, event: StageCompleted | StageFailed) -> Decision:
        state = self.state
        if state.status.finished:
            return _ignored(self.original, f"job {state.status.value}; late {event.kind} ignored")
        node = state.nodes.get(event.node)
        if node is None:
            if self._unlisted_item(event.node) and _token_holds(self.policy, event):
                # A fan-out item (asr-3) requested by a decision whose write has not landed yet:
                # the item nodes join the state with that write. Another coordinator handed its
                # result meanwhile dropped it, and the job waited for the node's deadline
                # (benchmarks/fleet_sim.py, 3 coordinators, a node killed: 2 films of 60).
                return Decision(self.original, (), False, f"early: {event.node} is not in the state yet",
                                retry_later=True)
            return _ignored(self.original, f"no node {event.node!r} in this job")
        if not _token_holds(self.policy, event):
            return _ignored(self.original, f"refused {event.kind} for {event.node} attempt {event.attempt}: "
                                           "its token is not the request's (not from a worker handed it)")
        if node.status == NodeStatus.waiting and event.attempt == node.attempt + 1:
            # A result for the next attempt of a node this state has not requested: the adapter
            # publishes requests at the same time as it writes the state that decides them, so a
            # coordinator that died after the publish and before the write landed left a request
            # out whose triggering event comes back later. Dropping the result
            # would strand the job (the re-sent request dedups on its Nats-Msg-Id); keep it.
            return Decision(self.original, (), False, f"early: {event.node} not requested yet", retry_later=True)
        if node.status != NodeStatus.requested or node.attempt != event.attempt:
            return _ignored(
                self.original,
                f"stale: {event.node} is {node.status.value} at attempt {node.attempt}, "
                f"event is for attempt {event.attempt}",
            )
        self._mark_applied(event.event_id)
        node.worker = dict(event.worker)
        if isinstance(event, StageCompleted):
            node.status = NodeStatus.completed
            node.outputs = dict(event.outputs)
            node.metrics = dict(event.metrics)
            node.items = dict(event.items)
            node.speaker_turns, node.speaker_turns_key = None, None
            if event.speaker_turns is not None:
                # ~42 KB at its cap: a part of its own, which the coordinator never reads back
                # (only readers that show it do), not inside the node's part.
                self._put_part(turns := event.speaker_turns.model_dump_json().encode())
                node.speaker_turns_key = subjects.job_part_key(state.job_id, subjects.part_name(turns))
            self._plan = None  # a list it produced may add nodes (for_each: node.output)
            node.finished_at = self.now
            node.progress = 1.0
            node.deadline_at = None
            # The node is done changing (nothing edits a completed node but a retry, which makes
            # a new attempt and a new part): written once, named in the record from now on.
            node.part = self._put_part(node.stored())
            return self._advance()
        return self._attempt_failed(event.node, one_line(event.reason), event.retryable,
                                    failure_class(event.error_type, event.reason))

    def _unlisted_item(self, node_id: str) -> bool:
        """Whether `node_id` names an item (`asr-3`) of a fan-out over a list whose items this
        state has not listed yet (its stand-in node, the plain name, is still there)."""
        name, _, index = node_id.rpartition("-")
        spec = self.graph.nodes.get(name) if self.graph is not None else None
        return index.isdigit() and spec is not None and spec.item_source() is not None and name in self.state.nodes

    def tick(self) -> Decision:
        for node_id, node in list(self.state.nodes.items()):
            if self.state.status.finished:
                break
            if node.status == NodeStatus.requested and node.deadline_at and self.now >= node.deadline_at:
                seconds = (node.deadline_at - node.requested_at).total_seconds() if node.requested_at else 0
                self._attempt_failed(
                    node_id,
                    f"stage {node.stage} gave no result within {seconds:g} s (attempt {node.attempt})",
                    retryable=True, failure="timeout",
                )
            elif node.status == NodeStatus.retry_wait and node.next_attempt_at and self.now >= node.next_attempt_at:
                self._request(node_id)
        if self.state.status.finished:
            return self._decision()
        return self._advance()

    def cancel(self, event: JobCancelRequested) -> Decision:
        if self.state.status.finished:
            return _ignored(self.original, f"job already {self.state.status.value}")
        self._mark_applied(event.event_id)
        self._stop_open_nodes()
        self.state.status = JobStatus.cancelled
        self.state.error = "cancelled on request"
        self._emit(JobCancelled(
            event_id=f"{self.state.job_id}.cancelled.{event.event_id}",
            job_id=self.state.job_id, time=self.now,
        ))
        return self._decision()

    def retry(self, event: JobRetryRequested) -> Decision:
        state = self.state
        if state.status not in (JobStatus.failed, JobStatus.cancelled):
            return _ignored(self.original, f"job is {state.status.value}; only failed or cancelled jobs retry")
        if self.graph is None:
            return _ignored(self.original, f"unknown workflow {state.spec.workflow!r}; cannot retry")
        self._mark_applied(event.event_id)
        for planned in self.plan.nodes.values():  # the graph may have gained nodes since
            state.nodes.setdefault(planned.id, _new_node(planned))
        if self.plan.errors:
            return _ignored(self.original, one_line("; ".join(self.plan.errors)))
        for node in state.nodes.values():
            if node.status in (NodeStatus.failed, NodeStatus.cancelled, NodeStatus.abandoned):
                node.status = NodeStatus.waiting
                node.retry_base = node.attempt  # a fresh automatic-retry budget
                node.deadline_at = node.next_attempt_at = node.finished_at = None
                node.error = node.failure_class = None
        state.status = JobStatus.running
        state.error = state.failure_class = None
        state.outputs = {}
        state.failed_branches = {}
        self._emit(JobStarted(
            event_id=f"{state.job_id}.restarted.{event.event_id}", job_id=state.job_id, time=self.now,
            workflow=state.spec.workflow, nodes=[n.id for n in self.plan.active()],
        ))
        return self._advance()

    # ------------------------------------------------------------ the work

    @property
    def plan(self) -> JobPlan:
        if self._plan is None:
            self._plan = self.graph.plan(self.state.spec, _item_counts(self.state))
        return self._plan

    def _sync_item_nodes(self) -> None:
        """Nodes that fan out over a list join the state once its count is known; their stand-in
        (the plain name, still waiting) leaves it. A waiting node whose `when_items` turned out
        not to hold for the count is skipped."""
        nodes = self.state.nodes
        plan = self.plan
        for planned in plan.nodes.values():
            if planned.id not in nodes and planned.item is not None:
                nodes[planned.id] = _new_node(planned)
            elif planned.id in nodes and not planned.active and nodes[planned.id].status == NodeStatus.waiting:
                nodes[planned.id].status = NodeStatus.skipped
        for node_id in list(nodes):
            spec_node = self.graph.nodes.get(node_id)
            if (node_id not in plan.nodes and spec_node is not None and spec_node.item_source() is not None
                    and nodes[node_id].status == NodeStatus.waiting):
                del nodes[node_id]

    def _window(self, planned: PlannedNode) -> int | None:
        """How many of one job's items of this node may be requested at once: the live workers
        of its stage (each has one to work on, none waits in the queue in front of another
        job's request), at least 1 (requests wait for a worker to start), at most the
        workflow's `max_in_flight`. Unknown worker count: `max_in_flight`."""
        ceiling = planned.max_in_flight
        if ceiling is None or planned.stage not in self.workers:
            return ceiling
        return max(1, min(ceiling, int(self.workers[planned.stage])))

    def _window_full(self, planned: PlannedNode, open_items: Counter[str]) -> bool:
        """Fairness: at most `_window` of one node's items requested at once, so one film's
        chunks queue behind each other, not in front of every other job's requests.
        `open_items`: node name -> its items requested or waiting to retry (_open_items)."""
        window = self._window(planned) if planned.item is not None else None
        if window is None:
            return False
        return open_items[planned.name] >= window

    def _open_items(self) -> Counter[str]:
        """Items requested or waiting to retry, per fan-out node name. Counted once per
        _advance (it was counted again for every waiting item: a 240-chunk film spent 80 ms of
        each event there, measured)."""
        nodes = self.state.nodes
        return Counter(
            p.name for p in self.plan.nodes.values()
            if p.item is not None and p.id in nodes
            and nodes[p.id].status in (NodeStatus.requested, NodeStatus.retry_wait)
        )

    def _advance(self) -> Decision:
        """Request every node whose dependencies are done; finish the job when all are."""
        if self.graph is None:
            return self._fail_job(f"unknown workflow {self.state.spec.workflow!r}", failure="input")
        self._sync_item_nodes()
        nodes = self.state.nodes
        open_items = self._open_items()
        for planned in self.plan.nodes.values():
            if self.state.status.finished:
                return self._decision()
            node = nodes.get(planned.id)
            if node is None or node.status != NodeStatus.waiting or planned.pending_items:
                continue
            if self._window_full(planned, open_items):
                continue
            if all(self._settled(d) for d in planned.depends_on if d in nodes):
                self._request(planned.id)
                if planned.item is not None and nodes[planned.id].status == NodeStatus.requested:
                    open_items[planned.name] += 1
        if self.state.status.finished:
            return self._decision()
        if all(self._settled(p.id) for p in self.plan.active() if p.id in nodes):
            self._complete_job()
        return self._decision()

    def _branch_of(self, node_id: str) -> str | None:
        planned = self.plan.nodes.get(node_id)
        return next(iter(planned.branch.values()), None) if planned is not None else None

    def _settled(self, node_id: str) -> bool:
        """Done as far as the rest of the job is concerned: completed, or part of a failed branch
        (whose artifacts the nodes that collect every branch then go without)."""
        node = self.state.nodes[node_id]
        if node.status == NodeStatus.completed:
            return True
        return self._branch_of(node_id) in self.state.failed_branches

    def _request(self, node_id: str) -> None:
        planned = self.plan.nodes[node_id]
        node = self.state.nodes[node_id]
        try:
            inputs = {name: self._artifact(src, node_id) for name, src in planned.inputs.items()
                      if not self._absent_optional(planned, name, src)}
            input_lists = {
                name: [self._artifact(src, node_id) for src in sources if not self._lost_branch(src)]
                for name, sources in planned.input_lists.items()
            }
        except _MissingArtifact as missing:
            node.status = NodeStatus.failed
            node.error = str(missing)
            self._fail_node(node_id, str(missing))
            return
        deadline_s = planned.deadline_s or self.policy.stage_deadline_s
        node.attempt += 1
        node.status = NodeStatus.requested
        node.requested_at = self.now
        node.deadline_at = self.now + timedelta(seconds=deadline_s)
        node.next_attempt_at = None
        node.finished_at = None
        node.progress = 0.0
        request = StageRequest(
            job_id=self.state.job_id, stage=planned.stage, node=node_id, attempt=node.attempt,
            inputs=inputs, input_lists=input_lists, params=dict(planned.params), deadline_s=deadline_s,
            token=(result_token(self.policy.result_secret, self.state.job_id, node_id, node.attempt)
                   if self.policy.result_secret is not None else None),
        )
        self.actions.append(PublishRequest(request))
        self._emit(StageRequested(
            event_id=f"{request.key}.requested", job_id=request.job_id, time=self.now,
            stage=request.stage, node=node_id, attempt=request.attempt,
        ))

    def _lost_branch(self, source: Source) -> bool:
        """A source from a failed branch, even one of its nodes that completed: a join gets a
        branch whole or not at all (no translation whose subtitles failed, or the reverse)."""
        return source.node_id is not None and self._branch_of(source.node_id) in self.state.failed_branches

    def _absent_optional(self, planned: PlannedNode, name: str, source: Source) -> bool:
        """An input its stage declares optional (StageSpec.optional_inputs) whose node completed
        without that output: the request goes without it, as when its node does not run. A chunk
        worker of before a clip's language moved into its asr request writes `language` only with
        -s; asr and transcript_join take none as "not known" (deploy/README.md, upgrading)."""
        if source.node_id is None or source.output in self.state.nodes[source.node_id].outputs:
            return False
        spec = STAGES.get(planned.stage)
        return spec is not None and name in spec.optional_inputs

    def _artifact(self, source: Source, needed_by: str) -> ArtifactRef:
        if source.node_id is None:
            return self.state.spec.input
        produced = self.state.nodes[source.node_id].outputs
        if source.output not in produced:
            raise _MissingArtifact(
                f"{source.node_id} finished without its {source.output!r} output, which {needed_by} needs"
                f" (it produced: {', '.join(produced) or 'nothing'})"
            )
        return produced[source.output]

    def _attempt_failed(self, node_id: str, reason: str, retryable: bool, failure: str = "internal") -> Decision:
        node = self.state.nodes[node_id]
        node.failure_class = failure
        planned = self.plan.nodes.get(node_id) if self.graph is not None else None
        max_attempts = (planned.max_attempts if planned else None) or self.policy.retry.max_attempts
        used = node.attempt - node.retry_base
        node.error = reason
        node.deadline_at = None
        if retryable and used < max_attempts:
            node.status = NodeStatus.retry_wait
            node.next_attempt_at = self.now + timedelta(seconds=self.policy.retry.delay(used))
            return self._decision()
        node.status = NodeStatus.failed
        node.finished_at = self.now
        where = node_id
        if planned is not None and planned.item is not None:
            source = self.graph.nodes[planned.name].for_each
            where = f"{node_id}: item {planned.item} of {source}"
        if retryable:
            reason = f"stage {node.stage} ({where}) failed {used} times; last error: {reason}"
        else:
            reason = f"stage {node.stage} ({where}) failed: {reason}"
        return self._fail_node(node_id, one_line(reason))

    def _fail_node(self, node_id: str, reason: str) -> Decision:
        """A failed node of a fan-out branch fails that branch only; any other fails the job."""
        branch = self._branch_of(node_id) if self.graph is not None else None
        if branch is None:
            return self._fail_job(reason, node_id)
        return self._fail_branch(branch, node_id, reason)

    def _fail_branch(self, branch: str, node_id: str, reason: str) -> Decision:
        """The other nodes of the branch are abandoned (their inputs will never come), the job
        says which branch failed and why, and goes on with the rest. When every branch of the job
        has failed, the job still finishes what does not need them (`subtitle`: the source
        language's SRT/VTT, and a mux with the tracks that exist) and completes with
        `failed_branches`; it fails only when every output it has needs a branch. Issue 18: `run
        -w subtitle -s en -t fr` without NLLB weights made the English subtitles, then failed
        "every branch failed (fr: ...)" and wrote nothing."""
        state = self.state
        state.failed_branches[branch] = reason
        for other_id in self.plan.nodes:
            other = state.nodes.get(other_id)
            if other_id == node_id or other is None or self._branch_of(other_id) != branch:
                continue
            if other.status in (NodeStatus.waiting, NodeStatus.requested, NodeStatus.retry_wait):
                other.status = NodeStatus.abandoned
                other.deadline_at = other.next_attempt_at = None
                other.error = f"branch {branch} failed at {node_id}"
        attempt = state.nodes[node_id].attempt
        self._emit(BranchFailed(
            event_id=f"{state.job_id}.branch_failed.{node_id}.{attempt}", job_id=state.job_id, time=self.now,
            branch=branch, node=node_id, reason=reason,
        ))
        branches = {b for p in self.plan.active() if (b := self._branch_of(p.id)) is not None}
        if branches <= set(state.failed_branches) and not self._delivers_without_branches():
            summary = "; ".join(f"{b}: {r}" for b, r in sorted(state.failed_branches.items()))
            return self._fail_job(one_line(f"every branch failed ({summary})"), node_id)
        return self._advance()

    def _delivers_without_branches(self) -> bool:
        """Whether some job output comes from a node that needs no fan-out branch, directly or
        through its inputs (a join of the branches, such as fanout.yaml's mux, needs them):
        something worth delivering when every branch has failed."""
        needs_branch: dict[str, bool] = {}
        for planned in self.plan.nodes.values():  # dependencies first
            needs_branch[planned.id] = planned.active and (
                bool(planned.branch) or any(needs_branch.get(d, False) for d in planned.depends_on))
        return any(src.node_id is not None and src.node_id in needs_branch and not needs_branch[src.node_id]
                   for src in self.plan.outputs.values())

    def _fail_job(self, reason: str, node_id: str | None = None, failure: str | None = None) -> Decision:
        """Any failed node outside a fan-out branch fails the job, and the reason names it; the
        job's failure class is the failed node's (captionbus.contracts.failures), else `failure`."""
        state = self.state
        node = state.nodes.get(node_id) if node_id else None
        state.failure_class = failure or (node.failure_class if node is not None else None) or "internal"
        self._stop_open_nodes()
        state.status = JobStatus.failed
        state.error = reason
        attempt = state.nodes[node_id].attempt if node_id in state.nodes else 0
        trigger = f"{node_id}.{attempt}" if node_id else "plan"
        self._emit(JobFailed(
            event_id=f"{state.job_id}.failed.{trigger}", job_id=state.job_id, time=self.now,
            reason=reason, node=node_id,
        ))
        return self._decision()

    def _complete_job(self) -> None:
        state = self.state
        outputs = {}
        for name, source in self.plan.outputs.items():
            if source.node_id is None:
                outputs[name] = state.spec.input
            elif source.output in state.nodes[source.node_id].outputs:
                outputs[name] = state.nodes[source.node_id].outputs[source.output]
        state.status = JobStatus.completed
        state.outputs = outputs
        self._emit(JobCompleted(
            event_id=f"{state.job_id}.completed", job_id=state.job_id, time=self.now, outputs=outputs,
            failed_branches=dict(state.failed_branches),
        ))

    def _stop_open_nodes(self) -> None:
        # In-flight attempts become cancelled: their late results are ignored, a retry reruns them.
        for node in self.state.nodes.values():
            if node.status in (NodeStatus.requested, NodeStatus.retry_wait):
                node.status = NodeStatus.cancelled
                node.deadline_at = node.next_attempt_at = None

    def _put_part(self, value: bytes) -> str:
        """Write `value` as a part of the job's record (PutRecordPart, before the state); its name."""
        name = subjects.part_name(value)
        self.actions.append(PutRecordPart(subjects.job_part_key(self.state.job_id, name), value))
        return name

    def _mark_applied(self, event_id: str) -> None:
        applied = self.state.applied
        applied.append(event_id)
        del applied[:-APPLIED_KEPT]

    def _emit(self, event) -> None:
        self.actions.append(PublishEvent(event))

    def _decision(self) -> Decision:
        if not self.actions and self.state == self.original:
            return _ignored(self.original, "nothing due")
        self.state.updated_at = self.now
        return Decision(self.state, tuple(self.actions), True)


class _MissingArtifact(Exception):
    pass


def _new_node(planned: PlannedNode) -> NodeState:
    return NodeState(
        stage=planned.stage,
        status=NodeStatus.waiting if planned.active else NodeStatus.skipped,
        params=dict(planned.branch) | ({"item": planned.item} if planned.item is not None else {}),
    )


def _item_counts(state: JobState) -> dict[str, int]:
    """`node.output` -> items it listed, for every completed node that listed any."""
    return {f"{node_id}.{output}": count for node_id, node in state.nodes.items()
            if node.status == NodeStatus.completed for output, count in node.items.items()}
