"""The only language captionbus processes share.

Depends on pydantic alone so that every stage environment can install it.
"""
from captionbus.contracts import subjects
from captionbus.contracts.artifacts import ArtifactRef
from captionbus.contracts.events import (
    BranchFailed,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobRetryRequested,
    JobStarted,
    JobSubmitted,
    StageCompleted,
    StageFailed,
    StageProgress,
    StageRequested,
    StageWarning,
    parse_event,
)
from captionbus.contracts.ids import JOB_ID_PATTERN, NO_TENANT, TOKEN_PATTERN, new_job_id, tenant_of, validate_token
from captionbus.contracts.jobs import JobSpec, JobState, JobStatus, NodeState, NodeStatus
from captionbus.contracts.stages import StageRequest, request_key
from captionbus.contracts.version import SCHEMA_VERSION
from captionbus.contracts.failures import FAILURE_CLASSES, classify as failure_class
from captionbus.contracts.workers import CurrentRequest, WorkerInfo, WorkerState, worker_identity

__all__ = [
    "ArtifactRef",
    "JOB_ID_PATTERN",
    "TOKEN_PATTERN",
    "new_job_id",
    "NO_TENANT",
    "tenant_of",
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
    "request_key",
    "WorkerInfo",
    "WorkerState",
    "worker_identity",
    "CurrentRequest",
    "FAILURE_CLASSES",
    "failure_class",
    "SCHEMA_VERSION",
    "subjects",
]
