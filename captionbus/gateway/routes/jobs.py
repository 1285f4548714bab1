"""The job API: create (upload or --inputs path), list, read, cancel, retry, download, events (SSE).
A key sees and acts on its own jobs only (an admin key on all): `OwnedJob` answers 404 otherwise."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import structlog
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse

from captionbus import client
from captionbus.client import output_filename
from captionbus.gateway.deps import CallerDep, GatewayDep, JetStream, OwnedJob, Slot, SpeakersFormDep
from captionbus.gateway.dispatch import CALLBACK
from captionbus.gateway.forms import parse_options, split_languages
from captionbus.gateway.schemas import Job, JobCreated, JobForm, JobList, Requested, form_body
from captionbus.gateway.state import on_bus
from captionbus.gateway.webhooks import check_target
from captionbus.web.errors import ApiError, documented
from captionbus.web.sse import event_stream

log = structlog.get_logger("captionbus.gateway")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=documented(401, 404, 422, 429, 503))
FINISHED = ("completed", "failed", "cancelled")


@router.post("", status_code=201, response_model=JobCreated, openapi_extra=form_body(JobForm),
             responses=documented(400, 413))
async def create_job(gw: GatewayDep, caller: CallerDep, js: JetStream, form: SpeakersFormDep):
    """Create a job from an upload (or a file under --inputs); validated as `captionbus submit` does."""
    callback = form.one("callback_url")
    if callback:
        if gw.dispatcher is None:
            raise ApiError(422, "this gateway sends no webhooks (start it with --webhook-allow and "
                                "CAPTIONBUS_WEBHOOK_SECRET)")
        try:
            check_target(callback, gw.dispatcher.config.allow_for(gw.owner_of(caller)))
        except ValueError as e:
            raise ApiError(422, str(e)) from None
    job_id = await gw.submit(js, form, caller, workflow=form.one("workflow") or "transcribe",
                             source=form.one("source_language") or None,
                             targets=split_languages(form.one("target_languages")),
                             options=with_speakers(parse_options(form.one("options")), form.one("speakers")))
    log.info("job submitted", job_id=job_id, key=caller.name)
    await gw.recorded(js, job_id)
    if callback:
        try:
            async with on_bus():
                await gw.dispatcher.add(js, job_id, CALLBACK, callback, job_owner=gw.owner_of(caller))
        except RuntimeError as e:  # no cb_webhooks bucket: the job runs, its callback cannot
            raise ApiError(503, f"job {job_id} submitted, but its webhooks cannot be recorded: {e}") from None
    return JobCreated(id=job_id, url=f"/v1/jobs/{job_id}")


def with_speakers(options: dict, speakers: str | None) -> dict:
    """The `speakers` field (`captionbus run --speakers`) as the diarization stage's param, which
    the workflows' diarization node is switched on by (checked with the job's other options)."""
    if not speakers:
        return options
    group = options.get("diarization", {})
    if not isinstance(group, dict):
        raise ApiError(400, "options.diarization must be an object of the diarization stage's params")
    if "speakers" in group and str(group["speakers"]) != speakers:
        raise ApiError(400, f"speakers={speakers!r} and options.diarization.speakers={group['speakers']!r} disagree")
    return {**options, "diarization": {**group, "speakers": speakers}}


@router.get("", response_model=JobList)
async def list_jobs(_slot: Slot, gw: GatewayDep, caller: CallerDep, js: JetStream,
                    status: Literal["pending", "running", "completed", "failed", "cancelled"] | None = None,
                    workflow: str | None = None, limit: int = Query(100, ge=0, le=10000)):
    """The caller's jobs (an admin key: every job), newest first; filter by status and workflow."""
    picked = [s for s in reversed(await gw.jobs(js, caller))
              if (status is None or s.status.value == status) and (workflow is None or s.spec.workflow == workflow)]
    return JobList(data=[Job.of(s) for s in await gw.whole(js, picked[:limit])])


@router.get("/{job_id}", response_model=Job)
async def get_job(state: OwnedJob):
    """State, per-stage progress and outputs (with download URLs)."""
    return Job.of(state)


@router.post("/{job_id}/cancel", status_code=202, response_model=Requested, responses=documented(409))
async def cancel_job(state: OwnedJob, js: JetStream):
    if state.status.value in FINISHED:
        raise ApiError(409, f"job {state.job_id} is already {state.status.value}")
    async with on_bus():
        await client.cancel(js, state.job_id)
    return Requested(id=state.job_id, requested="cancel")


@router.post("/{job_id}/retry", status_code=202, response_model=Requested, responses=documented(409))
async def retry_job(state: OwnedJob, js: JetStream):
    if state.status.value not in ("failed", "cancelled"):
        raise ApiError(409, f"job {state.job_id} is {state.status.value}; only failed or cancelled jobs are retried")
    async with on_bus():
        await client.retry(js, state.job_id)
    return Requested(id=state.job_id, requested="retry")


@router.get("/{job_id}/outputs/{name}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the output's bytes"}})
async def download(_slot: Slot, state: OwnedJob, name: str, gw: GatewayDep, js: JetStream):
    """One output's bytes, streamed."""
    ref = state.outputs.get(name)
    if ref is None:
        have = ", ".join(state.outputs) or f"none yet (job is {state.status.value})"
        raise ApiError(404, f"job {state.job_id} has no output {name!r} (outputs: {have})")
    path = await gw.output(js, state.job_id, name, ref)
    stem = Path(state.spec.input.name).stem or "job"
    return FileResponse(path, media_type=ref.media_type or "application/octet-stream",
                        filename=output_filename(stem, name, ref))


def resume_after(last_event_id: str | None) -> int:
    """The stream sequence a `Last-Event-ID` names (0: none). Only ASCII digits, at most 19 (a
    sequence is a uint64): `str.isdigit()` let '²' through to int(), a 500, and 5000 digits were
    another (int's digit limit); anything but an id this endpoint sent is a 400."""
    if not last_event_id:
        return 0
    if not re.fullmatch(r"[0-9]{1,19}", last_event_id):
        raise ApiError(400, f"Last-Event-ID {last_event_id[:40]!r} is not an event id this stream sent "
                            "(a stream sequence: digits); reconnect without it to read from the start")
    return int(last_event_id)


@router.get("/{job_id}/events", responses={**documented(400, 429), 200: {"content": {"text/event-stream": {}},
                                                 "description": "id: stream sequence, event: kind, data: the event"}})
async def events(request: Request, _slot: Slot, state: OwnedJob, gw: GatewayDep, js: JetStream,
                 last_event_id: str | None = Header(None)):
    """Server-Sent Events: the job's history, then live until it ends. Each event's `id` is
    its stream sequence: reconnect with `Last-Event-ID` to resume after it. A stream is one of
    the key's requests in flight (`--concurrency`, 429 past it) for as long as it is open: each
    holds a JetStream consumer, and one key held 60 streams (60 consumers) at concurrency 8."""
    after = resume_after(last_event_id)

    async def stream():  # until the job's real end (ends.job_events), through cancel and retry
        async for seq, event in gw.job_events(js, state.job_id, after):
            yield {"id": str(seq), "event": event.kind, "data": event.model_dump_json()}

    return event_stream(stream())
