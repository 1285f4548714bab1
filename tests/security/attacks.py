"""The attacks of issue 18 as building blocks, shared by tests/security/ (one attack per test,
against a single-node secured fleet) and benchmarks/chaos.py (every attack, interleaved with
faults, against a 3-node cluster running real jobs).

Each block does what an ordinary credential may try and reports what the bus answered; whether it
did harm is decided by its caller, which knows what must survive (bytes that fetch identically,
a job that completes with its own worker's output, a stream that keeps its messages)."""
from __future__ import annotations

import base64
import json
import secrets

from nats.js.api import Header

from captionbus.contracts import StageCompleted, subjects
from tests.natsroles import denied

BUCKET = subjects.ARTIFACTS_BUCKET
STREAM = f"OBJ_{BUCKET}"
# The credentials a job's outsiders hold: they may write to the bus, and must not harm others' data.
WRITERS = ("worker", "worker-asr", "client", "gateway")
# Reply subjects a sniffer tries: the shared inbox and the prefixes of the roles that get replies.
SNIFFED = ("_INBOX.>", "_INBOX_worker.>", "_INBOX_coordinator.>", "_INBOX_client.>")


def meta_subject(key: str) -> str:
    """The object-store metadata subject of `key` (nats-py's encoding)."""
    return f"$O.{BUCKET}.M.{base64.urlsafe_b64encode(key.encode()).decode()}"


async def refused(js, subject: str, data: bytes = b"{}", headers: dict | None = None, timeout: float = 0.75) -> bool:
    """Whether the bus refuses this publish: the stream says no (an error), or the user may not
    publish there (no reply: `denied` times out)."""
    return await denied(js.publish(subject, data, headers=headers, timeout=timeout), timeout)


def rollup_targets(role: str, object_key: str | None = None) -> list[str]:
    """The subjects on which `role` tries `Nats-Rollup`: object metadata (a made-up name and, when
    given, a real object's), object chunks, the stage cache (worker-asr on its own `asr.` prefix:
    rollup `all` is stream-wide) and the webhook state."""
    cache = f"$KV.{subjects.STAGE_CACHE_BUCKET}." + ("asr.zz" if role == "worker-asr" else "zz")
    metas = [f"$O.{BUCKET}.M.zz"] + ([meta_subject(object_key)] if object_key else [])
    return [*metas, f"$O.{BUCKET}.C.zz", cache, f"$KV.{subjects.WEBHOOKS_BUCKET}.zz"]


async def try_rollups(js, role: str, object_key: str | None = None) -> list[tuple[str, str, bool]]:
    """(subject, rollup, refused) for `all` and `sub` on each of rollup_targets()."""
    return [(subject, rollup, await refused(js, subject, headers={Header.ROLLUP: rollup}))
            for subject in rollup_targets(role, object_key) for rollup in ("all", "sub")]


async def tamper(js, role: str, good) -> list[str]:
    """What `role` may publish on one stored object (`good`: its nats-py ObjectInfo as first
    stored): chunks of its own and a live meta naming them (same size and digest), junk metadata,
    a chunk appended to the real chunk subject, and a `deleted` tombstone (what nats-py's delete
    writes). Returns the chunk subjects it filled (junk that gc may later collect as torn)."""
    subject = meta_subject(good.name)
    nuid = f"{role.upper().replace('-', '')}{secrets.token_hex(5)}"
    await js.publish(f"$O.{BUCKET}.C.{nuid}", b"x" * 1000)
    await js.publish(subject, json.dumps({**good.as_dict(), "nuid": nuid, "chunks": 1}).encode())
    await js.publish(subject, b"not json")
    await js.publish(f"$O.{BUCKET}.C.{good.nuid}", b"appended by " + role.encode())
    tomb = {**good.as_dict(), "deleted": True, "size": 0, "chunks": 0, "digest": ""}
    await js.publish(subject, json.dumps(tomb).encode())
    return [f"$O.{BUCKET}.C.{nuid}"]


def forged_results(job_id: str, node: str, attempt: int, outputs: dict, stage: str | None = None) -> list[StageCompleted]:
    """A result for `node` claiming `outputs` (another job's) from `{"host": "attacker"}`, with no
    token and with a guessed one; each with an event id that says it is forged."""
    return [StageCompleted(job_id=job_id, stage=stage or node, node=node, attempt=attempt, outputs=dict(outputs),
                           worker={"host": "attacker"}, token=token, event_id=f"forged-{token}-{secrets.token_hex(4)}")
            for token in (None, secrets.token_hex(16))]


def predictable_ids(job_id: str, node: str, attempt: int = 1) -> list[tuple[str, str, str]]:
    """(role, subject it may publish on, Nats-Msg-Id) for ids anyone could predict: the node's
    result and failure, and the job's `completed` event."""
    return [("worker-asr", subjects.job_event(job_id, "stage_progress"), f"{job_id}.{node}.{attempt}.completed"),
            ("worker-asr", subjects.job_event(job_id, "stage_warning"), f"{job_id}.{node}.{attempt}.failed"),
            ("client", subjects.job_event(job_id, "submitted"), f"{job_id}.completed")]
