"""The only language captionbus processes share.

Depends on pydantic alone so that every stage environment can install it.
"""
from contracts.artifacts import ArtifactRef
from contracts.ids import JOB_ID_PATTERN, TOKEN_PATTERN, new_job_id, validate_token
from contracts.jobs import JobSpec, JobState, JobStatus, NodeState, NodeStatus
from contracts.events import (
    JobEvent,
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
    parse_event,
)
from contracts.stages import StageRequest
from contracts.workers import WorkerInfo
from contracts.version import SCHEMA_VERSION
from contracts import subjects

__all__ = [
    "ArtifactRef",
    "JOB_ID_PATTERN",
    "TOKEN_PATTERN",
    "new_job_id",
    "validate_token",
    "JobSpec",
    "JobState",
    "JobStatus",
    "NodeState",
    "NodeStatus",
    "JobEvent",
    "JobSubmitted",
    "JobStarted",
    "StageRequested",
    "StageProgress",
    "StageCompleted",
    "StageFailed",
    "StageWarning",
    "BranchFailed",
    "JobCompleted",
    "JobFailed",
    "JobCancelRequested",
    "JobCancelled",
    "JobRetryRequested",
    "parse_event",
    "StageRequest",
    "WorkerInfo",
    "SCHEMA_VERSION",
    "subjects",
]
