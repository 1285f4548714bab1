from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr, TypeAdapter, field_serializer, field_validator, model_validator

from captionbus.contracts import subjects
from captionbus.contracts.artifacts import ArtifactRef
from captionbus.contracts.ids import JobId, Token
from captionbus.contracts.speech import TurnSummary
from captionbus.contracts.version import SCHEMA_VERSION


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobSpec(BaseModel):
    """What a user asks for. Published inside JobSubmitted; kept in JobState."""

    schema_version: str = SCHEMA_VERSION
    job_id: JobId
    workflow: Token = "transcribe"
    input: ArtifactRef
    source_language: str | None = Field(default=None, description="ISO 639-1; None = detect")
    target_languages: list[str] = Field(default_factory=list)
    # Switches for optional stages and stage parameters, e.g. {"asr": {"model": "base"}}.
    options: dict[str, Any] = Field(default_factory=dict)
    submitted_at: datetime = Field(default_factory=utcnow)
    owner: str | None = Field(default=None, description="the gateway API key (its name) that submitted the job; "
                                                       "None from the CLI. A key sees only its own jobs")
    owner_proof: str | None = Field(default=None, max_length=64,
                                    description="the gateway's HMAC of the job id under the owner key's stored hash: "
                                                "any bus client may write `owner`, only a gateway holding the keys "
                                                "file can prove it (captionbus.gateway.keys.KeyRing.proof)")

    @field_validator("source_language")
    @classmethod
    def _normal_source(cls, code: str | None) -> str | None:
        # "HI " and "hi" are one language everywhere downstream (routes, file names, track tags).
        return code.strip().lower() or None if isinstance(code, str) else code

    @field_validator("target_languages")
    @classmethod
    def _normal_targets(cls, codes: list[str]) -> list[str]:
        return list(dict.fromkeys(c.strip().lower() for c in codes if c.strip()))


class JobStatus(str, Enum):
    pending = "pending"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


class NodeStatus(str, Enum):
    waiting = "waiting"  # dependencies not done
    requested = "requested"  # request published, no result yet
    retry_wait = "retry_wait"  # failed retryably, will be requested again at next_attempt_at
    completed = "completed"
    failed = "failed"
    skipped = "skipped"  # optional stage switched off
    cancelled = "cancelled"
    abandoned = "abandoned"  # its fan-out branch failed elsewhere; a retry runs it again


class NodeState(BaseModel):
    stage: Token
    status: NodeStatus = NodeStatus.waiting
    attempt: int = 0
    # A manual retry gives a node a fresh automatic-retry budget: attempts counted from here.
    retry_base: int = Field(default=0, ge=0, description="attempts made before the last manual retry")
    requested_at: datetime | None = None
    deadline_at: datetime | None = None
    next_attempt_at: datetime | None = None
    finished_at: datetime | None = None
    outputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    progress: float = 0.0
    error: str | None = None
    failure_class: str | None = Field(default=None, description="class of `error` (captionbus.contracts.failures)")
    worker: dict[str, str] = Field(default_factory=dict, description=(
        "who ran the last attempt (StageCompleted/StageFailed.worker). A stored record keeps it in "
        "JobState.workers, named by JobState.worker_refs; records of coordinators before that, here"))
    metrics: dict[str, float] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict, description="fan-out parameters")
    items: dict[str, int] = Field(default_factory=dict, description="output -> items it lists (StageCompleted.items)")
    speaker_turns: TurnSummary | None = Field(None, description=(
        "who speaks when, bounded (StageCompleted.speaker_turns): on records of coordinators before "
        "`speaker_turns_key`, and filled in from that key by readers that show the node's summary "
        "(captionbus.client.with_record_parts)"))
    speaker_turns_key: str | None = Field(None, max_length=256, description=(
        "the KV cb_jobs key (subjects.job_part_key) of this node's TurnSummary, written once before the "
        "record naming it: ~42 KB that each later rewrite of the record no longer carries"))
    part: str | None = Field(None, exclude=True, description=(
        "a completed node's part name (subjects.part_name of `stored()`): the node is written whole once, "
        "under subjects.job_part_key, when it completes, and the stored record names it there instead of "
        "holding it (JobState.stored). Never dumped: readers see the node as before"))

    def stored(self) -> bytes:
        """The node as its part holds it: JSON, null fields left out, its `worker` inline."""
        return self.model_dump_json(exclude_none=True).encode()


class MissingParts(LookupError):
    """A record names parts (JobState.parts) that were not given: `names` (part names)."""

    def __init__(self, job_id: str, names: list[str]):
        super().__init__(f"job {job_id}'s record names {len(names)} part(s) of its nodes that are not there: "
                         + ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
        self.names = names


class JobState(BaseModel):
    """The coordinator's record of one job: the value of its KV key, and its parts.

    A small head plus each completed node written once (benchmarks/job_state.py, a 2-hour film of
    240 chunks with speakers): the record was rewritten whole at each of the film's 251 events, so
    every completed node's outputs, metrics and worker were written again with each later event,
    21.6 MB per film for a 130.8 KB record, and the KV's history (5 per key) of such records is
    what the nats-server holds. Now a node that completes is written once under a key of its own
    (`NodeState.part`, subjects.job_part_key, named by the SHA-256 of its bytes: decide() returns
    the write, decide.PutRecordPart, and the coordinator puts it before the state naming it), and
    the stored record (`stored()`) holds in its place only that name (`"asr-12": "<20 chars>"`),
    in the node's place among the others, so nodes keep their order. What still changes (the
    waiting, requested and failed nodes, attempts, timings, the outbox, applied ids) stays in
    the head. Figures: README, "A small head plus parts written once" (21.63 -> 4.46 MB written
    for that film). Writing the head is cheaper than the whole dump was, and reading it with the
    parts a coordinator keeps cheaper than parsing the whole (min of 5 x 200 on the loaded 2-core
    machine, that film at its end and half way: stored() 0.3 / 1.1 ms against 7.7 / 1.6 ms for
    the whole dump; head + parts read in 2.9 / 4.7 ms against 20.4 / 15.8 ms for the whole).

    A stored record read alone is a head: its parts' names are in `parts` (node id -> name) and
    its `nodes` lack them; `with_parts` reads them in and gives the whole state, the one every
    reader shows (captionbus.client.job_state reads them from the bus, the dashboard from its
    watch, gc from its listing). Records written before parts (every node inline) are whole
    when read.

    Each worker summary of the nodes in the head is stored once (`workers`, keyed w0, w1, ...)
    and `worker_refs` says which is each node's: 240 chunk nodes repeating their worker's summary
    (~430 bytes) were 96 KB of a 285 KB record before. Null fields are left out too. In memory,
    nodes hold their `worker`: `stored()` builds the table and a load reads it back into the
    nodes, so deciders and readers see one shape. Other dumps (`status --json`, `run`'s
    job.json) keep each node's `worker` inline and every node whole, as before parts; both
    forms load, and so do records written before them.
    """

    schema_version: str = SCHEMA_VERSION
    spec: JobSpec
    status: JobStatus = JobStatus.pending
    nodes: dict[Token, NodeState] = Field(default_factory=dict)
    outputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    error: str | None = None
    failure_class: str | None = Field(default=None, description="class of `error` (captionbus.contracts.failures)")
    # Fan-out branches (target languages) that failed while the rest of the job went on.
    failed_branches: dict[str, str] = Field(default_factory=dict, description="branch -> reason")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    # Event ids already applied: the last line of defence against duplicates.
    applied: list[str] = Field(default_factory=list)
    # Job events and stage requests decided but maybe not yet published: written with the state
    # that decided them (the events published only after that write succeeded, the requests at the
    # same time), then cleared. A coordinator that dies in between leaves them here for the next
    # one (their ids are deterministic: JetStream drops repeats).
    outbox: list[dict[str, Any]] = Field(
        default_factory=list,
        description="job events (JSON) and stage requests ({'stage_request': ...}) decided with this state, "
                    "maybe not yet published",
    )

    written_by: str | None = Field(default=None, description=(
        "the coordinator that wrote this revision (its id: the holder of the job's partition, "
        "captionbus/coordinator/leases.py); None in records of coordinators before job ownership"))
    workers: dict[str, dict[str, str]] = Field(default_factory=dict, description=(
        "stored records: each worker summary of the nodes once (w0, w1, ...); empty in a loaded state "
        "(its nodes hold their `worker`)"))
    worker_refs: dict[str, str] = Field(default_factory=dict, description=(
        "stored records: node id -> the key of its `worker` in `workers`; empty in a loaded state"))
    parts: dict[Token, str] = Field(default_factory=dict, exclude=True, description=(
        "a stored record read alone (a head): node id -> the name of the part holding that node, which "
        "`nodes` lacks until `with_parts` reads it in; empty in a whole state. Never dumped"))
    _order: list[str] | None = PrivateAttr(None)  # a head's node ids in their order, parts' included

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @model_validator(mode="after")
    def _workers_into_nodes(self) -> JobState:
        for node_id, ref in self.worker_refs.items():
            if node_id not in self.nodes or ref not in self.workers:
                raise ValueError(f"worker_refs names {ref!r} for node {node_id}: the record's nodes or workers "
                                 f"({', '.join(self.workers) or 'none'}) lack it")
            self.nodes[node_id].worker = dict(self.workers[ref])
        self.workers, self.worker_refs = {}, {}
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _parts_out_of_nodes(cls, data: Any, handler: Any) -> JobState:
        """A stored record names each completed node's part in the node's place (a string):
        those go to `parts`, in order, and the rest validate as nodes."""
        nodes = data.get("nodes") if isinstance(data, dict) else None
        if not isinstance(nodes, dict) or not any(isinstance(v, str) for v in nodes.values()):
            return handler(data)
        named = {node_id: v for node_id, v in nodes.items() if isinstance(v, str)}
        state = handler({**data, "parts": {**data.get("parts", {}), **named},
                         "nodes": {node_id: v for node_id, v in nodes.items() if not isinstance(v, str)}})
        state._order = list(nodes)
        return state

    @field_serializer("nodes", mode="wrap")
    def _no_head_dumped(self, nodes: dict[str, NodeState], handler: Any) -> Any:
        """A head (parts named, not read in) dumped would lose its completed nodes: `parts` is
        never dumped, so `nodes` would hold the open ones only, and would load back as a whole
        state without them (review of 5ae3b0d: a head's model_dump_json gave `nodes: ['mux']`).
        Refused, as `stored()` refuses a head; dumps that leave `nodes` out are not asked."""
        if self.parts:
            raise ValueError(f"job {self.job_id}: a record read without its parts ({len(self.parts)} completed "
                             "nodes) cannot be dumped; read them in first (JobState.with_parts)")
        return handler(nodes)

    @property
    def whole(self) -> bool:
        """Every node is here (no part is named and not read in)."""
        return not self.parts

    def part_keys(self) -> dict[str, str]:
        """The KV cb_jobs key of each part this head names and lacks: name -> key."""
        return {name: subjects.job_part_key(self.job_id, name) for name in self.parts.values()}

    def with_parts(self, parts: Mapping[str, NodeState | bytes]) -> JobState:
        """The whole state: this head with the nodes it names read in from `parts` (part name ->
        its stored bytes, or the NodeState read from them), in their places. Bytes are checked
        against their name (a part is named by its SHA-256); a name `parts` lacks raises
        MissingParts. A whole state is returned as it is."""
        if not self.parts:
            return self
        missing = [name for name in self.parts.values() if name not in parts]
        if missing:
            raise MissingParts(self.job_id, missing)
        read = {node_id: node_of_part(name, parts[name]) for node_id, name in self.parts.items()}
        order = self._order or [*self.nodes, *read]
        whole = self.model_copy(update={
            "nodes": {node_id: self.nodes[node_id] if node_id in self.nodes else read[node_id] for node_id in order},
            "parts": {}})
        whole._order = None
        return whole

    def stored(self) -> bytes:
        """The record as the coordinator writes it to the job's KV key: JSON, each completed node
        that has its part (`NodeState.part`) as that part's name, the other nodes without their
        defaults (a waiting chunk node is ~45 bytes, not ~150) and each of their workers once
        (`workers`, `worker_refs`), null fields left out (their defaults when read). Two dumps
        in pydantic's serializer, the nodes' through a TypeAdapter of `NodeState | str`, joined:
        a custom serializer (a wrap serializer, a second pass through Python, a copy of each
        node) cost every write of a 2-hour film's record more than the bytes it saved (2.0 ms min
        / 8.1 ms median against 1.1 / 1.8 ms). A head whose parts were not read in cannot be
        stored (it would drop them)."""
        if self.parts:
            raise ValueError(f"job {self.job_id}: a record read without its parts cannot be stored; "
                             "read them in first (JobState.with_parts)")
        table: dict[str, dict[str, str]] = {}
        seen: dict[str, list[tuple[dict[str, str], str]]] = {}  # worker_id -> (summary, ref)
        refs = {}
        for node_id, node in self.nodes.items():
            if not node.worker or node.part:
                continue
            same = seen.setdefault(node.worker.get("worker_id", ""), [])
            ref = next((r for summary, r in same if summary == node.worker), None)
            if ref is None:
                ref = f"w{len(table)}"
                table[ref] = node.worker
                same.append((node.worker, ref))
            refs[node_id] = ref
        lean = self.model_copy(update={"workers": table, "worker_refs": refs})
        head = lean.model_dump_json(exclude_none=True, exclude={"nodes"}).encode()
        nodes = _STORED_NODES.dump_json({node_id: node.part or node for node_id, node in self.nodes.items()},
                                        exclude_defaults=True, exclude={"__all__": {"worker"}})
        return head[:-1] + b',"nodes":' + nodes + b"}"


# The nodes of a stored record: a completed node with its part is that part's name, and the others
# leave out their defaults (a film's 240 chunk nodes wait as {"stage":"asr","params":{"item":12}},
# ~45 bytes, not ~150).
_STORED_NODES: TypeAdapter[dict[str, NodeState | str]] = TypeAdapter(dict[str, NodeState | str])


def node_of_part(name: str, part: NodeState | bytes) -> NodeState:
    """The node a part named `name` holds (NodeState.part set): from its bytes, checked against
    the name, or a copy of the NodeState already read from them."""
    if isinstance(part, NodeState):
        return part.model_copy(update={"part": name})
    if subjects.part_name(part) != name:
        raise ValueError(f"record part {name}: its bytes are not the part of that name (their SHA-256 differs)")
    node = NodeState.model_validate_json(part)
    node.part = name
    return node
