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

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, InvalidKeyError, KeyDeletedError, KeyNotFoundError, NoKeysError, NotFoundError

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
from core.bus import BusError, publish_event, through_failover


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
) -> JobSpec:
    """`name`: the input's name when `media` is a temp file (an HTTP upload); `copy=False` lets
    the store hardlink a file nobody will edit afterwards."""
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
    )
    event = JobSubmitted(job_id=spec.job_id, spec=spec)
    await through_failover(lambda: publish_event(js, event), "submit")
    return spec


async def cancel(js: JetStreamContext, job_id: str) -> None:
    event = JobCancelRequested(job_id=job_id)  # one event id: a retried publish is deduplicated
    await through_failover(lambda: publish_event(js, event), "cancel")


async def retry(js: JetStreamContext, job_id: str) -> None:
    event = JobRetryRequested(job_id=job_id)
    await through_failover(lambda: publish_event(js, event), "retry")


def bus_reason(error: BaseException) -> str:
    """The server's own words for a failed request: `jetstream system temporarily unavailable
    (503)`, `timeout`, `no responders available for request`."""
    if isinstance(error, APIError) and error.description:
        return f"{error.description} ({error.code})" if error.code else error.description
    return str(error).removeprefix("nats: ").strip() or type(error).__name__


# How long a read keeps trying before the command says why it cannot answer (CLI exit 4). A leader
# election took 3-4 s in the chaos run, and reads failed for 8-10 s after a cut host healed.
READ_WINDOW_S = 20.0


async def read(step, what: str, window_s: float = READ_WINDOW_S):
    """`await step()`, a read of the bus, retried through a stream leader's election
    (core.bus.through_failover) for at most `window_s`, then a BusError naming what could not be
    read and the server's last reason (CLI exit 4). Never an empty answer instead: `captionbus
    jobs --json` printed 0 jobs with exit 0 while 37 existed, for 8-10 s after a cluster host
    healed (issue 18), when every failed read here became "nothing"."""
    errors: list[BaseException] = []

    async def attempt():
        try:
            return await step()
        except Exception as e:
            errors.append(e)
            raise

    try:
        async with asyncio.timeout(window_s):
            return await through_failover(attempt, what)
    except BusError:
        raise
    except TimeoutError as e:  # the window closed, or nats' own last timeout (also a TimeoutError)
        raise BusError(f"{what}: no answer from NATS within {window_s:g} s "
                       f"(last: {bus_reason(errors[-1] if errors else e)})") from e
    except nats.errors.Error as e:
        raise BusError(f"{what}: {bus_reason(e)}") from e


async def job_state(js: JetStreamContext, job_id: str) -> JobState | None:
    """The job's record; None only when the bus says there is no such job. A direct get may be
    answered by any replica (the KV is `allow_direct`), and a replica that has just rejoined can
    lack recent keys: a "not found" is asked again of the stream's leader before it is believed."""

    async def get():
        kv = await js.key_value(subjects.JOBS_BUCKET)
        try:
            entry = await kv.get(job_id)
        except InvalidKeyError:  # not a job id at all (spaces, dots): no such job
            return None
        except (KeyNotFoundError, KeyDeletedError):
            try:
                msg = await js.get_msg(f"KV_{subjects.JOBS_BUCKET}", subject=f"$KV.{subjects.JOBS_BUCKET}.{job_id}")
            except NotFoundError:
                return None
            deleted = (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE")
            return None if deleted or not msg.data else msg.data
        return entry.value if entry and entry.value else None

    value = await read(get, f"reading job {job_id}")
    return JobState.model_validate_json(value) if value else None


async def list_jobs(js: JetStreamContext) -> list[JobState]:
    """Every job record, oldest first; [] only when the bus says there are none."""

    async def keys():
        kv = await js.key_value(subjects.JOBS_BUCKET)
        try:
            return await kv.keys()
        except NoKeysError:
            return []

    states = []
    for key in await read(keys, "listing jobs"):
        state = await job_state(js, key)
        if state:  # a job deleted (gc) between the listing and the read
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
        # the store's own (read-only) copy: one copy out, no more
        local = await read(lambda ref=ref: store.get(ref), f"fetching {key}")
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
