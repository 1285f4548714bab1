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

from starlette.types import ASGIApp, Receive, Scope, Send

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
