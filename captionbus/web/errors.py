"""One error shape for every web door: `{"error": {"message": ..., "type": ..., "code": status}}`.

It is OpenAI's (its client reads `error.message` into the exception it raises), so the gateway's
OpenAI-compatible endpoints and its job API answer alike, and the dashboard answers the same way.
`message` is one line a person can act on; a value the client sent is clipped before it is
echoed (a 5 MB form field once came back whole inside a 400).
"""
from __future__ import annotations

import nats.errors
import structlog
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from captionbus.core.bus import BusError

log = structlog.get_logger("captionbus.web")

MAX_MESSAGE = 400  # characters: enough for any real reason, never a client's whole upload


class ErrorDetail(BaseModel):
    message: str = Field(description="one line saying what was wrong and what to do")
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, conflict_error, "
                                  "rate_limit_exceeded, service_unavailable, timeout, ...")
    code: int = Field(description="the HTTP status again")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer's body."""

    error: ErrorDetail


KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable", 504: "timeout"}


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(text).split())  # one line
    return text if len(text) <= limit else text[:limit - 1] + "…"


class ApiError(Exception):
    """Raised anywhere in a request; answered in the one shape with `status`."""

    def __init__(self, status: int, message: str, kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, clip(message)
        self.kind = kind or KINDS.get(status, "api_error")
        self.headers = headers


def error_response(status: int, message: str, kind: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=clip(message), type=kind or KINDS.get(status, "api_error"), code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


BODY_READ = "captionbus.body_read"  # set in the ASGI scope by a reader that consumed the whole body


def body_read(request: Request) -> None:
    """Say that the request's body was read to its end (the connection can serve the next request)."""
    request.scope[BODY_READ] = True


def _closing(request: Request, headers: dict[str, str] | None) -> dict[str, str] | None:
    """`Connection: close` on a refusal of a request whose body was not read to its end (a 401,
    429 or 413 answered before the upload arrived): the server cannot reuse that connection,
    and a client that sends its next request on it before seeing it close gets a connection
    error. Told to close, it opens a fresh one. (The openai client's failures after a 0-byte
    upload, 3 in 6 in issue 19, came with that upload's 500; the client test passes 6 rounds
    with and without this header now: it is a guard, not a measured fix. Refusals after the body
    was read keep the connection: a reconnect cost ~0.8 ms CPU a request on loopback.)"""
    has_body = request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers
    if has_body and not request.scope.get(BODY_READ):
        return {**(headers or {}), "Connection": "close"}
    return headers


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.kind, _closing(request, e.headers))


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail), None, _closing(request, getattr(e, "headers", None)))


async def _validation_error(request: Request, e) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(422, f"{where}: {first.get('msg', 'invalid')}", headers=_closing(request, None))


async def _bus_error(request: Request, e: Exception) -> JSONResponse:
    """A read the bus refused or never answered (captionbus.client raises rather than answer
    "nothing"): the door is unavailable for now, not broken."""
    return error_response(503, f"bus unavailable: {e}", "service_unavailable", headers=_closing(request, None))


async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    log.exception("request failed", path=request.url.path, error=f"{type(e).__name__}: {e}")
    return error_response(500, f"internal error ({type(e).__name__}); the server's log has the details",
                          "api_error", headers=_closing(request, None))


def install(app) -> None:
    """Answer ApiError, Starlette's HTTP errors (404, 405), FastAPI's validation errors, bus
    failures (503) and any unexpected exception (500, logged) in the one shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(BusError, _bus_error)
    app.add_exception_handler(nats.errors.Error, _bus_error)
    app.add_exception_handler(Exception, _unexpected)
    try:
        from fastapi.exceptions import RequestValidationError
    except ImportError:  # a plain Starlette app has none
        return
    app.add_exception_handler(RequestValidationError, _validation_error)


# For FastAPI's `responses=`: the real error shape in the OpenAPI document (FastAPI's default
# 422 schema, {"detail": [...]}, is not what the API answers).
def documented(*statuses: int) -> dict[int, dict]:
    return {status: {"model": ErrorBody} for status in statuses}
