"""Who may open the dashboard, and where it may listen: loopback needs nothing; any other address
needs a token (CAPTIONBUS_DASHBOARD_TOKEN, or CAPTIONBUS_DASHBOARD_TOKEN_FILE holding it).
Who may act (cancel, retry): only a browser presenting the operator token
(CAPTIONBUS_DASHBOARD_OPERATOR_TOKEN[_FILE]); see Access.
Light on purpose: `up` checks a bind with it before starting the dashboard process. The listen
syntax and the loopback rule are the web toolkit's (captionbus/web/listen.py), shared with the gateway."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from captionbus.web import listen
from captionbus.web.listen import parse_listen
from captionbus.core.settings import Settings, load

__all__ = ["DEFAULT_LISTEN", "OPEN_PATHS", "Access", "AuthError", "check_bind", "operator_token_from_env",
           "parse_listen", "token_from_env"]

OPEN_PATHS = ("/healthz", "/readyz")  # probes learn nothing but "up" and "ready"

DEFAULT_LISTEN = "127.0.0.1:8765"
TOKEN_ENV, TOKEN_FILE_ENV = "CAPTIONBUS_DASHBOARD_TOKEN", "CAPTIONBUS_DASHBOARD_TOKEN_FILE"
OPERATOR_ENV, OPERATOR_FILE_ENV = "CAPTIONBUS_DASHBOARD_OPERATOR_TOKEN", "CAPTIONBUS_DASHBOARD_OPERATOR_TOKEN_FILE"

AuthError = listen.ListenError  # the dashboard refuses to start: the message says what to set


def token_from_env(settings: Settings | None = None) -> str | None:
    """The dashboard's token: CAPTIONBUS_DASHBOARD_TOKEN_FILE's contents, else
    CAPTIONBUS_DASHBOARD_TOKEN, else None (both are captionbus.core.settings fields)."""
    settings = settings or load()
    return _token(settings.dashboard_token_file, settings.dashboard_token, TOKEN_FILE_ENV)


def operator_token_from_env(settings: Settings | None = None) -> str | None:
    """The operator's token: CAPTIONBUS_DASHBOARD_OPERATOR_TOKEN_FILE's contents, else
    CAPTIONBUS_DASHBOARD_OPERATOR_TOKEN, else None (the dashboard is read-only)."""
    settings = settings or load()
    return _token(settings.dashboard_operator_token_file, settings.dashboard_operator_token, OPERATOR_FILE_ENV)


def _token(path: Path | None, value: str | None, file_env: str) -> str | None:
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise AuthError(f"{file_env}={path}: {e.strerror}") from None
        if not token:
            raise AuthError(f"{file_env}={path} is empty")
        return token
    return value


def same_secret(given: str | None, expected: str) -> bool:  # as captionbus.web.auth's, without starlette
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


READ_ONLY = ("this dashboard is read-only: it acts (cancel, retry) only when started with "
             f"{OPERATOR_ENV} and the dashboard_operator NATS user")


@dataclass(frozen=True)
class Access:
    """Two browser credentials. `token` lets a browser view; `operator` lets it view and act.

    With an operator token set, every page needs one of the two, on loopback too: a dashboard that
    can cancel jobs asks who is there. Without it nothing can act, whatever a request presents
    (the action routes answer 403): the read-only configuration, and the default.
    The operator token alone acts on the page; the bus side is the dashboard's NATS user, which must
    be one allowed to publish the cancel and retry events (DASHBOARD_OPERATOR in deploy/nats/roles.conf):
    the read-only `dashboard` user is refused by the server whatever the page does."""

    token: str | None = None
    operator: str | None = None

    def __post_init__(self) -> None:
        if self.token and self.operator and same_secret(self.token, self.operator):
            raise AuthError(f"{OPERATOR_ENV} must differ from {TOKEN_ENV}: a viewer's token would act")

    @property
    def acting(self) -> bool:
        return bool(self.operator)

    @property
    def required(self) -> bool:
        return bool(self.token or self.operator)

    def admits(self, secret: str | None) -> bool:
        return any(expected and same_secret(secret, expected) for expected in (self.token, self.operator))

    def may_act(self, secret: str | None) -> bool:
        return bool(self.operator) and same_secret(secret, self.operator)

    def why_not(self, secret: str | None) -> str | None:
        """None when `secret` may act; else the reason, for a 403 and the page."""
        if not self.operator:
            return READ_ONLY
        if not self.may_act(secret):
            return "your token may view this dashboard, not act on it: sign in with the operator token"
        return None


def check_bind(host: str, token: str | None) -> None:
    listen.check_bind(host, bool(token), "the dashboard",
                      f"set {TOKEN_ENV} or {TOKEN_FILE_ENV}")
