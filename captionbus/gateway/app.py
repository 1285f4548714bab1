"""The gateway's ASGI app: a job API, OpenAI-compatible audio endpoints and webhooks over the bus.

Stateless: a job is created by publishing `submitted` (as `captionbus submit` does) and read back
from the coordinator's KV record and the events stream, so any gateway answers for any job and
the gateway can restart without losing one. Only webhook deliveries in flight live in a gateway's
memory (see `webhooks.py`).

Uploads are parsed as they arrive (python-multipart's streaming parser) into a file next to the
artifact root and hardlinked into it: a 1 GB upload never sits in memory and is written once.
Downloads are `FileResponse`s (64 KiB chunks).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_plus

import httpx
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from nats.aio.client import Client as NATS
from python_multipart.multipart import FormParser, parse_options_header
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from captionbus import client
from captionbus.client import SubmitError, output_filename
from captionbus.gateway.dispatch import CALLBACK, DispatchConfig, Dispatcher, Subscriber
from captionbus.gateway.ends import JobEnds, job_events
from captionbus.gateway.keys import KeyRing
from captionbus.gateway.openai_format import RESPONSE_FORMATS, as_json, as_verbose_json
from captionbus.gateway.webhooks import check_target
from captionbus.runner import validate_job
from contracts import JobState
from contracts.events import TERMINAL_KINDS
from contracts.ids import new_job_id, validate_token
from contracts.languages import check_language
from contracts.transcript import Transcript
from core.artifacts import ArtifactStore
from core.bus import connect, require_provisioned
from core.settings import Settings

log = structlog.get_logger("captionbus.gateway")

BUS_TIMEOUT_S = 10.0


class ApiError(Exception):
    """Answered as {"error": {"message", "type", "code"}} (OpenAI's error shape, which its
    client parses) with `status`; `message` is one line a person can act on."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


@dataclass
class GatewayConfig:
    settings: Settings
    nats_url: str
    keys: KeyRing | None = None  # None: no auth (loopback only; the CLI refuses otherwise)
    max_upload_bytes: int = 4 * 1024**3
    concurrency_per_key: int = 8
    inputs_dir: Path | None = None  # jobs may name files under it instead of uploading
    webhook_allow: list[str] = field(default_factory=list)
    webhook_secret: bytes | None = None
    job_timeout_s: float = 3600.0  # the OpenAI endpoints answer when the job ends, or give up
    webhook_subscribers: list[Subscriber] = field(default_factory=list)  # every job's events go to these
    webhook_lease_s: float = 30.0  # a dead gateway's deliveries are resumed by another after this
    webhook_catchup_s: float = 3600.0  # subscribers get jobs submitted this long before the gateway started


class Bus:
    """One NATS connection, opened lazily, so the gateway starts (and answers 503) without a bus."""

    def __init__(self, config: GatewayConfig, on_connect=()):
        self.config = config
        self.nc: NATS | None = None
        self.on_connect = list(on_connect)  # awaited with each new connection
        self._lock = asyncio.Lock()

    async def js(self):
        async with self._lock:
            if self.nc is None or self.nc.is_closed:
                try:
                    nc = await asyncio.wait_for(connect(self.config.nats_url, "captionbus-gateway"), 5)
                    await asyncio.wait_for(require_provisioned(nc.jetstream()), BUS_TIMEOUT_S)
                    for hook in self.on_connect:
                        await hook(nc)
                except Exception as e:  # noqa: BLE001  BusError, timeouts, auth: all mean "no bus right now"
                    raise ApiError(503, f"bus unavailable: {e}", "service_unavailable") from None
                self.nc = nc
        if not self.nc.is_connected:
            raise ApiError(503, f"bus unavailable: reconnecting to NATS at {self.config.nats_url}",
                           "service_unavailable")
        return self.nc.jetstream()

    def store(self, js) -> ArtifactStore:
        return ArtifactStore(self.config.settings, js)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)


@contextlib.asynccontextmanager
async def on_bus():
    """Bus calls that hang (a server gone mid-call) become 503, not a stuck request."""
    try:
        async with asyncio.timeout(BUS_TIMEOUT_S):
            yield
    except TimeoutError:
        raise ApiError(503, f"bus unavailable: no answer within {BUS_TIMEOUT_S:.0f} s", "service_unavailable") from None


class Timing:
    """Where a request's time went, as a `Server-Timing` header (form;dur=…, submit;dur=…, job;dur=…,
    answer;dur=… in ms): the benchmark reads it to split gateway overhead from the job itself."""

    def __init__(self):
        self.last = time.perf_counter()
        self.phases: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases.append((name, (now - self.last) * 1000))
        self.last = now

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.1f}" for name, ms in self.phases)


class Limiter:
    """Requests in flight per key; one over the limit is refused (429), never queued."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: dict[str, int] = {}

    @contextlib.contextmanager
    def slot(self, who: str):
        if self.in_flight.get(who, 0) >= self.limit:
            raise ApiError(429, f"key {who!r} has {self.limit} requests in flight (its limit); retry later",
                           "rate_limit_exceeded")
        self.in_flight[who] = self.in_flight.get(who, 0) + 1
        try:
            yield
        finally:
            self.in_flight[who] -= 1


@dataclass
class Upload:
    path: Path
    filename: str
    size: int


@dataclass
class Form:
    fields: dict[str, list[str]]
    upload: Upload | None

    def one(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else default

    def cleanup(self) -> None:
        if self.upload is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.upload.path)


MAX_FIELD_BYTES = 1024 * 1024  # options and glossaries inline; files go in the file part


async def read_form(request: Request, config: GatewayConfig, upload_dir: Path) -> Form:
    """Stream a multipart body: fields into memory (bounded), the `file` part onto disk."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ApiError(400, "send multipart/form-data (a `file` part and form fields)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > config.max_upload_bytes + MAX_FIELD_BYTES:
        raise ApiError(413, f"upload of {int(declared)} bytes is over this gateway's limit of "
                            f"{config.max_upload_bytes} bytes")
    _, params = parse_options_header(content_type)
    upload_dir.mkdir(parents=True, exist_ok=True)
    fields: dict[str, list[str]] = {}
    files = []

    def on_field(f) -> None:
        name = (f.field_name or b"").decode(errors="replace")
        value = f.value.decode(errors="replace") if f.value is not None else ""
        if kind == "application/x-www-form-urlencoded":  # the parser splits, it does not decode
            name, value = unquote_plus(name), unquote_plus(value)
        fields.setdefault(name, []).append(value)

    def on_file(f) -> None:
        files.append(f)

    parser = FormParser(
        kind, on_field, on_file, boundary=params.get(b"boundary"),
        config={"UPLOAD_DIR": str(upload_dir), "MAX_MEMORY_FILE_SIZE": 0, "UPLOAD_DELETE_TMP": False,
                "MAX_BODY_SIZE": config.max_upload_bytes + MAX_FIELD_BYTES},
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > config.max_upload_bytes + MAX_FIELD_BYTES:
                raise ApiError(413, f"upload is over this gateway's limit of {config.max_upload_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except ApiError:
        _remove_parts(files, parser)
        raise
    except Exception as e:  # noqa: BLE001  the parser raises several types for a malformed body
        _remove_parts(files, parser)
        raise ApiError(400, f"malformed multipart body: {e}") from None
    upload = None
    for f in files:
        f.close()
        path = Path(f.actual_file_name.decode() if isinstance(f.actual_file_name, bytes) else f.actual_file_name)
        if (f.field_name or b"") == b"file" and upload is None:
            if f.size > config.max_upload_bytes:
                os.unlink(path)
                raise ApiError(413, f"upload is over this gateway's limit of {config.max_upload_bytes} bytes")
            name = (f.file_name or b"upload").decode(errors="replace")
            upload = Upload(path=path, filename=os.path.basename(name) or "upload", size=f.size)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return Form(fields, upload)


def _remove_parts(files, parser) -> None:
    with contextlib.suppress(Exception):
        parser.finalize()
    for f in files:
        with contextlib.suppress(Exception):
            f.close()
            if f.actual_file_name:
                os.unlink(f.actual_file_name)


def parse_options(raw: str | None) -> dict:
    """`options` is the JSON form of `-o` flags: {"asr": {"model": "base"}, "vad": "pyannote"}."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"options is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(400, 'options must be a JSON object such as {"asr": {"model": "base"}}')
    return value


def split_languages(raw: str | None) -> list[str]:
    return [code.strip() for code in (raw or "").split(",") if code.strip()]


def job_view(state: JobState) -> dict:
    job_id = state.job_id
    return {
        "id": job_id,
        "object": "job",
        "workflow": state.spec.workflow,
        "status": state.status.value,
        "input": state.spec.input.name,
        "source_language": state.spec.source_language,
        "target_languages": state.spec.target_languages,
        "options": state.spec.options,
        "created_at": state.created_at.isoformat(),
        "updated_at": state.updated_at.isoformat(),
        "error": state.error,
        "failed_branches": state.failed_branches,
        "nodes": {
            node_id: {"stage": n.stage, "status": n.status.value, "attempt": n.attempt,
                      "progress": n.progress, "error": n.error, "env": n.worker.get("env")}
            for node_id, n in state.nodes.items()
        },
        "outputs": {
            name: {"name": ref.name, "size": ref.size, "media_type": ref.media_type,
                   "url": f"/v1/jobs/{job_id}/outputs/{name}"}
            for name, ref in state.outputs.items()
        },
    }


def create_app(config: GatewayConfig) -> FastAPI:
    ends = JobEnds()
    webhook_client = httpx.AsyncClient(timeout=10.0, follow_redirects=False)
    dispatcher = None
    if config.webhook_allow and config.webhook_secret is not None:
        dispatcher = Dispatcher(DispatchConfig(secret=config.webhook_secret, allow=config.webhook_allow,
                                               subscribers=config.webhook_subscribers,
                                               lease_s=config.webhook_lease_s, catchup_s=config.webhook_catchup_s),
                                webhook_client, job_events)
    hooks = [ends.attach] + ([lambda nc: dispatcher.start(nc.jetstream())] if dispatcher else [])
    bus = Bus(config, hooks)
    limiter = Limiter(config.concurrency_per_key)
    upload_dir = Path(config.settings.home) / "gateway" / "uploads"

    async def connect_soon() -> None:
        """Connect at start (not on the first request), so a restarted gateway resumes webhook
        deliveries and follows new jobs for subscribers even if no request comes."""
        while True:
            try:
                await bus.js()
                return
            except ApiError as e:
                log.warning("gateway not on the bus yet; retrying in 2 s", reason=e.message)
                await asyncio.sleep(2)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        connecting = asyncio.create_task(connect_soon())
        try:
            yield
        finally:
            connecting.cancel()
            if dispatcher is not None:
                await dispatcher.stop()
            await webhook_client.aclose()
            await bus.close()

    app = FastAPI(title="captionbus gateway", version="1", lifespan=lifespan,
                  description="Job API, OpenAI-compatible audio endpoints and webhooks over the captionbus bus.")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, e.kind)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid')}", "invalid_request_error")

    def principal(request: Request) -> str:
        if config.keys is None:
            return "anonymous"
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        who = config.keys.who(key.strip()) if scheme.lower() == "bearer" else None
        if who is None:
            raise ApiError(401, "missing or unknown API key: send `Authorization: Bearer <key>` "
                                "(make one with `captionbus gateway add-key NAME --keys FILE`)",
                           "authentication_error")
        return who

    async def state_of(js, job_id: str) -> JobState:
        try:
            validate_token(job_id, "job id")
        except ValueError:
            raise ApiError(404, f"no job {job_id!r}", "not_found_error") from None
        async with on_bus():
            state = await client.job_state(js, job_id)
        if state is None:
            raise ApiError(404, f"no job {job_id!r}", "not_found_error")
        return state

    def input_file(form: Form) -> tuple[Path, str, bool]:
        """(file, name, owned): the upload, or a file under --inputs named by `path`."""
        if form.upload is not None:
            return form.upload.path, form.upload.filename, True
        named = form.one("path") or form.one("url")
        if not named:
            raise ApiError(400, "no input: send a `file` part, or `path` of a file under the gateway's inputs dir")
        if named.startswith("file://"):
            named = named[len("file://"):]
        elif "://" in named:
            raise ApiError(400, f"{named!r}: this gateway reads no URLs, only files under its inputs dir")
        if config.inputs_dir is None:
            raise ApiError(400, "this gateway takes uploads only (start it with --inputs DIR to allow `path`)")
        root = config.inputs_dir.resolve()
        path = (root / named).resolve()
        if not path.is_relative_to(root):
            raise ApiError(400, f"{named!r} is outside the gateway's inputs dir")
        if not path.is_file():
            raise ApiError(404, f"{named!r}: no such file in the gateway's inputs dir", "not_found_error")
        return path, path.name, False

    async def submit(js, form: Form, *, workflow: str, source: str | None, targets: list[str],
                     options: dict, job_id: str | None = None) -> str:
        try:
            validate_job(workflow, source, targets, local_stack=False, options=options)
        except (SubmitError, ValueError) as e:
            raise ApiError(422, str(e)) from None
        path, name, owned = input_file(form)
        async with on_bus():
            spec = await client.submit(js, bus.store(js), path, workflow=workflow, source_language=source,
                                       target_languages=targets, options=options, name=name, copy=not owned,
                                       job_id=job_id)
        return spec.job_id

    # ---- job API ------------------------------------------------------------------------

    @app.post("/v1/jobs", status_code=201, openapi_extra={"requestBody": {"content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"},
            "path": {"type": "string", "description": "a file under the gateway's --inputs dir"},
            "workflow": {"type": "string", "default": "transcribe"},
            "source_language": {"type": "string"},
            "target_languages": {"type": "string", "description": "comma-separated"},
            "options": {"type": "string", "description": "JSON: the -o options, e.g. {\"asr\": {\"model\": \"base\"}}"},
            "callback_url": {"type": "string", "description": "POST signed job events here (allow-listed)"},
        }}}}}})
    async def create_job(request: Request):
        """Create a job from an upload (or a file under --inputs); validated as `captionbus submit` does."""
        who = principal(request)
        with limiter.slot(who):
            js = await bus.js()
            form = await read_form(request, config, upload_dir)
            try:
                callback = form.one("callback_url")
                if callback:
                    if not config.webhook_allow or config.webhook_secret is None:
                        raise ApiError(422, "this gateway sends no webhooks (start it with --webhook-allow and "
                                            "CAPTIONBUS_WEBHOOK_SECRET)")
                    try:
                        check_target(callback, config.webhook_allow)
                    except ValueError as e:
                        raise ApiError(422, str(e)) from None
                source = form.one("source_language") or None
                job_id = await submit(js, form, workflow=form.one("workflow") or "transcribe", source=source,
                                      targets=split_languages(form.one("target_languages")),
                                      options=parse_options(form.one("options")))
            finally:
                form.cleanup()
        log.info("job submitted", job_id=job_id, key=who)
        if callback:
            try:
                async with on_bus():
                    await dispatcher.add(js, job_id, CALLBACK, callback)
            except RuntimeError as e:  # no cb_webhooks bucket: the job runs, its callback cannot
                raise ApiError(503, f"job {job_id} submitted, but its webhooks cannot be recorded: {e}",
                               "service_unavailable") from None
        return {"id": job_id, "object": "job", "status": "pending", "url": f"/v1/jobs/{job_id}"}

    @app.get("/v1/jobs")
    async def list_jobs(request: Request, status: str | None = None, workflow: str | None = None,
                        limit: int = 100):
        """Jobs, newest first; filter by status and workflow."""
        principal(request)
        js = await bus.js()
        async with on_bus():
            states = await client.list_jobs(js)
        picked = [s for s in reversed(states)
                  if (status is None or s.status.value == status) and (workflow is None or s.spec.workflow == workflow)]
        return {"object": "list", "data": [job_view(s) for s in picked[:max(limit, 0)]]}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(request: Request, job_id: str):
        """State, per-stage progress and outputs (with download URLs)."""
        principal(request)
        return job_view(await state_of(await bus.js(), job_id))

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202)
    async def cancel_job(request: Request, job_id: str):
        principal(request)
        js = await bus.js()
        state = await state_of(js, job_id)
        if state.status.value in ("completed", "failed", "cancelled"):
            raise ApiError(409, f"job {job_id} is already {state.status.value}", "conflict_error")
        async with on_bus():
            await client.cancel(js, job_id)
        return {"id": job_id, "object": "job", "requested": "cancel"}

    @app.post("/v1/jobs/{job_id}/retry", status_code=202)
    async def retry_job(request: Request, job_id: str):
        principal(request)
        js = await bus.js()
        state = await state_of(js, job_id)
        if state.status.value not in ("failed", "cancelled"):
            raise ApiError(409, f"job {job_id} is {state.status.value}; only failed or cancelled jobs are retried",
                           "conflict_error")
        async with on_bus():
            await client.retry(js, job_id)
        return {"id": job_id, "object": "job", "requested": "retry"}

    @app.get("/v1/jobs/{job_id}/outputs/{name}")
    async def download(request: Request, job_id: str, name: str):
        """One output's bytes, streamed."""
        principal(request)
        js = await bus.js()
        state = await state_of(js, job_id)
        ref = state.outputs.get(name)
        if ref is None:
            have = ", ".join(state.outputs) or f"none yet (job is {state.status.value})"
            raise ApiError(404, f"job {job_id} has no output {name!r} (outputs: {have})", "not_found_error")
        path = await bus.store(js).get(ref)
        stem = Path(state.spec.input.name).stem or "job"
        return FileResponse(path, media_type=ref.media_type or "application/octet-stream",
                            filename=output_filename(stem, name, ref))

    @app.get("/v1/jobs/{job_id}/events")
    async def events(request: Request, job_id: str):
        """Server-Sent Events: the job's history, then live until it ends. Each event's `id` is
        its stream sequence: reconnect with `Last-Event-ID` to resume after it."""
        principal(request)
        js = await bus.js()
        await state_of(js, job_id)  # 404 for a job that does not exist
        raw = request.headers.get("last-event-id", "")
        after = int(raw) if raw.isdigit() else 0

        async def stream():
            async for seq, event in job_events(js, job_id, after):
                yield {"id": str(seq), "event": event.kind, "data": event.model_dump_json()}

        return EventSourceResponse(stream(), ping=15)

    async def webhook_records(job_id: str):
        js = await bus.js()
        await state_of(js, job_id)
        if dispatcher is None:
            return []
        try:
            async with on_bus():
                return await dispatcher.records(js, job_id)
        except RuntimeError as e:
            raise ApiError(503, str(e), "service_unavailable") from None

    @app.get("/v1/jobs/{job_id}/webhooks")
    async def job_webhooks(request: Request, job_id: str):
        """The job's webhook subscribers (its callback_url, the gateway-wide ones) and every delivery
        (delivered or failed, attempts), from the bus: any gateway answers for any job."""
        principal(request)
        return {"object": "list", "data": [r.view() for r in await webhook_records(job_id)]}

    @app.get("/v1/jobs/{job_id}/deliveries")
    async def job_deliveries(request: Request, job_id: str):
        """Every webhook delivery of the job, in one list (each names its subscriber)."""
        principal(request)
        return {"object": "list", "data": [{"subscriber": r.subscriber, **d}
                                           for r in await webhook_records(job_id) for d in r.deliveries]}

    # ---- OpenAI-compatible --------------------------------------------------------------

    async def openai_audio(request: Request, task: str):
        who = principal(request)
        timing = Timing()
        with limiter.slot(who):
            js = await bus.js()
            form = await read_form(request, config, upload_dir)
            timing.mark("form")
            try:
                if form.upload is None:
                    raise ApiError(400, "file is required (multipart part `file`)")
                response_format = form.one("response_format") or "json"
                if response_format not in RESPONSE_FORMATS:
                    raise ApiError(400, f"response_format {response_format!r} unknown; use {', '.join(RESPONSE_FORMATS)}")
                granularities = set(form.fields.get("timestamp_granularities[]", []) +
                                    form.fields.get("timestamp_granularities", []))
                if granularities - {"word", "segment"}:
                    raise ApiError(400, "timestamp_granularities[] takes word and/or segment")
                try:
                    temperature = float(form.one("temperature") or 0.0)
                except ValueError:
                    raise ApiError(400, "temperature must be a number") from None
                language = form.one("language") or None
                if language:
                    try:
                        language = check_language(language)
                    except ValueError as e:
                        raise ApiError(400, str(e)) from None
                options: dict = {}
                model = form.one("model") or "whisper-1"
                if model != "whisper-1":  # an alias for whatever model the asr workers serve
                    options["asr"] = {"model": model}
                if task == "translate":  # Whisper's own speech -> English decoding (OpenAI's semantics)
                    options.setdefault("asr", {})["task"] = "translate"
                job_id = new_job_id()
                with ends.expect(job_id) as ended:
                    await submit(js, form, workflow="speech", source=language, targets=[], options=options,
                                 job_id=job_id)
                    form.cleanup()
                    timing.mark("submit")
                    final = await wait_for_end(js, job_id, ended)
            finally:
                form.cleanup()
            timing.mark("job")
            if final.kind != "completed":
                reason = getattr(final, "reason", None) or final.kind
                raise ApiError(422, f"job {job_id} {final.kind}: {reason}")
            store = bus.store(js)
            if response_format in ("srt", "vtt"):
                text = Path(await store.get(final.outputs[response_format])).read_text(encoding="utf-8")
                response = PlainTextResponse(text, media_type="text/plain")
            else:
                if "transcript" not in final.outputs:
                    raise ApiError(422, f"job {job_id} completed without a transcript")
                transcript = Transcript.model_validate_json(Path(await store.get(final.outputs["transcript"])).read_bytes())
                if response_format == "text":
                    response = PlainTextResponse(transcript.text + "\n")
                elif response_format == "verbose_json":
                    response = JSONResponse(as_verbose_json(transcript, task=task, granularities=granularities,
                                                            temperature=temperature))
                else:
                    response = JSONResponse(as_json(transcript))
            timing.mark("answer")
            response.headers["Server-Timing"] = timing.header()
            response.headers["X-Captionbus-Job"] = job_id
            return response

    audio_form = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary"}, "model": {"type": "string", "default": "whisper-1"},
            "language": {"type": "string"}, "prompt": {"type": "string", "description": "accepted, not used"},
            "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS)},
            "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": ["word", "segment"]}},
            "temperature": {"type": "number", "description": "accepted, echoed in verbose_json"},
        }}}}}}

    @app.post("/v1/audio/transcriptions", openapi_extra=audio_form)
    async def transcriptions(request: Request):
        """OpenAI's transcription endpoint: runs the `speech` workflow and answers when it ends."""
        return await openai_audio(request, "transcribe")

    @app.post("/v1/audio/translations", openapi_extra=audio_form)
    async def translations(request: Request):
        """OpenAI's translation endpoint: speech in any language -> English text, by Whisper itself
        (the `speech` workflow with `asr.task=translate`); `language`, optional, names the spoken one."""
        return await openai_audio(request, "translate")

    async def wait_for_end(js, job_id: str, ended: asyncio.Future):
        async def is_terminal() -> bool:
            async with on_bus():
                state = await client.job_state(js, job_id)
            return state is not None and state.status.value in TERMINAL_KINDS

        async def replay():
            async for _, event in job_events(js, job_id, 0):
                if event.kind in TERMINAL_KINDS:
                    return event
            raise ApiError(503, f"lost the event stream of job {job_id}", "service_unavailable")

        try:
            async with asyncio.timeout(config.job_timeout_s):
                return await ends.wait(ended, is_terminal, replay)
        except TimeoutError:
            raise ApiError(504, f"job {job_id} did not end within {config.job_timeout_s:.0f} s; "
                                f"it goes on: GET /v1/jobs/{job_id}", "timeout") from None

    models_cache: dict = {"at": 0.0, "ids": []}

    @app.get("/v1/models")
    async def models(request: Request):
        """The ASR models live workers serve (`$SRV.STATS` of asr services: the model once loaded), and the
        alias whisper-1."""
        principal(request)
        js = await bus.js()
        loop = asyncio.get_running_loop()
        if loop.time() - models_cache["at"] > 5.0:
            replies = await client.workers(bus.nc, timeout=0.5)
            ids = sorted({str(r.get("metadata", {}).get("model")) for r in replies
                          if r.get("metadata", {}).get("stage") == "asr" and r.get("metadata", {}).get("model")})
            models_cache.update(at=loop.time(), ids=ids)
        del js
        ids = models_cache["ids"]
        data = ([{"id": "whisper-1", "object": "model", "created": 0, "owned_by": "captionbus"}] if ids else []) + [
            {"id": model, "object": "model", "created": 0, "owned_by": "captionbus"} for model in ids]
        return {"object": "list", "data": data}

    @app.get("/healthz")
    async def health():
        js = await bus.js()
        del js
        return {"status": "ok"}

    return app
