"""The gateway's dependencies run on the event loop (captionbus/gateway/deps.py: all `async def`),
so a request is authenticated and answered while every thread of the pool is taken: FastAPI runs
a plain `def` dependency in anyio's thread pool (40 threads), so with them plain a burst of
requests, or the threads file downloads and uploads hold, queued every request behind them.

The real app with its lifespan on a real nats-server, in the test's own event loop (the thread
pool's limit is per loop), through httpx's ASGI transport; the pool is cut to one thread and that
thread is held for the whole test."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import anyio.to_thread
import httpx

from captionbus.core.bus import connect, provision
from captionbus.core.settings import Settings
from captionbus.gateway.app import GatewayConfig, create_app
from captionbus.gateway.keys import KeyRing, add_key


def test_requests_are_authenticated_and_answered_while_the_thread_pool_is_taken(nats_server: str, tmp_path: Path):
    key = add_key(tmp_path / "keys", "alice")
    scraper = add_key(tmp_path / "keys", "scrape", metrics=True)
    config = GatewayConfig(settings=Settings(home=tmp_path / "gw", nats_url=nats_server, host_id="gw"),
                           nats_url=nats_server, keys=KeyRing.load(tmp_path / "keys"))

    async def go() -> None:
        nc = await connect(nats_server, "test-provision")
        await provision(nc.jetstream())
        await nc.close()
        app = create_app(config)
        release = threading.Event()
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as http:
                async with asyncio.timeout(20):  # the gateway connects to the bus in the background
                    while (await http.get("/readyz")).status_code != 200:
                        await asyncio.sleep(0.05)
                limiter = anyio.to_thread.current_default_thread_limiter()
                limiter.total_tokens = 1
                held = asyncio.create_task(anyio.to_thread.run_sync(release.wait))
                try:
                    while limiter.borrowed_tokens < 1:
                        await asyncio.sleep(0.01)
                    alice = {"Authorization": f"Bearer {key}"}
                    async with asyncio.timeout(10):  # a thread hop would wait for `held` for ever
                        answers = await asyncio.gather(
                            http.get("/v1/jobs/job-20260101-000000-unknown", headers=alice),
                            http.get("/v1/jobs", headers=alice),
                            http.get("/v1/jobs"),  # no key
                            http.get("/v1/jobs", headers={"Authorization": "Bearer cb-wrong"}),
                            http.get("/v1/jobs", headers={"Authorization": f"Bearer {scraper}"}),
                            http.get("/metrics", headers=alice),
                            http.get("/metrics", headers={"Authorization": f"Bearer {scraper}"}),
                            http.get("/readyz", headers=alice),
                            http.post("/v1/audio/transcriptions", headers=alice,  # the openai router's Timing
                                      files={"file": ("a.wav", b"RIFF")}, data={"response_format": "nope"}),
                        )
                    assert [a.status_code for a in answers] == [404, 200, 401, 401, 403, 403, 200, 200, 400], \
                        [(a.status_code, a.text[:200]) for a in answers]
                    assert answers[1].json()["data"] == []
                    assert limiter.borrowed_tokens == 1 and not held.done()  # the pool stayed taken throughout
                finally:
                    release.set()
                    await held

    asyncio.run(go())
