"""Who may open the dashboard, and where it may listen: loopback needs nothing; any other address
needs a token (CAPTIONBUS_DASHBOARD_TOKEN, or CAPTIONBUS_DASHBOARD_TOKEN_FILE holding it).
Light on purpose: `up` checks a bind with it before starting the dashboard process. The listen
syntax and the loopback rule are the web toolkit's (captionbus/web/listen.py), shared with the gateway."""
from __future__ import annotations

from captionbus.web import listen
from captionbus.web.listen import parse_listen
from captionbus.core.settings import Settings, load

__all__ = ["AuthError", "DEFAULT_LISTEN", "OPEN_PATHS", "check_bind", "parse_listen", "token_from_env"]

OPEN_PATHS = ("/healthz", "/readyz")  # probes learn nothing but "up" and "ready"

DEFAULT_LISTEN = "127.0.0.1:8765"
TOKEN_ENV, TOKEN_FILE_ENV = "CAPTIONBUS_DASHBOARD_TOKEN", "CAPTIONBUS_DASHBOARD_TOKEN_FILE"

AuthError = listen.ListenError  # the dashboard refuses to start: the message says what to set


def token_from_env(settings: Settings | None = None) -> str | None:
    """The dashboard's token: CAPTIONBUS_DASHBOARD_TOKEN_FILE's contents, else
    CAPTIONBUS_DASHBOARD_TOKEN, else None (both are captionbus.core.settings fields)."""
    settings = settings or load()
    if settings.dashboard_token_file is not None:
        path = settings.dashboard_token_file
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise AuthError(f"{TOKEN_FILE_ENV}={path}: {e.strerror}") from None
        if not token:
            raise AuthError(f"{TOKEN_FILE_ENV}={path} is empty")
        return token
    return settings.dashboard_token


def check_bind(host: str, token: str | None) -> None:
    listen.check_bind(host, bool(token), "the dashboard",
                      f"set {TOKEN_ENV} or {TOKEN_FILE_ENV}")
