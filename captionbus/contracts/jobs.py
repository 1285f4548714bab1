from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

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


class JobState(BaseModel):
    """The coordinator's record of one job: the value of its KV key.

    Each worker's summary is stored once (`workers`, keyed w0, w1, ... in order of first use),
    and `worker_refs` says which is each node's: the record is rewritten whole at every event, and
    a 2-hour film's 240 chunk nodes repeating their worker's summary (~430 bytes: id, env,
    interpreter, package versions) were 96 KB of its 285 KB, written again with each of its 250
    writes (benchmarks/job_state.py). Null fields are left out of it too. In memory, nodes hold
    their `worker` as before: `stored()` builds the table for the KV write and a load reads it
    back into the nodes, so deciders and readers see one shape. Other dumps (`status --json`,
    `run`'s job.json) keep each node's `worker` inline, as before the table; both forms load, and
    so do records written before it.
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

    workers: dict[str, dict[str, str]] = Field(default_factory=dict, description=(
        "stored records: each worker summary of the nodes once (w0, w1, ...); empty in a loaded state "
        "(its nodes hold their `worker`)"))
    worker_refs: dict[str, str] = Field(default_factory=dict, description=(
        "stored records: node id -> the key of its `worker` in `workers`; empty in a loaded state"))

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

    def stored(self) -> bytes:
        """The record as the coordinator writes it to the job's KV key: JSON, each worker once
        (`workers`, `worker_refs`) and null fields left out (their defaults when read). No
        per-node copies, no custom serializer: either cost every write of a 2-hour film's state
        more than the bytes saved (a wrap serializer, a second pass through Python, and a copy
        of each node, 2.0 ms min / 8.1 ms median per write against 1.1 / 1.8 ms for the whole
        dump; this, 1.2 / 2.0 ms)."""
        table: dict[str, dict[str, str]] = {}
        seen: dict[str, list[tuple[dict[str, str], str]]] = {}  # worker_id -> (summary, ref)
        refs = {}
        for node_id, node in self.nodes.items():
            if not node.worker:
                continue
            same = seen.setdefault(node.worker.get("worker_id", ""), [])
            ref = next((r for summary, r in same if summary == node.worker), None)
            if ref is None:
                ref = f"w{len(table)}"
                table[ref] = node.worker
                same.append((node.worker, ref))
            refs[node_id] = ref
        lean = self.model_copy(update={"workers": table, "worker_refs": refs})
        return lean.model_dump_json(exclude_none=True, exclude={"nodes": {"__all__": {"worker"}}}).encode()
