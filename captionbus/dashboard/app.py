"""The dashboard's web application: pages, JSON, Server-Sent Events, /metrics, health.

Starlette (ASGI) served by uvicorn; the page is one static HTML file using Alpine.js, vendored
in static/ (fleets run offline: no CDN, no build step). Every page holds one EventSource on
/api/stream; the board pushes job, event, worker and queue updates into it.

Two routes change something: POST /api/jobs/ID/cancel and /retry, for the operator token only
(auth.Access; 403 otherwise, and always in the read-only configuration). They also need the
header `X-Captionbus-Action` and, when the browser sends an Origin, this dashboard's own: a
browser that cached the operator's Basic credentials sends them with a form another site posts
here, but no other site can add a header without a CORS preflight, which this app never grants.
"""
from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from captionbus import client
from captionbus.dashboard.auth import OPEN_PATHS, Access
from captionbus.dashboard.board import Board, job_detail, matches, parse_time, speaker_lane, speaker_node
from captionbus.dashboard.downloads import Downloads
from captionbus.web import errors
from captionbus.web.auth import LoopbackOnly, NoFraming, TokenAuth, not_ready_for_outsiders, presented_secret
from captionbus.web.errors import error_response
from captionbus.web.sse import event_stream
from captionbus.contracts import JobState, subjects
from captionbus.core.artifacts import ArtifactError, ArtifactMissing, safe_name

log = structlog.get_logger("captionbus.dashboard")


def log_action(what: str, job_id: str, request: Request) -> None:
    client_host = request.client.host if request.client else None
    log.info("job action from the dashboard", action=what, job_id=job_id, client=client_host)


STATIC = resources.files("captionbus.dashboard") / "static"
PAGE_SIZE = 50
BOARD_CHECK_S = 0.5  # an open stream notices a board that came (or was replaced) this soon
ACTION_HEADER = "x-captionbus-action"  # dashboard.js sends it; a cross-site form cannot
ACT_TIMEOUT_S = 10.0  # a publish the server refuses gets no ack: say so instead of hanging


@dataclass
class Live:
    """What the app serves from, filled in once the bus is reached (serve.py): the board, and
    whether downloads are on. Until then pages answer 503 and /readyz says why."""

    board: Board | None = None
    downloads: Downloads = field(default_factory=Downloads)
    waiting: Any = None  # an object with not_ready_reason() (the BusLink) while board is None

    def reason(self) -> str:
        if self.board is not None:
            return self.board.not_ready_reason()
        return self.waiting.not_ready_reason() if self.waiting is not None else "connecting to the bus"


def create_app(live: Live | Board, metrics: Any, token: str | None = None, downloads: Downloads | None = None,
               operator: str | None = None) -> Starlette:
    """`live`: a Live holder (serve.py), or a started Board (tests). `token` lets a browser view,
    `operator` view and act (auth.Access); neither: loopback is open and nothing acts."""
    if not isinstance(live, Live):
        live = Live(board=live, downloads=downloads or Downloads())
    access = Access(token, operator)

    def secret_of(request: Request) -> str | None:
        return presented_secret(request.headers.get("authorization"), basic=True)

    def the_board() -> Board:
        if live.board is None:
            raise errors.ApiError(503, f"not on the bus yet: {live.reason()}")
        return live.board

    async def index(request: Request) -> Response:
        return FileResponse(str(STATIC / "index.html"))

    async def jobs(request: Request) -> Response:
        board = the_board()
        q = request.query_params
        filters: dict[str, Any] = {k: q.get(k, "").strip() for k in ("status", "workflow", "language", "text")}
        try:
            filters.update(since=parse_time(q.get("since", "")), until=parse_time(q.get("until", "")))
        except ValueError as e:
            return error_response(400, str(e))
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
        board, downloads = the_board(), live.downloads
        job_id = request.path_params["job_id"]
        try:
            subjects.job_events(job_id)  # a job id is one subject token, nothing else
        except ValueError:
            return error_response(400, "not a job id")
        state = board.jobs.get(job_id)
        if state is None:
            return error_response(404, f"no job {job_id}")
        detail = job_detail(state, await board.job_events(job_id), downloads=downloads.enabled)
        detail["downloads_note"] = downloads.reason
        return JSONResponse(detail)

    def job_of(request: Request) -> tuple[str, JobState | None] | Response:
        job_id = request.path_params["job_id"]
        try:
            subjects.job_events(job_id)  # a job id is one subject token, nothing else
        except ValueError:
            return error_response(400, "not a job id")
        return job_id, the_board().jobs.get(job_id)

    async def opened(ref, job_id: str) -> tuple[Path, Path | None] | Response:
        """(file, temporary folder or None) of an artifact the job's state names, or the error."""
        try:
            return await live.downloads.open(ref, job_id)
        except ArtifactMissing as e:
            return error_response(404, str(e))
        except ArtifactError as e:
            return error_response(502, str(e), "bad_gateway")

    async def output(request: Request) -> Response:
        downloads, found = live.downloads, job_of(request)
        if isinstance(found, Response):
            return found
        (job_id, state), name = found, request.path_params["name"]
        ref = state.outputs.get(name) if state is not None else None
        if ref is None:  # only outputs the job's state names: never a key taken from the URL
            return error_response(404, f"job {job_id} has no output {name!r}")
        if not downloads.enabled:
            return error_response(403, downloads.reason)
        got = await opened(ref, job_id)
        if isinstance(got, Response):
            return got
        path, tmp = got
        cleanup = BackgroundTask(shutil.rmtree, tmp, ignore_errors=True) if tmp is not None else None
        return FileResponse(path, filename=safe_name(ref.name), media_type="application/octet-stream",
                            headers={"X-Content-Type-Options": "nosniff"}, background=cleanup)

    async def speakers(request: Request) -> Response:
        """The job's speaker turns for its timeline, as the bus recorded them for the diarization
        node (its TurnSummary: the turns of its turns.json, the artifact transcript_join put on the
        words of transcript.json, the first 2000 and every speaker's seconds), read from the job
        state every role reads (under the key the node's record names, NodeState.speaker_turns_key,
        or on the record itself, from older coordinators): no artifact read, so a read-only
        dashboard has them."""
        found = job_of(request)
        if isinstance(found, Response):
            return found
        job_id, state = found
        node = speaker_node(state) if state is not None else None
        if node is None:
            return error_response(404, f"job {job_id} has no speaker turns (no completed diarization node)")
        try:  # on the record, or under the key it names (a failed read: 503, never an empty lane)
            summary = await client.speaker_turns(the_board().js, state, node)
        except client.RecordPartMissing as e:
            return error_response(404, str(e))
        if summary is None:
            return error_response(404, f"job {job_id}'s {node} completed without speaker turns on its record "
                                       "(a diarization worker older than this dashboard; retry the node to record them)")
        return JSONResponse(speaker_lane(node, summary))

    async def session(request: Request) -> Response:
        """What this browser may do: the page shows cancel and retry only where `actions`."""
        reason = access.why_not(secret_of(request))
        return JSONResponse({"actions": reason is None, "reason": reason})

    def acting_job(request: Request) -> tuple[Board, JobState]:
        """The job an action names, after every check an attacker's request must fail."""
        if ACTION_HEADER not in request.headers:
            raise errors.ApiError(403, f"an action needs the {ACTION_HEADER} header (the dashboard's page sends it)")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            raise errors.ApiError(403, f"an action from another site ({origin}) is refused")
        reason = access.why_not(secret_of(request))
        if reason is not None:
            raise errors.ApiError(403, reason)
        board, job_id = the_board(), request.path_params["job_id"]
        try:
            subjects.job_events(job_id)
        except ValueError:
            raise errors.ApiError(400, "not a job id") from None
        state = board.jobs.get(job_id)
        if state is None:
            raise errors.ApiError(404, f"no job {job_id}")
        return board, state

    async def act(request: Request, board: Board, state: JobState, what: str, send) -> Response:
        try:
            await asyncio.wait_for(send(board.js, state.job_id), ACT_TIMEOUT_S)
        except TimeoutError:
            return error_response(503, f"the bus took no {what} of {state.job_id} within {ACT_TIMEOUT_S:.0f} s: is the "
                                  "dashboard's NATS user one allowed to act (dashboard_operator)?")
        log_action(what, state.job_id, request)
        return JSONResponse({"id": state.job_id, "requested": what}, status_code=202)

    async def cancel(request: Request) -> Response:
        board, state = acting_job(request)
        if state.status.finished:
            return error_response(409, f"job {state.job_id} is already {state.status.value}")
        return await act(request, board, state, "cancel", client.cancel)

    async def retry(request: Request) -> Response:
        board, state = acting_job(request)
        if state.status.value not in ("failed", "cancelled"):
            return error_response(409, f"job {state.job_id} is {state.status.value}; "
                                  "only failed or cancelled jobs are retried")
        return await act(request, board, state, "retry", client.retry)

    async def chart_data(request: Request) -> Response:
        return JSONResponse(the_board().charts())

    async def webhooks(request: Request) -> Response:
        view = the_board().webhooks
        if not view.loaded:  # never an empty list for records that could not be read
            return error_response(503, view.error or "loading the webhook records")
        return JSONResponse({"totals": view.totals(), "records": view.rows()})

    async def workers(request: Request) -> Response:
        return JSONResponse(the_board().worker_rows())

    async def queues(request: Request) -> Response:
        return JSONResponse(the_board().queue_rows())

    async def stream(request: Request) -> Response:
        """Open even before the bus is reached: a browser's EventSource gives up for good on an
        HTTP error (it retries only dropped connections), so a page opened while the dashboard
        waits for the bus would never go live. The stream follows the board there is: the first
        once connected, a new one after a reconnect from scratch; each time it subscribes it
        sends `sync` first, and the page reads its lists again (what changed before it was
        subscribed: a job written in the second after the bus came was missed without it)."""

        async def messages():
            board, queue = None, None
            try:
                while True:
                    if live.board is not board:
                        if queue is not None:
                            board.fanout.unsubscribe(queue)
                        board = live.board
                        queue = board.fanout.subscribe() if board is not None else None
                        if queue is not None:  # subscribed: the page reads the lists again (dashboard.js)
                            yield {"event": "sync", "data": "{}"}
                    if queue is None:
                        await asyncio.sleep(BOARD_CHECK_S)
                        continue
                    try:
                        kind, data = await asyncio.wait_for(queue.get(), BOARD_CHECK_S)
                    except TimeoutError:
                        continue
                    yield {"event": kind, "data": data}
            finally:
                if queue is not None:
                    board.fanout.unsubscribe(queue)

        return event_stream(messages(), retry_ms=1000)  # pings every 15 s while nothing happens

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})  # as the gateway's

    async def readyz(request: Request) -> Response:  # open (a probe); the reason only to a signed-in caller
        if live.board is not None and live.board.ready:
            return JSONResponse({"status": "ok"})
        if access.required and not access.admits(secret_of(request)):
            return error_response(503, not_ready_for_outsiders("the dashboard"))
        return error_response(503, live.reason())

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)

    routes = [
        Route("/", index), Route("/favicon.ico", favicon), Route("/api/jobs", jobs), Route("/api/jobs/{job_id}", job),
        Route("/api/jobs/{job_id}/outputs/{name}", output), Route("/api/jobs/{job_id}/speakers", speakers), Route("/api/workers", workers), Route("/api/queues", queues), Route("/api/stream", stream),
        Route("/api/session", session), Route("/api/charts", chart_data), Route("/api/webhooks", webhooks),
        Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]), Route("/api/jobs/{job_id}/retry", retry, methods=["POST"]),
        Route("/metrics", prometheus), Route("/healthz", healthz), Route("/readyz", readyz),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    check = access.admits if access.required else None
    # no token (loopback only): a page of another site, or one rebound to 127.0.0.1, reads nothing
    guard = [] if access.required else [Middleware(LoopbackOnly, what="this dashboard")]
    app = Starlette(routes=routes, middleware=[Middleware(NoFraming), *guard, Middleware(
        TokenAuth, check=check, open_paths=OPEN_PATHS,
        message="authentication required: the dashboard token as Bearer, or as the Basic password")])
    errors.install(app)
    return app
