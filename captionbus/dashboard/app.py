"""The dashboard's web application: pages, JSON, Server-Sent Events, /metrics, health.

Starlette (ASGI) served by uvicorn; the page is one static HTML file using Alpine.js, vendored
in static/ (fleets run offline: no CDN, no build step). Every page holds one EventSource on
/api/stream; the board pushes job, event, worker and queue updates into it.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import shutil
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from captionbus.dashboard.auth import OPEN_PATHS
from captionbus.dashboard.board import Board, job_detail, matches, parse_time
from captionbus.dashboard.downloads import Downloads
from contracts import subjects
from core.artifacts import ArtifactError, ArtifactMissing, safe_name

STATIC = resources.files("captionbus.dashboard") / "static"
PAGE_SIZE = 50
SSE_KEEPALIVE_S = 15.0


class TokenAuth:
    """HTTP Basic (any user name, the token as password: browsers prompt for it and send it on
    EventSource too) or `Authorization: Bearer <token>` (Prometheus, curl)."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app, self.token = app, token

    def _allowed(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return secrets.compare_digest(value.strip().encode(), self.token.encode())
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return secrets.compare_digest(password.encode(), self.token.encode())
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            headers = dict(scope["headers"])
            if not self._allowed(headers.get(b"authorization", b"").decode("latin-1")):
                response = PlainTextResponse("authentication required", status_code=401,
                                             headers={"WWW-Authenticate": 'Basic realm="captionbus"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(board: Board, metrics: Any, token: str | None = None, downloads: Downloads | None = None) -> Starlette:
    downloads = downloads or Downloads()

    async def index(request: Request) -> Response:
        return FileResponse(str(STATIC / "index.html"))

    async def jobs(request: Request) -> Response:
        q = request.query_params
        filters: dict[str, Any] = {k: q.get(k, "").strip() for k in ("status", "workflow", "language", "text")}
        try:
            filters.update(since=parse_time(q.get("since", "")), until=parse_time(q.get("until", "")))
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        rows = [s for s in board.summaries.values() if matches(s, **filters)]
        rows.sort(key=lambda s: s["created_ts"], reverse=True)
        try:
            page = max(int(q.get("page", "1")), 1)
        except ValueError:
            page = 1
        start = (page - 1) * PAGE_SIZE
        return JSONResponse({"total": len(rows), "page": page, "page_size": PAGE_SIZE,
                             "jobs": rows[start:start + PAGE_SIZE],
                             "workflows": sorted({s["workflow"] for s in board.summaries.values()})})

    async def job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        try:
            subjects.job_events(job_id)  # a job id is one subject token, nothing else
        except ValueError:
            return JSONResponse({"error": "not a job id"}, status_code=400)
        state = board.jobs.get(job_id)
        if state is None:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)
        detail = job_detail(state, await board.job_events(job_id), downloads=downloads.enabled)
        detail["downloads_note"] = downloads.reason
        return JSONResponse(detail)

    async def output(request: Request) -> Response:
        job_id, name = request.path_params["job_id"], request.path_params["name"]
        try:
            subjects.job_events(job_id)
        except ValueError:
            return JSONResponse({"error": "not a job id"}, status_code=400)
        state = board.jobs.get(job_id)
        ref = state.outputs.get(name) if state is not None else None
        if ref is None:  # only outputs the job's state names: never a key taken from the URL
            return JSONResponse({"error": f"job {job_id} has no output {name!r}"}, status_code=404)
        if not downloads.enabled:
            return JSONResponse({"error": downloads.reason}, status_code=403)
        try:
            path, tmp = await downloads.open(ref)
        except ArtifactMissing as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        except ArtifactError as e:
            return JSONResponse({"error": str(e)}, status_code=502)
        cleanup = BackgroundTask(shutil.rmtree, tmp, ignore_errors=True) if tmp is not None else None
        return FileResponse(path, filename=safe_name(ref.name), media_type="application/octet-stream",
                            headers={"X-Content-Type-Options": "nosniff"}, background=cleanup)

    async def workers(request: Request) -> Response:
        return JSONResponse(board.worker_rows())

    async def queues(request: Request) -> Response:
        return JSONResponse(board.queue_rows())

    async def stream(request: Request) -> Response:
        queue = board.fanout.subscribe()

        async def messages():
            try:
                yield "retry: 1000\n\n"
                while True:
                    try:
                        kind, data = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield f"event: {kind}\ndata: {data}\n\n"
            finally:
                board.fanout.unsubscribe(queue)

        return StreamingResponse(messages(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        if board.ready:
            return PlainTextResponse("ready")
        return PlainTextResponse(board.not_ready_reason(), status_code=503)

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)

    routes = [
        Route("/", index), Route("/favicon.ico", favicon), Route("/api/jobs", jobs), Route("/api/jobs/{job_id}", job),
        Route("/api/jobs/{job_id}/outputs/{name}", output), Route("/api/workers", workers), Route("/api/queues", queues), Route("/api/stream", stream),
        Route("/metrics", prometheus), Route("/healthz", healthz), Route("/readyz", readyz),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(TokenAuth, token=token)])
