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
re-creation is a new consumer, as nats-py's own unnamed ones are.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue
from nats.nuid import NUID

from captionbus.contracts import subjects

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


async def last_per_key(js: JetStreamContext, key_filter: str, *, headers_only: bool) -> dict[str, object]:
    """key -> the last message of each key of KV cb_jobs matching `key_filter` (a key or
    `<tenant>.>`), read through a consumer on the filtered-create subject: served by the stream's
    leader, so a record a just-rejoined replica lacks is still found. Deleted and purged keys
    are left out."""
    prefix = f"$KV.{subjects.JOBS_BUCKET}."
    config = named(ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, headers_only=headers_only))
    sub = await js.subscribe(prefix + key_filter, stream=f"KV_{subjects.JOBS_BUCKET}", ordered_consumer=True,
                             config=config)
    found: dict[str, object] = {}
    try:
        # what it has delivered (maybe still queued here) and what it has yet to: the messages it holds
        info = await sub.consumer_info()
        expected = info.delivered.consumer_seq + info.num_pending
        async with asyncio.timeout(LIST_TIMEOUT_S):
            for _ in range(expected):
                msg = await sub.next_msg(timeout=None)
                key = msg.subject[len(prefix):]
                if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
                    found.pop(key, None)
                else:
                    found[key] = msg
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found
