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

# Job ownership among coordinators (captionbus/coordinator/leases.py). Every job belongs to one of
# PARTITIONS partitions (`job_partition`), and every event of it carries its partition in its
# subject (`job_event`), so each partition has a durable consumer on CB_EVENTS itself
# (`partition_consumer`, filtered by `partition_filters`), pulled by the one coordinator that holds
# its lease in KV cb_coordinators (`partition.<p>`, beside each live coordinator's `member.<id>`).
# Each event is stored once. PARTITIONS is part of every event's subject: every publisher computes
# it alike, so it is fixed (changing it is a new subject layout, like this one was). Why 8: each
# partition's consumer is one more consumer (a raft group of its own on a cluster) that the server
# serves, and one coordinator holding 16 cost its 3-node cluster's servers 4.60-5.90 ms a hop
# against 3.23-4.31 with the one consumer before job ownership, where 8 cost the same as that one
# (benchmarks/fleet_sim.py --hops; README, *Coordinators that own their jobs*). 8 balance 1, 2, 4
# and 8 coordinators evenly, 3 as 3, 3, 2; a 9th holds none (a standby).
COORDINATORS_BUCKET = "cb_coordinators"
PARTITIONS = 8

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
# token, so that a NATS permission can name one tenant's (`captionbus.job.acme.>`,
# `$KV.cb_jobs.acme.>`). A job's events: `captionbus.job.<tenant>.<partition>.<job>.<kind>`, a job of
# no tenant's under NO_TENANT (`_`, which no tenant is): six tokens, the partition (`job_partition`)
# at the fourth, so a coordinator's consumer of one partition filters by it (`partition_filters`).
# KV keys: `<tenant>.<job>`, and `<job>` for a job of no tenant (unchanged).
# Events of coordinators before job ownership (LEGACY_*: `captionbus.job.<job>.<kind>`, of a tenant
# `captionbus.job.<tenant>.<job>.<kind>`) differ in token count (4 and 5), so no filter of one
# layout matches the other's; they stay in CB_EVENTS as they were (deploy/README.md, "Upgrading
# coordinators").


def _job_path(job_id: str) -> str:
    """`<job>` or `<tenant>.<job>`: the job's part of its subjects and its KV key."""
    tenant = tenant_of(validate_token(job_id, "job id"))
    return job_id if tenant == NO_TENANT else f"{tenant}.{job_id}"


def _event_path(job_id: str) -> str:
    """`<tenant>.<partition>.<job>` (NO_TENANT for a job of no tenant): a job's part of its events' subjects."""
    return f"{tenant_of(validate_token(job_id, 'job id'))}.{job_partition(job_id)}.{job_id}"


def job_event(job_id: str, kind: str) -> str:
    return f"{PREFIX}.job.{_event_path(job_id)}.{validate_token(kind, 'event kind')}"


def job_events(job_id: str) -> str:
    return f"{PREFIX}.job.{_event_path(job_id)}.*"


def legacy_job_event(job_id: str, kind: str) -> str:
    """A job event's subject before job ownership (`captionbus.job.[<tenant>.]<job>.<kind>`)."""
    return f"{PREFIX}.job.{_job_path(job_id)}.{validate_token(kind, 'event kind')}"


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
    """One event kind of every job (`captionbus.job.*.*.*.completed`), and of every job's events
    in the layout before job ownership (`captionbus.job.*.completed`, `captionbus.job.*.*.completed`:
    an older publisher's, during an upgrade)."""
    kind = validate_token(kind, "event kind")
    return [f"{PREFIX}.job.*.*.*.{kind}", f"{PREFIX}.job.*.{kind}", f"{PREFIX}.job.*.*.{kind}"]


def event_kind(subject: str) -> str:
    """The kind of a job event subject (its last token)."""
    return subject.rpartition(".")[2]


def event_job_id(subject: str) -> str:
    """The job id of a job event subject (the token before its kind)."""
    return subject.split(".")[-2]


def legacy_coordinator_filters() -> list[str]:
    """The filters of the one events consumer (`coordinator`) coordinators before job ownership shared."""
    return [subject for kind in COORDINATOR_KINDS for subject in job_kind_all_jobs(kind)[1:]]


def micro_service_name(stage: str) -> str:
    return f"captionbus-{validate_token(stage, 'stage name')}"


_FNV32_OFFSET, _FNV32_PRIME = 0x811C9DC5, 0x01000193


def job_partition(job_id: str, partitions: int = PARTITIONS) -> int:
    """The partition of a job: FNV-1a (32 bits) of its id's bytes, modulo `partitions` (the hash
    of nats-server's `partition()` subject mapping, server/subject_transform.go). Computed by
    every publisher of a job's events (`job_event`): workers, clients, the gateway and the
    coordinators agree on it without asking anyone."""
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


def partition_filters(partition: int) -> list[str]:
    """The CB_EVENTS subjects of the events a coordinator acts on (COORDINATOR_KINDS) of one
    partition's jobs: its consumer's filters (`captionbus.job.*.<p>.*.<kind>`)."""
    return [f"{PREFIX}.job.*.{int(partition)}.*.{kind}" for kind in COORDINATOR_KINDS]


def partition_consumer(partition: int) -> str:
    """The durable consumer of one partition's events on CB_EVENTS."""
    return f"coordinator-p{int(partition)}"


def partition_consumers() -> list[str]:
    return [partition_consumer(p) for p in range(PARTITIONS)]


def event_partition(subject: str) -> int | None:
    """The partition a job event's subject names (its fourth token), None in the layout before job ownership."""
    tokens = subject.split(".")
    return int(tokens[3]) if len(tokens) == 6 and tokens[3].isdigit() else None


def partition_lease_key(partition: int) -> str:
    """The KV cb_coordinators key whose holder consumes `partition` (value: the coordinator's id)."""
    return f"partition.{int(partition)}"


def coordinator_member_key(coordinator_id: str) -> str:
    """The KV cb_coordinators key a live coordinator keeps written (it expires with the bucket's TTL)."""
    return f"member.{validate_token(coordinator_id, 'coordinator id')}"
