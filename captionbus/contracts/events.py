"""Job events: everything that happens to a job, on `captionbus.job.<job_id>.<kind>`.

The events stream keeps them (limits retention), so integrations and dashboards can replay.
"""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter

from captionbus.contracts.artifacts import ArtifactRef
from captionbus.contracts.ids import JobId, NodeId, StageName
from captionbus.contracts.jobs import JobSpec, utcnow
from captionbus.contracts.speech import TurnSummary
from captionbus.contracts.version import SCHEMA_VERSION


class _Event(BaseModel):
    schema_version: str = SCHEMA_VERSION
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    job_id: JobId
    time: datetime = Field(default_factory=utcnow)


class _StageEvent(_Event):
    stage: StageName
    node: NodeId
    attempt: int = Field(ge=1)


class JobSubmitted(_Event):
    kind: Literal["submitted"] = "submitted"
    spec: JobSpec


class JobStarted(_Event):
    kind: Literal["started"] = "started"
    workflow: str
    nodes: list[str]


class StageRequested(_StageEvent):
    kind: Literal["stage_requested"] = "stage_requested"


# StageProgress.message of a request a worker has taken while its model still loads (setup()).
LOADING_MODEL = "loading model"


class StageProgress(_StageEvent):
    kind: Literal["stage_progress"] = "stage_progress"
    fraction: float = Field(ge=0.0, le=1.0)
    message: str = Field("", description=f"what the stage is doing; {LOADING_MODEL!r} while its model loads")


class StageCompleted(_StageEvent):
    kind: Literal["stage_completed"] = "stage_completed"
    token: str | None = Field(default=None, description="the request's token (StageRequest.token), echoed")
    outputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    worker: dict[str, str] = Field(default_factory=dict)
    items: dict[str, Annotated[int, Field(ge=0, le=100_000)]] = Field(
        default_factory=dict,
        description="output -> how many items it lists (a workflow may fan out over them: for_each: node.output)")
    speaker_turns: TurnSummary | None = Field(
        None, description="the diarization stage's turns, bounded (TurnSummary): kept on the node's record in "
                          "the job state, where every role that reads jobs sees them without the artifact")


class StageFailed(_StageEvent):
    kind: Literal["stage_failed"] = "stage_failed"
    token: str | None = Field(default=None, description="the request's token (StageRequest.token), echoed")
    reason: str = Field(description="one line a person can act on")
    error_type: str = "error"
    retryable: bool = False
    worker: dict[str, str] = Field(default_factory=dict)


class StageWarning(_StageEvent):
    kind: Literal["stage_warning"] = "stage_warning"
    message: str


class BranchFailed(_Event):
    """One fan-out branch (a target language) failed; the rest of the job goes on."""

    kind: Literal["branch_failed"] = "branch_failed"
    branch: str = Field(description="the branch item, e.g. the target language 'ta'")
    node: NodeId
    reason: str


class JobCompleted(_Event):
    kind: Literal["completed"] = "completed"
    outputs: dict[str, ArtifactRef]
    failed_branches: dict[str, str] = Field(
        default_factory=dict, description="branch (target language) -> why it failed; its outputs are missing"
    )


class JobFailed(_Event):
    kind: Literal["failed"] = "failed"
    reason: str
    node: NodeId | None = None


class JobCancelRequested(_Event):
    kind: Literal["cancel_requested"] = "cancel_requested"


class JobCancelled(_Event):
    kind: Literal["cancelled"] = "cancelled"


class JobRetryRequested(_Event):
    kind: Literal["retry_requested"] = "retry_requested"


JobEvent = Annotated[
    Union[
        JobSubmitted,
        JobStarted,
        StageRequested,
        StageProgress,
        StageCompleted,
        StageFailed,
        StageWarning,
        BranchFailed,
        JobCompleted,
        JobFailed,
        JobCancelRequested,
        JobCancelled,
        JobRetryRequested,
    ],
    Field(discriminator="kind"),
]

_event_adapter: TypeAdapter[Any] = TypeAdapter(JobEvent)


def parse_event(data: bytes | str | dict) -> Any:
    if isinstance(data, dict):
        return _event_adapter.validate_python(data)
    return _event_adapter.validate_json(data)


# Kinds a finished job will never emit again; followers can stop here.
TERMINAL_KINDS = frozenset({"completed", "failed", "cancelled"})
# Kinds that report on one node's attempt (_StageEvent): a worker's or the coordinator's.
STAGE_KINDS = frozenset(cls.model_fields["kind"].default for cls in _StageEvent.__subclasses__())
# The kind after which an ended job runs again: the coordinator's `started`, which it emits
# only when it accepts a retry (decide: `_Step.retry`), not the `retry_requested` asking for one.
# A tenant may publish `retry_requested` for its own job (the gateway's 409 is not on that path);
# the coordinator ignores it on a completed job ("only failed or cancelled jobs retry"), so
# reopening there showed every late stage event after it, and the old attempt's events stored
# between the request and the restart.
REOPENING_KIND = "started"
# The kinds that decide whether a job is ended at a point of its history (History.shown): a
# reader resumed mid-history reads only these before it (captionbus.client._history_before).
HISTORY_KINDS = TERMINAL_KINDS | {REOPENING_KIND}


class History:
    """Which recorded events belong to a job's history, read in stream order: a job's terminal
    event (completed, failed, cancelled) is the last of its history until the coordinator's
    `started` of an accepted retry reopens it, so a stage event stored while the job is ended is
    late and no reader shows it (`retry_requested` only asks: the coordinator may refuse it).

    Why: a worker that has not yet seen a `cancelled` (its JobEndWatch subscription is a few ms
    behind under load, or its progress report was already on the wire) publishes a
    `stage_progress` that the events stream stores after the `cancelled`. The coordinator never
    applies it (decide: "job finished"), so the job's record stays cancelled; but the webhook
    receiver of a media asset manager, reading in order, saw the cancelled job report progress
    again (tests/integration/test_surfaces.py, once in a full-suite run). Each reader of events
    (`captionbus events`, `events --follow`, the gateway's SSE and webhooks, the dashboard's job
    page and its live feed) keeps one History and drops what `shown` refuses: they agree with
    each other and with the record, and the stream keeps what was stored (nothing rewritten).
    Job-level events (cancel_requested, retry_requested, ...) are always shown.

    A reader that starts in the middle of a job's events (SSE's Last-Event-ID, a webhook
    record's cursor, `--since`) must first learn whether the job was ended there
    (`ended.add(job_id)`): captionbus.client reads the job's earlier HISTORY_KINDS for it; the
    dashboard's live feed, which starts with new events, marks the jobs whose record is finished.
    Not covered: a late event of an old attempt stored after the restart's `started` (the job
    runs again then, and the job page closes that attempt at the next `stage_requested` of its
    node)."""

    def __init__(self) -> None:
        self.ended: set[str] = set()  # job ids whose last terminal event has no retry after it

    def shown(self, job_id: str, kind: str) -> bool:
        """Whether the event of `kind`, the next one of job `job_id` in stream order, is shown."""
        if kind in TERMINAL_KINDS:
            self.ended.add(job_id)
        elif kind == REOPENING_KIND:
            self.ended.discard(job_id)
        elif kind in STAGE_KINDS:
            return job_id not in self.ended
        return True
