"""Reading the bus as one tenant's client: only through requests whose subject names what is read.

Why. Behind the auth callout (captionbus/authcallout.py) a `client` login acts for one tenant
and is granted only its tenant's subjects (deploy/README.md, "Tenancy on the bus"). NATS
permissions see a request's subject, never its body, so every read a tenant may make must name
its tenant in the subject:

- job state: a direct get whose API subject names the key
  (`$JS.API.DIRECT.GET.KV_cb_jobs.$KV.cb_jobs.<tenant>.<job>`), never `STREAM.MSG.GET` (the key,
  or a bare sequence number, in the body: any job's record) and never `STREAM.INFO` (whose
  `subjects_filter` lists every key);
- listings and follows: consumers created on the filtered-create API subject
  (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`), the filter inside the tenant
  (`$KV.cb_jobs.<tenant>.>`, `captionbus.job.<tenant>.>`); the server refuses a body whose
  filter differs from the subject's (JSConsumerCreateFilterSubjectMismatch), and a body with
  several filters on that subject (10137).

nats-py creates an ordered consumer on the unfiltered subject (`$JS.API.CONSUMER.CREATE.<stream>`,
the filter in the body) unless its config has a name. A name is fixed per consumer, but an
ordered consumer is re-created (from the next sequence, to a new inbox) after a gap or a stalled
heartbeat: with the same name that would be an update the server refuses (a new start
sequence). `Named` gives the config a fresh name each time nats-py gives it a new inbox, so a
re-creation is a new consumer, as nats-py's own unnamed ones are
(tests/security/test_tenancy.py forces one while the old consumer still exists).

A tenant is granted no CONSUMER.INFO (nor DELETE): a consumer's name is a single token, so no
grant could hold either to the tenant's own consumers (captionbus.authcallout.tenant_permissions).
So a bounded read (`held`: a listing, an object's metadata, a chunk count) counts what its
consumer holds from the answer to the consumer's creation, not from asking the consumer later.

Which tenant a connection acts for is what the server granted it (`granted_tenant`), never its
user name: captionbus.core.bus.client_tenant asks the server.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue
from nats.nuid import NUID

from captionbus.contracts import subjects
from captionbus.contracts.ids import is_tenant
from captionbus.core.bus import BusError

_nuid = NUID()

# How long a listing waits for the records its consumer said were there.
LIST_TIMEOUT_S = 10.0


@dataclass
class Named(ConsumerConfig):
    """A ConsumerConfig that takes a fresh random name whenever its deliver subject is set: the
    first creation and each re-creation of an ordered consumer (see the module docstring)."""

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        if key == "deliver_subject" and value:
            super().__setattr__("name", _nuid.next().decode())


def named(config: ConsumerConfig | None = None) -> Named:
    """`config` (or a default one) as a Named config."""
    return Named(**{k: v for k, v in (config or ConsumerConfig()).__dict__.items() if k != "name"})


def jobs_kv(js: JetStreamContext) -> KeyValue:
    """KV cb_jobs without asking for its stream info (refused to a tenant: its subjects_filter
    lists every key). Reads are direct gets (the bucket is `allow_direct`, captionbus.core.bus.provision)."""
    bucket = subjects.JOBS_BUCKET
    return KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=js, direct=True)


def connection(js: JetStreamContext) -> NATS:
    """The NATS connection under `js`. JetStreamContext keeps it private (`_nc`) and has no
    accessor; this is the one place captionbus reaches for it."""
    return js._nc


async def held(js: JetStreamContext, stream: str, subject: str, *, deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
               headers_only: bool = False, limit: int | None = None,
               timeout: float = LIST_TIMEOUT_S) -> tuple[list[Msg], int]:
    """(the first `limit` messages, None: all; how many there are) of `subject` in `stream`, as
    one ordered consumer created on the filtered-create subject delivers them (`deliver_policy`
    LAST_PER_SUBJECT: the last of each subject; LAST: the last one). Served by the stream's
    leader, so a message a just-rejoined replica lacks is still found. How many: what the
    consumer was created holding, from the create's own answer (no CONSUMER.INFO: see the
    module docstring). limit=0 reads none (and subscribes to nothing)."""
    config = named(ConsumerConfig(
        filter_subject=subject, deliver_policy=deliver_policy, headers_only=headers_only or None,
        inactive_threshold=30.0,  # the server removes it this long after we stop listening
        # what js.subscribe(ordered_consumer=True) sets, so nats-py re-creates it as its own
        flow_control=True, ack_policy=AckPolicy.NONE, max_deliver=1, ack_wait=22 * 3600, idle_heartbeat=5.0,
        num_replicas=1, mem_storage=True))
    config.deliver_subject = connection(js).new_inbox()  # (Named: a fresh name with it)
    # A push consumer delivers once its deliver subject has interest: nothing is lost between
    # the create and the subscription (js.subscribe does the same, in the same order).
    info = await js.add_consumer(stream, config)
    count = info.delivered.consumer_seq + info.num_pending
    wanted = count if limit is None else min(count, limit)
    if not wanted:
        return [], count
    sub = await js.subscribe_bind(stream, config, info.name, ordered_consumer=True)
    try:
        msgs = []
        async with asyncio.timeout(timeout):
            for n in range(1, wanted + 1):
                msgs.append(msg := await sub.next_msg(timeout=None))
                # nats-py re-creates an ordered consumer after a gap from the next stream sequence with
                # DeliverPolicy BY_START_SEQUENCE: no longer the last per subject, and not the count
                # above. Its deliveries number from 1 again: a read that saw one is an error, not an answer.
                if msg.metadata.sequence.consumer != n:
                    raise BusError(f"reading {subject}: its consumer was re-created mid-read (a gap or a "
                                   "stalled heartbeat); read again")
        return msgs, count
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def last_per_key(js: JetStreamContext, key_filter: str, *, headers_only: bool) -> dict[str, Msg]:
    """key -> the last message of each key of KV cb_jobs matching `key_filter` (a key, or
    `<tenant>.*`: subjects.tenant_records), through `held`. Deleted and purged keys are left out."""
    prefix = f"$KV.{subjects.JOBS_BUCKET}."
    msgs, _ = await held(js, f"KV_{subjects.JOBS_BUCKET}", prefix + key_filter,
                         deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, headers_only=headers_only)
    found: dict[str, Msg] = {}
    for msg in msgs:
        key = msg.subject[len(prefix):]
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            found.pop(key, None)
        else:
            found[key] = msg
    return found


# what the auth callout grants a tenant to submit: its own jobs only (captionbus.authcallout.tenant_permissions)
_TENANT_SUBMIT = re.compile(rf"{re.escape(subjects.PREFIX)}\.job\.([^.*>]+)\.\*\.submitted")


def granted_tenant(publish_allow: list[str]) -> str | None:
    """The tenant a connection acts for, from the publish grants the server gave it: the one
    tenant whose jobs it may submit (`captionbus.job.<tenant>.*.submitted`), or None for a role
    granted no such subject (a trusted one, which submits as no tenant: the gateway, a static
    client). ValueError for grants naming several tenants (nothing captionbus grants)."""
    tenants = sorted({m[1] for s in publish_allow if (m := _TENANT_SUBMIT.fullmatch(s)) and is_tenant(m[1])})
    if len(tenants) > 1:
        raise ValueError(f"this login may submit jobs of several tenants ({', '.join(tenants)}): "
                         "cannot tell which one it acts for")
    return tenants[0] if tenants else None
