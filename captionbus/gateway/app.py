"""The gateway's ASGI app: a job API, OpenAI-compatible audio endpoints and webhooks over the bus.

Stateless: a job is created by publishing `submitted` (as `captionbus submit` does) and read back
from the coordinator's KV record and the events stream, so any gateway answers for any job and
the gateway can restart without losing one. Only webhook deliveries in flight live in a gateway's
memory (see `webhooks.py`).

FastAPI in its own idiom: one `APIRouter` per domain (`routes/`: jobs, openai, webhooks, health),
dependencies for the caller, the bus, the per-key limit and the streamed form (`deps.py`),
pydantic response models (`schemas.py`), and the bearer scheme in the OpenAPI document. What the
routes share is one `Gateway` (`state.py`); every refusal is `{"error": ...}` (captionbus/web/errors.py).

Uploads are parsed as they arrive (`forms.py`) into a file next to the artifact root and
hardlinked into it: a 1 GB upload never sits in memory and is written once. Downloads are
`FileResponse`s (64 KiB chunks).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from captionbus.gateway.metrics import MetricsMiddleware
from captionbus.gateway.routes import health, jobs, openai, webhooks
from captionbus.gateway.state import GatewayConfig, Gateway
from captionbus.web import errors
from contracts import parse_event, subjects
from contracts.events import TERMINAL_KINDS

__all__ = ["GatewayConfig", "create_app", "job_events"]


def create_app(config: GatewayConfig) -> FastAPI:
    gateway = Gateway(config, job_events)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="captionbus gateway", version="1", lifespan=lifespan,
                  description="Job API, OpenAI-compatible audio endpoints and webhooks over the captionbus bus. "
                              "Authorize with an API key (`captionbus gateway add-key NAME --keys FILE`); "
                              "a key sees its own jobs only, an admin key every job.")
    app.state.gateway = gateway
    errors.install(app)
    for module in (jobs, webhooks, openai, health):
        app.include_router(module.router)
    app.add_middleware(MetricsMiddleware, metrics=gateway.metrics)
    return app


async def job_events(js, job_id: str, after: int, idle_end_s: float | None = None) -> AsyncIterator[tuple[int, object]]:
    """(stream sequence, event) of one job after sequence `after`, in order, until its terminal
    event; with `idle_end_s`, also stop when nothing comes for that long (a finished job whose
    terminal event is before `after`)."""
    config = (ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)
              if after else ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    sub = await js.subscribe(subjects.job_events(job_id), ordered_consumer=True, config=config)
    try:
        while True:
            try:
                msg = await (asyncio.wait_for(sub.next_msg(timeout=None), idle_end_s) if idle_end_s
                             else sub.next_msg(timeout=None))
            except TimeoutError:
                return
            try:
                event = parse_event(msg.data)
            except (ValueError, ValidationError):
                continue
            yield msg.metadata.sequence.stream, event
            if event.kind in TERMINAL_KINDS:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
