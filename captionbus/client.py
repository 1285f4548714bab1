"""What a user-side process does on the bus: submit a job, follow its events, fetch outputs.

Used by the CLI; also the small API for people who drive captionbus from their own code.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import AsyncIterator

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from contracts import (
    ArtifactRef,
    JobCancelRequested,
    JobRetryRequested,
    JobSpec,
    JobState,
    JobSubmitted,
    new_job_id,
    parse_event,
    subjects,
)
from contracts.events import TERMINAL_KINDS
from contracts.languages import LANGUAGES
from core.artifacts import ArtifactStore
from core.bus import publish_event, through_failover


class SubmitError(ValueError):
    """The job was refused before anything ran; the message says how to fix it."""


def check_input_file(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise SubmitError(f"{path}: no such file")
    if not path.is_file():
        raise SubmitError(f"{path}: not a regular file")
    return path.resolve()


async def submit(
    js: JetStreamContext,
    store: ArtifactStore,
    media: Path,
    *,
    workflow: str = "transcribe",
    source_language: str | None = None,
    target_languages: list[str] | None = None,
    options: dict | None = None,
    job_id: str | None = None,
    name: str | None = None,
    copy: bool = True,
    owner: str | None = None,
) -> JobSpec:
    """`name`: the input's name when `media` is a temp file (an HTTP upload); `copy=False` lets
    the store hardlink a file nobody will edit afterwards; `owner`: the gateway key submitting it."""
    media = check_input_file(media)
    # Through a stream leader's failover (core.bus.through_failover): both steps are idempotent,
    # the artifact key is the content hash and the event's Nats-Msg-Id its event id.
    ref = await through_failover(lambda: store.put(media, name=name or media.name, copy=copy), "upload")
    spec = JobSpec(
        job_id=job_id or new_job_id(),
        workflow=workflow,
        input=ref,
        source_language=source_language,
        target_languages=target_languages or [],
        options=options or {},
        owner=owner,
    )
    event = JobSubmitted(job_id=spec.job_id, spec=spec)
    await through_failover(lambda: publish_event(js, event), "submit")
    return spec


async def cancel(js: JetStreamContext, job_id: str) -> None:
    await publish_event(js, JobCancelRequested(job_id=job_id))


async def retry(js: JetStreamContext, job_id: str) -> None:
    await publish_event(js, JobRetryRequested(job_id=job_id))


async def job_state(js: JetStreamContext, job_id: str) -> JobState | None:
    kv = await js.key_value(subjects.JOBS_BUCKET)
    try:
        entry = await kv.get(job_id)
    except Exception:  # nats raises KeyNotFoundError/KeyDeletedError; both mean "no such job"
        return None
    return JobState.model_validate_json(entry.value) if entry and entry.value else None


async def list_jobs(js: JetStreamContext) -> list[JobState]:
    kv = await js.key_value(subjects.JOBS_BUCKET)
    try:
        keys = await kv.keys()
    except Exception:  # NoKeysError when the bucket is empty
        return []
    states = []
    for key in dict.fromkeys(keys):  # nats-py's keys() lists a key updated during its watch twice
        state = await job_state(js, key)
        if state:
            states.append(state)
    return sorted(states, key=lambda s: s.created_at)


def _pending(msg) -> int:
    try:
        return msg.metadata.num_pending
    except Exception:  # not a JetStream message (no metadata): nothing known to be queued
        return 0


async def follow(
    js: JetStreamContext, job_id: str | None = None, *, stop_at_end: bool = True,
    since: datetime | None = None, stop_when_caught_up: bool = False,
) -> AsyncIterator:
    """Job events from the start of the stream (or from `since`), replayed and then live, in order.

    stop_at_end: return after the job's final event, i.e. a terminal event with nothing stored
    after it (a retried job has several terminal events; replay goes through all of them).
    stop_when_caught_up: return once every stored event is delivered (a replay, not a follow)."""
    subject = subjects.job_events(job_id) if job_id else subjects.EVENTS_WILDCARD
    if since is None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    else:
        start = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
    # Creating the consumer asks the meta leader; right after a node dies it may be electing one
    # (a timeout), like a stream's leader for submit (core.bus.through_failover).
    sub = await through_failover(lambda: js.subscribe(subject, ordered_consumer=True, config=config), "follow")
    try:
        async for msg in sub.messages:
            pending = _pending(msg)
            try:
                event = parse_event(msg.data)
            except ValueError:
                event = None  # a newer schema or foreign publisher: not ours to interpret
            if event is not None:
                yield event
            if stop_at_end and job_id and event is not None and event.kind in TERMINAL_KINDS and pending == 0:
                return
            if stop_when_caught_up and pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def output_filename(stem: str, key: str, ref: ArtifactRef) -> str:
    """subtitle_gen.srt → clip.srt; srt-ta and srt_translated-ta → clip.ta.srt;
    translation-ta (json) → clip.translation.ta.json; mp4 → clip.subtitled.mp4."""
    ext = Path(ref.name).suffix.lstrip(".") or "bin"
    base, _, language = key.rpartition("-")
    if not base or language not in LANGUAGES:
        base, language = key, ""
    label = base.replace(ext, "").replace("translated", "").strip("-_.")
    if ext in ("mp4", "mkv", "mov"):
        label = f"subtitled.{label}" if label else "subtitled"
    return ".".join(part for part in (stem, label, language, ext) if part)


async def fetch_outputs(
    store: ArtifactStore, outputs: dict[str, ArtifactRef], out_dir: Path, stem: str
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, ref in sorted(outputs.items()):
        local = await store.get(ref)  # the store's own (read-only) copy: one copy out, no more
        target = out_dir / output_filename(stem, key, ref)
        shutil.copyfile(local, target)
        written[key] = target
    return written


async def collect_replies(nc: NATS, subject: str, timeout: float = 1.0) -> list[dict]:
    """Publish once and gather every JSON reply for `timeout` (many services answer $SRV.*)."""
    replies: list[dict] = []
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    with contextlib.suppress(asyncio.TimeoutError):
        async with asyncio.timeout(timeout):
            async for msg in sub.messages:
                with contextlib.suppress(ValueError):
                    replies.append(json.loads(msg.data))
    await sub.unsubscribe()
    return replies


def merge_state(reply: dict) -> dict:
    """A $SRV STATS reply with its worker state (contracts.WorkerState, the endpoint's `data`)
    as `state`, and the facts that become known after registration (the loaded model, setup's
    error) merged into `metadata`, where readers of $SRV INFO found them before."""
    data = next((e.get("data") for e in reply.get("endpoints") or [] if isinstance(e.get("data"), dict)), None)
    meta = dict(reply.get("metadata") or {})
    if data:
        meta.update({k: str(data[k]) for k in ("model", "setup_error") if data.get(k) is not None})
    return {**reply, "metadata": meta, "state": data or {}}


async def workers(nc: NATS, timeout: float = 1.0, stage: str | None = None) -> list[dict]:
    """Every captionbus stage service's $SRV.STATS reply (or one stage's), through merge_state:
    metadata (WorkerInfo, flat) plus `state` (contracts.WorkerState)."""
    subject = f"$SRV.STATS.{subjects.micro_service_name(stage)}" if stage else "$SRV.STATS"
    replies = await collect_replies(nc, subject, timeout)
    return [merge_state(r) for r in replies if str(r.get("name", "")).startswith("captionbus-")]
