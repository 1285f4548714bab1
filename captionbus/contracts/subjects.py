"""Subject, stream, bucket and consumer names. Change them here only."""
from __future__ import annotations

from captionbus.contracts.ids import validate_token

PREFIX = "captionbus"

REQUESTS_STREAM = "CB_REQUESTS"  # work-queue retention: one delivery per stage request
EVENTS_STREAM = "CB_EVENTS"  # limits retention: replayable job history
JOBS_BUCKET = "cb_jobs"  # KV: job id -> JobState
ARTIFACTS_BUCKET = "cb_artifacts"  # object store: sha256 -> bytes
STAGE_CACHE_BUCKET = "cb_stage_cache"  # KV: hash(stage, inputs, params, model, env) -> outputs
WEBHOOKS_BUCKET = "cb_webhooks"  # KV: <job_id>.<subscriber> -> webhook delivery state (the gateway's)

REQUESTS_WILDCARD = f"{PREFIX}.req.*"
EVENTS_WILDCARD = f"{PREFIX}.job.>"
COORDINATOR_CONSUMER = "coordinator"

# Kinds the coordinator acts on (the rest, like progress, are for people and dashboards).
COORDINATOR_KINDS = (
    "submitted",
    "stage_completed",
    "stage_failed",
    "cancel_requested",
    "retry_requested",
)

MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{REQUESTS_STREAM}.*"
# Advisories are core NATS messages; this stream keeps them so that one published while no
# coordinator runs is still handled when one starts.
ADVISORIES_STREAM = "CB_ADVISORIES"
COORDINATOR_ADVISORY_CONSUMER = "coordinator-advisories"


def stage_request(stage: str) -> str:
    return f"{PREFIX}.req.{validate_token(stage, 'stage name')}"


def stage_consumer(stage: str) -> str:
    return f"stage-{validate_token(stage, 'stage name')}"


def job_event(job_id: str, kind: str) -> str:
    return f"{PREFIX}.job.{validate_token(job_id, 'job id')}.{validate_token(kind, 'event kind')}"


def job_events(job_id: str) -> str:
    return f"{PREFIX}.job.{validate_token(job_id, 'job id')}.*"


def job_kind_all_jobs(kind: str) -> str:
    """One event kind of every job (`captionbus.job.*.completed`)."""
    return f"{PREFIX}.job.*.{validate_token(kind, 'event kind')}"


def coordinator_filters() -> list[str]:
    return [f"{PREFIX}.job.*.{kind}" for kind in COORDINATOR_KINDS]


def micro_service_name(stage: str) -> str:
    return f"captionbus-{validate_token(stage, 'stage name')}"
