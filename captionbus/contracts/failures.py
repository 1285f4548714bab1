"""Why a stage attempt or a job failed, as one of a few classes an operator can count and act on.

A StageFailed carries `error_type` (set by whoever saw the failure: the stage runtime, the
coordinator); the coordinator turns it into a class and records it on the node and the job
(NodeState.failure_class, JobState.failure_class), so dashboards and metrics need not parse reasons.
`classify(None, reason)` reads a recorded reason for states written before the class existed.
"""
from __future__ import annotations

from typing import Literal

FailureClass = Literal["setup", "input", "timeout", "unserved", "worker_crash", "stage_error", "storage",
                       "cancelled", "internal"]

FAILURE_CLASSES: tuple[str, ...] = ("setup", "input", "timeout", "unserved", "worker_crash", "stage_error",
                                    "storage", "cancelled", "internal")

# What each class means, for help text and the dashboard's legend.
MEANING = {
    "setup": "the stage's model or setup could not load on the worker",
    "input": "the job's input or parameters were refused",
    "timeout": "a stage gave no result before its deadline",
    "unserved": "no worker served the stage",
    "worker_crash": "workers died or vanished on every delivery of a request",
    "stage_error": "the stage raised an error on every attempt",
    "storage": "the artifact store is full (free space with `captionbus gc`)",
    "cancelled": "the job was cancelled",
    "internal": "captionbus itself failed (coordinator, bus, workflow)",
}

_BY_ERROR_TYPE = {
    "setup_failed": "setup",
    "bad_input": "input",
    "bad_request": "input",
    "unserved": "unserved",
    "max_deliveries": "worker_crash",
    "exhausted": "stage_error",
    "store_full": "storage",
    "timeout": "timeout",
    "cancelled": "cancelled",
    "internal": "internal",
}


def classify(error_type: str | None, reason: str = "") -> str:
    """The class of a failure from its error_type, else from its recorded one-line reason."""
    if error_type in _BY_ERROR_TYPE:
        return _BY_ERROR_TYPE[error_type]
    if error_type in FAILURE_CLASSES:
        return error_type
    text = reason.lower()
    if "artifact store full" in text:
        return "storage"
    if "cannot be served on host" in text:
        return "setup"
    if "gave no result within" in text:
        return "timeout"
    if "worker has been running for" in text:
        return "unserved"
    if "crashed or timed out on" in text:
        return "worker_crash"
    if "bad " in text or "invalid" in text or "unknown workflow" in text:
        return "input"
    if "failed on all" in text or " times; last error" in text:
        return "stage_error"
    return "internal"
