"""Webhook targets, signatures and retries (captionbus/gateway/webhooks.py); the e2e test
(tests/e2e/test_gateway.py) delivers to the real example receiver."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from captionbus.gateway import webhooks
from captionbus.core.retry import RetryPolicy


def test_webhook_targets_signatures_and_retries():
    """Allow-list by scheme, host, port and path prefix; HMAC verifies; a failing receiver is
    retried with the policy's backoff and the outcome recorded."""
    allowed = ["http://hooks.example:8000/cb/"]
    assert webhooks.check_target("http://hooks.example:8000/cb/job", allowed)
    for url in ("http://hooks.example:8001/cb/", "https://hooks.example:8000/cb/", "http://169.254.169.254/cb/",
                "http://hooks.example:8000/other", "http://u:p@hooks.example:8000/cb/", "file:///etc/passwd"):
        with pytest.raises(ValueError):
            webhooks.check_target(url, allowed)
    header = webhooks.sign(b"k", b"{}")
    assert webhooks.verify(b"k", b"{}", header) and not webhooks.verify(b"other", b"{}", header)
    assert not webhooks.verify(b"k", b"{ }", header)
    assert not webhooks.verify(b"k", b"{}", webhooks.sign(b"k", b"{}", timestamp=1))  # replayed

    answers = iter([500, 503, 204])
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(next(answers))

    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def go(policy):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            delivery = webhooks.Delivery(event_id="e1", kind="completed", sequence=7)
            await webhooks.deliver(http, "http://hooks.example:8000/cb/", b"k", "j1", 7, b'{"a":1}', delivery,
                                   policy=policy, sleep=fake_sleep)
            return delivery

    ok = asyncio.run(go(RetryPolicy(initial_s=1, multiplier=2, max_attempts=5)))
    assert (ok.status, ok.attempts, ok.http_status, slept) == ("delivered", 3, 204, [1, 2])
    assert all(webhooks.verify(b"k", r.content, r.headers[webhooks.SIGNATURE_HEADER]) for r in seen)
    assert seen[0].headers["X-Captionbus-Sequence"] == "7"
    answers = iter([500] * 10)
    failed = asyncio.run(go(RetryPolicy(initial_s=1, max_attempts=2)))
    assert (failed.status, failed.attempts, failed.error) == ("failed", 2, "HTTP 500")
