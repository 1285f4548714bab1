"""Subject, stream, bucket and consumer names. Change them here only."""
from __future__ import annotations

import base64
import functools
import hashlib

from captionbus.contracts.ids import NO_TENANT, tenant_of, validate_tenant, validate_token

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

# Job ownership among coordinators (captionbus/coordinator/leases.py). The events the coordinator
# acts on are copied by the server from CB_EVENTS into the work-queue stream CB_COORD under
# `captionbus.coord.<partition>.<job path>.<kind>` (a stream source with subject transforms:
# `coordinator_transforms`), the partition being `job_partition(job)`; each partition has its
# durable consumer (`partition_consumer`), pulled by the one coordinator that holds its lease
# in KV cb_coordinators (`partition.<p>`, beside each live coordinator's `member.<id>`).
COORDINATOR_STREAM = "CB_COORD"
COORDINATORS_BUCKET = "cb_coordinators"
COORD_PREFIX = f"{PREFIX}.coord"
# How many partitions a bus has: fixed when CB_COORD is created (its transforms name it, and its
# metadata says it under PARTITIONS_METADATA); every coordinator reads it from there.
DEFAULT_PARTITIONS = 16
PARTITIONS_METADATA = "captionbus_partitions"

MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{REQUESTS_STREAM}.*"
# Advisories are core NATS messages; this stream keeps them so that one published while no
# coordinator runs is still handled when one starts.
ADVISORIES_STREAM = "CB_ADVISORIES"
COORDINATOR_ADVISORY_CONSUMER = "coordinator-advisories"


def stage_request(stage: str) -> str:
    return f"{PREFIX}.req.{validate_token(stage, 'stage name')}"


def stage_consumer(stage: str) -> str:
    return f"stage-{validate_token(stage, 'stage name')}"


# Job subjects and keys carry the job's tenant (captionbus.contracts.ids.tenant_of) as a whole
# token: `captionbus.job.<tenant>.<job>.<kind>` and KV key `<tenant>.<job>`, so that a NATS
# permission can name one tenant's (`captionbus.job.acme.>`, `$KV.cb_jobs.acme.>`). A job of no
# tenant keeps the layout every job had before tenants: `captionbus.job.<job>.<kind>`, key
# `<job>` (nothing stored earlier moves). The two never meet: they differ in token count.


def _job_path(job_id: str) -> str:
    """`<job>` or `<tenant>.<job>`: the job's part of its subjects and its KV key."""
    tenant = tenant_of(validate_token(job_id, "job id"))
    return job_id if tenant == NO_TENANT else f"{tenant}.{job_id}"


def job_event(job_id: str, kind: str) -> str:
    return f"{PREFIX}.job.{_job_path(job_id)}.{validate_token(kind, 'event kind')}"


def job_events(job_id: str) -> str:
    return f"{PREFIX}.job.{_job_path(job_id)}.*"


def job_key(job_id: str) -> str:
    """The job's key in KV cb_jobs."""
    return _job_path(job_id)


def job_id_of_key(key: str) -> str:
    """The job id of a KV cb_jobs key (its last token)."""
    return key.rpartition(".")[2]


PART_NAME_LENGTH = 20  # base32 characters of a part's SHA-256: 100 bits
_PART_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def part_name(value: bytes) -> str:
    """The name of a part of a job's record: the first PART_NAME_LENGTH characters of the base32
    SHA-256 of its bytes. Named by what it holds, not by the node it belongs to: any node id
    the workflow makes (an item of any name, a branch of any language) gives a valid key, and a
    name holds one value only, so two coordinators that decided two completions of one attempt
    (a redelivered request both of whose runs finished) write two keys, never one key that
    holds the loser's bytes while the winner's state names it, and a reader or a coordinator
    may keep a part it read as long as it likes (it cannot change)."""
    return base64.b32encode(hashlib.sha256(value).digest()).decode()[:PART_NAME_LENGTH]


def is_part_name(name: object) -> bool:
    return isinstance(name, str) and len(name) == PART_NAME_LENGTH and _PART_NAME_CHARS.issuperset(name)


def job_part_key(job_id: str, name: str) -> str:
    """The KV cb_jobs key of a part of a job's record kept apart from it (a completed node,
    NodeState.part; a node's speaker summary, NodeState.speaker_turns_key): written once, before
    the record naming it, never with a rewrite of the record. `name` is `part_name` of its bytes.
    `<tenant>.<job>.<name>`, and `_.<job>.<name>` for a job of no tenant: three tokens, so never
    a job's key (one or two, `is_job_key`), under the tenant's keys (`$KV.cb_jobs.<tenant>.>`,
    which the tenant and every role that reads all job state may read), and a job of no tenant's
    under `_`, which no tenant is (`<job>.<part>` would lie under a tenant named like the job).
    Keys of coordinators before part names (`<tenant>.<job>.<node>.turns.<attempt>`) are read
    where a record names them, and collected with their job's record."""
    if not is_part_name(name):
        raise ValueError(f"invalid record part name {name!r}: part_name() of the part's bytes")
    return f"{tenant_of(validate_token(job_id, 'job id'))}.{job_id}.{name}"


def job_id_of_part_key(key: str) -> str:
    """The job id of a part's key (`job_part_key`: its second token)."""
    return key.split(".")[1]


def is_job_key(key: str) -> bool:
    """Whether a KV cb_jobs key is a job's record (`job_key`), not a part of one (`job_part_key`)."""
    return key.count(".") < 2


def job_part_keys(job_id: str) -> str:
    """The KV cb_jobs keys of every part of one job's record, as a key filter."""
    return f"{tenant_of(validate_token(job_id, 'job id'))}.{job_id}.>"


def tenant_events(tenant: str) -> str:
    """Every event of one tenant's jobs."""
    return f"{PREFIX}.job.{validate_tenant(tenant)}.>"


def tenant_keys(tenant: str) -> str:
    """The KV cb_jobs keys of one tenant's jobs, their records' parts included, as a key filter."""
    return f"{validate_tenant(tenant)}.>"


def tenant_records(tenant: str) -> str:
    """The KV cb_jobs keys of one tenant's job records (`<tenant>.<job>`), not their parts
    (`job_part_key`: a third token), as a key filter: within what the auth callout grants a
    tenant (consumers filtered to `$KV.cb_jobs.<tenant>.>`)."""
    return f"{validate_tenant(tenant)}.*"


def job_kind_all_jobs(kind: str) -> list[str]:
    """One event kind of every job, of no tenant and of any tenant (`captionbus.job.*.completed`,
    `captionbus.job.*.*.completed`)."""
    kind = validate_token(kind, "event kind")
    return [f"{PREFIX}.job.*.{kind}", f"{PREFIX}.job.*.*.{kind}"]


def event_kind(subject: str) -> str:
    """The kind of a job event subject (its last token)."""
    return subject.rpartition(".")[2]


def event_job_id(subject: str) -> str:
    """The job id of a job event subject (the token before its kind)."""
    return subject.split(".")[-2]


def coordinator_filters() -> list[str]:
    return [subject for kind in COORDINATOR_KINDS for subject in job_kind_all_jobs(kind)]


def micro_service_name(stage: str) -> str:
    return f"captionbus-{validate_token(stage, 'stage name')}"


_FNV32_OFFSET, _FNV32_PRIME = 0x811C9DC5, 0x01000193


def job_partition(job_id: str, partitions: int) -> int:
    """The partition of a job: FNV-1a (32 bits) of its id's bytes, modulo `partitions`. The same
    function as nats-server's `partition(n, …)` subject mapping over the one job-id token
    (server/subject_transform.go: fnv.New32a of the tokens, % n), which is what files the job's
    events under `captionbus.coord.<partition>` in CB_COORD (`coordinator_transforms`), so
    coordinators, workers and clients agree on it without asking the server
    (tests/integration/test_coordinators.py checks it against the server's own)."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions!r}")
    return _fnv1a_32(validate_token(job_id, "job id")) % partitions


@functools.lru_cache(maxsize=65536)
def _fnv1a_32(text: str) -> int:
    # Cached: a coordinator asks it of a job several times an event (a Python loop over the id's
    # bytes, ~15 us); 65536 ids of ~30 characters are a few MB.
    value = _FNV32_OFFSET
    for byte in text.encode():
        value = ((value ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return value


def coordinator_transforms(partitions: int) -> list[tuple[str, str]]:
    """(source filter, destination) pairs of the subject transforms that copy the events a
    coordinator acts on (COORDINATOR_KINDS) from CB_EVENTS into CB_COORD, each under its job's
    partition: `captionbus.job.<job>.<kind>` -> `captionbus.coord.<p>.<job>.<kind>` and
    `captionbus.job.<tenant>.<job>.<kind>` -> `captionbus.coord.<p>.<tenant>.<job>.<kind>`, the
    partition hashed from the job token alone (`job_partition`)."""
    pairs = []
    for kind in COORDINATOR_KINDS:
        pairs.append((f"{PREFIX}.job.*.{kind}",
                      f"{COORD_PREFIX}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.{kind}"))
        pairs.append((f"{PREFIX}.job.*.*.{kind}",
                      f"{COORD_PREFIX}.{{{{partition({partitions},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{kind}"))
    return pairs


def partition_events(partition: int) -> str:
    """The CB_COORD subjects of one partition's events (its consumer's filter)."""
    return f"{COORD_PREFIX}.{int(partition)}.>"


def partition_consumer(partition: int) -> str:
    """The durable consumer of one partition's events on CB_COORD."""
    return f"coordinator-p{int(partition)}"


def job_event_of_coord(subject: str) -> tuple[int, str]:
    """(partition, the event's CB_EVENTS subject) of a CB_COORD subject."""
    head = f"{COORD_PREFIX}."
    if not subject.startswith(head):
        raise ValueError(f"{subject!r} is not a coordinator subject ({head}<partition>.…)")
    partition, _, rest = subject[len(head):].partition(".")
    return int(partition), f"{PREFIX}.job.{rest}"


def partition_lease_key(partition: int) -> str:
    """The KV cb_coordinators key whose holder consumes `partition` (value: the coordinator's id)."""
    return f"partition.{int(partition)}"


def coordinator_member_key(coordinator_id: str) -> str:
    """The KV cb_coordinators key a live coordinator keeps written (it expires with the bucket's TTL)."""
    return f"member.{validate_token(coordinator_id, 'coordinator id')}"
