"""Token auth for web doors: read the secret a request presents, compare it in constant time.

`Authorization: Bearer <secret>` (API clients, Prometheus, curl) everywhere; HTTP Basic with the
secret as password (any user name) where a browser must prompt for it (it then sends it on
EventSource requests too, which cannot set headers). Checking *which* secret it is (one token,
a ring of hashed API keys) is the caller's.
"""
from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from captionbus.core.bus import is_loopback
from captionbus.web.errors import error_response


def presented_secret(header: str | None, basic: bool = False) -> str | None:
    """The secret in an Authorization header value, or None."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if basic and scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    return None


def same_secret(given: str | None, expected: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


class TokenAuth:
    """ASGI middleware: every HTTP request but `open_paths` must present a secret `check` accepts
    (Bearer or Basic); others get 401 in the one error shape, with a Basic challenge so a browser prompts."""

    def __init__(self, app: ASGIApp, check: Callable[[str | None], bool] | None, open_paths: tuple[str, ...] = (),
                 realm: str = "captionbus", message: str = "authentication required"):
        self.app, self.check, self.open_paths, self.realm, self.message = app, check, open_paths, realm, message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.check is not None and scope["type"] == "http" and scope["path"] not in self.open_paths:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self.check(presented_secret(header, basic=True)):
                response = error_response(401, self.message, headers={"WWW-Authenticate": f'Basic realm="{self.realm}"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def not_ready_for_outsiders(what: str) -> str:
    """What an open probe (/readyz) says to a caller without credentials, in place of the reason:
    the reason names host paths (`CAPTIONBUS_NATS_CA=/etc/...: no such file`), the bus's address
    and the NATS user, none of which an unauthenticated caller off loopback may learn."""
    return f"{what} is not on the bus yet; its log, or /readyz with credentials, says why"


class LoopbackOnly:
    """ASGI middleware for a door that runs without credentials (allowed on loopback only): every
    request must name this host by a loopback name, and a browser request made by another site is
    refused (403 in the one error shape).

    Why: "loopback only" was a property of the bind, and a browser is a loopback client. Any web
    page the user opened could POST a cross-site form to http://127.0.0.1:8080/v1/jobs (multipart
    is a "simple" request: no CORS preflight) or to /v1/jobs/ID/cancel, acting as the keyless
    gateway's one user, an admin; and a page whose name is rebound to 127.0.0.1 (DNS rebinding)
    is same-origin with the door and reads every job too. Both carry the attacker's name: the
    rebound one in `Host`, the cross-site one in `Origin` (browsers send it on every cross-origin
    request and on every POST). A reverse proxy that forwards a public name to a keyless door is
    refused the same way: off loopback, nothing answers without auth."""

    def __init__(self, app: ASGIApp, what: str = "this door"):
        self.app, self.what = app, what

    def refusal(self, scope: Scope) -> str | None:
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"origin")}
        host = headers.get("host", "")
        try:
            named = urlsplit(f"//{host}").hostname if host else None
        except ValueError:
            named = "?"
        if host and (named is None or not is_loopback(named)):
            return (f"{self.what} runs without credentials and answers only to a loopback name, not Host "
                    f"{host[:80]!r}: give it credentials to serve other names")
        origin = headers.get("origin")
        if origin is not None and origin.partition("://")[2] != host:
            return f"a request from another site ({origin[:80]}) is refused: {self.what} runs without credentials"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            reason = self.refusal(scope)
            if reason is not None:
                await error_response(403, reason)(scope, receive, send)
                return
        await self.app(scope, receive, send)


FRAME_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'")]


class NoFraming:
    """ASGI middleware: no other page may show this app in a frame (X-Frame-Options for old
    browsers, CSP frame-ancestors for the rest), on every answer.

    Why: a browser that signed in to an acting dashboard keeps the operator's Basic credentials
    and sends them to a frame of it inside any site's page; the framed page is the dashboard's own
    origin, so its cancel and retry buttons pass every check an action has (the action header, the
    Origin), and a page laid over it can make the operator click them (clickjacking). Measured in
    Chromium with the operator's credentials: a page on another port showed the dashboard's job
    page, signed in, in its frame (tests/security/test_dashboard_door.py); now the frame is empty."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def framed(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *FRAME_HEADERS]
            await send(message)

        await self.app(scope, receive, framed)
