"""Job events POSTed to a webhook URL, signed, in order, retried with backoff (one delivery; the
records of who gets what, and their state in the bus, are `dispatch.py`'s).

Targets are restricted to an allow-list of URL prefixes (`--webhook-allow`), compared after
parsing (scheme, host and port exactly, then the path prefix), and redirects are not followed:
otherwise any API key holder could make the gateway probe internal addresses.

The URL is parsed by the client that POSTs it (httpx), not by a second parser: urlsplit kept
`/team-a/../admin` as written and passed it under the prefix `/team-a`, while httpx removes the dot
segments and POSTed to `/admin` (and `/team-a%2f..%2fadmin`, `/team-a/%2e%2e/admin` pass both and
become `/admin` at a receiver that decodes before routing). So: the path is the one httpx sends,
an encoded dot, slash or backslash in it is refused, and the prefix is matched at a segment
boundary (`/team-a` covers `/team-a` and `/team-a/...`, not `/team-abc`).

Signature (the scheme Stripe and GitHub use): header `X-Captionbus-Signature: t=<unix>,v1=<hex>`
where hex = HMAC-SHA256(secret, f"{t}.{body}"); `verify()` is what a receiver calls.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass

import httpx
import structlog

from captionbus.core.retry import RetryPolicy

log = structlog.get_logger("captionbus.gateway.webhooks")

SIGNATURE_HEADER = "X-Captionbus-Signature"
DELIVERY_HEADER = "X-Captionbus-Delivery"  # <job_id>.<subscriber>.<sequence>: the same on a retry or redelivery
OWNER_HEADER = "X-Captionbus-Owner"  # the job's API key name (also the signed body's `owner`); absent: no key
# 1, 2, 4, 8, 16 s: a receiver that restarts within half a minute loses nothing.
DELIVERY_RETRY = RetryPolicy(initial_s=1.0, multiplier=2.0, max_s=16.0, max_attempts=6)


ENCODED_SEPARATORS = ("%2e", "%2f", "%5c")  # '.', '/', '\\' written so that only a decoding receiver sees them


def _parts(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) as httpx, which sends the POST, reads `url`."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise ValueError(f"callback URL {url[:200]!r} is not a URL httpx can send to: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"callback URL {url[:200]!r} is not http(s)://host/...")
    if parsed.userinfo:
        raise ValueError("callback URL must not carry credentials")
    path = parsed.raw_path.decode("ascii").partition("?")[0]
    if "\\" in path or any(code in path.lower() for code in ENCODED_SEPARATORS):
        raise ValueError(f"callback URL {url[:200]!r}: an encoded '.', '/' or '\\' in its path is refused")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.scheme, parsed.host.lower(), port, parsed.path or "/"


def under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or below it, at a segment boundary."""
    return path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")


def check_target(url: str, allowed: list[str]) -> str:
    """`url` if an allow-list entry covers it; else ValueError with the reason."""
    scheme, host, port, path = _parts(url)
    for prefix in allowed:
        a_scheme, a_host, a_port, a_path = _parts(prefix)
        if (scheme, host, port) == (a_scheme, a_host, a_port) and under(path, a_path):
            return url
    raise ValueError(f"callback URL {url[:200]!r} is not in the gateway's webhook allow-list (--webhook-allow)")


def sign(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, tolerance_s: float = 300) -> bool:
    """Whether `header` signs `body` with `secret`, made within `tolerance_s` (replays refused)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


@dataclass
class Delivery:
    event_id: str
    kind: str
    sequence: int
    status: str = "pending"  # delivered | failed
    attempts: int = 0
    http_status: int | None = None
    error: str | None = None


async def deliver(client: httpx.AsyncClient, url: str, secret: bytes, job_id: str, sequence: int,
                  body: bytes, delivery: Delivery, policy: RetryPolicy = DELIVERY_RETRY, sleep=None,
                  delivery_id: str | None = None, on_failed_attempt=None, job_owner: str | None = None) -> None:
    """POST one event until a 2xx or the policy is used up; the outcome goes into `delivery`.
    `delivery_id` (header X-Captionbus-Delivery) is the same on every attempt: receivers dedupe on
    it. `on_failed_attempt(delivery)` is awaited after each failed attempt that will be retried."""
    sleep = sleep or asyncio.sleep
    headers = {"Content-Type": "application/json", "X-Captionbus-Job": job_id, "X-Captionbus-Sequence": str(sequence)}
    if delivery_id:
        headers[DELIVERY_HEADER] = delivery_id
    if job_owner is not None:
        headers[OWNER_HEADER] = job_owner
    while True:
        delivery.attempts += 1
        try:
            response = await client.post(url, content=body, headers={**headers, SIGNATURE_HEADER: sign(secret, body)})
            delivery.http_status = response.status_code
            if 200 <= response.status_code < 300:
                delivery.status, delivery.error = "delivered", None
                return
            delivery.error = f"HTTP {response.status_code}"
        except httpx.HTTPError as e:
            delivery.error = f"{type(e).__name__}: {e}"
        if policy.exhausted(delivery.attempts):
            delivery.status = "failed"
            log.warning("webhook delivery failed", job_id=job_id, kind=delivery.kind, url=url,
                        attempts=delivery.attempts, error=delivery.error)
            return
        if on_failed_attempt is not None:
            await on_failed_attempt(delivery)
        await sleep(policy.delay(delivery.attempts))
