"""Who may open the dashboard, and where it may listen: loopback needs nothing; any other address
needs a token (CAPTIONBUS_DASHBOARD_TOKEN, or CAPTIONBUS_DASHBOARD_TOKEN_FILE holding it).
Light on purpose: `up` checks a bind with it before starting the dashboard process."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

OPEN_PATHS = ("/healthz", "/readyz")  # probes learn nothing but "up" and "ready"

DEFAULT_LISTEN = "127.0.0.1:8765"
TOKEN_ENV, TOKEN_FILE_ENV = "CAPTIONBUS_DASHBOARD_TOKEN", "CAPTIONBUS_DASHBOARD_TOKEN_FILE"


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise AuthError(f"--listen {listen!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "127.0.0.1", int(port)


def token_from_env(environ: dict[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_FILE_ENV):
        path = Path(environ[TOKEN_FILE_ENV]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise AuthError(f"{TOKEN_FILE_ENV}={path}: {e.strerror}") from None
        if not token:
            raise AuthError(f"{TOKEN_FILE_ENV}={path} is empty")
        return token
    return environ.get(TOKEN_ENV) or None


class AuthError(ValueError):
    """The dashboard refuses to start: the message says what to set."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    if not token and not is_loopback(host):
        raise AuthError(f"refusing to serve the dashboard on {host} without auth: set "
                        "CAPTIONBUS_DASHBOARD_TOKEN or CAPTIONBUS_DASHBOARD_TOKEN_FILE, or listen on 127.0.0.1")
