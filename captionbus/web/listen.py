"""Where a web door may listen: HOST:PORT, and the rule that off loopback it needs credentials."""
from __future__ import annotations

from captionbus.core.bus import is_loopback

__all__ = ["ListenError", "check_bind", "is_loopback", "parse_listen"]


class ListenError(ValueError):
    """A listen address or bind refused before anything starts; the message says what to do."""


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:8080` for IPv6; `:8080` means `default_host`) as (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ListenError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or default_host, int(port)


def check_bind(host: str, has_credentials: bool, what: str, how: str) -> None:
    """Refuse to serve `what` on a non-loopback `host` without credentials; `how` says how to add them."""
    if not has_credentials and not is_loopback(host):
        raise ListenError(f"refusing to serve {what} on {host} without auth: {how}, or listen on 127.0.0.1")
