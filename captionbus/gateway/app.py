"""The gateway's ASGI app: a job API, OpenAI-compatible audio endpoints and webhooks over the bus.

Stateless: a job is created by publishing `submitted` (as `captionbus submit` does) and read back
from the coordinator's KV record and the events stream, so any gateway answers for any job and
the gateway can restart without losing one. Only webhook deliveries in flight live in a gateway's
memory (see `webhooks.py`).

FastAPI in its own idiom: one `APIRouter` per domain (`routes/`: jobs, openai, webhooks, health, docs),
dependencies for the caller, the bus, the per-key limit and the streamed form (`deps.py`),
pydantic response models (`schemas.py`), and the bearer scheme in the OpenAPI document. What the
routes share is one `Gateway` (`state.py`); every refusal is `{"error": ...}` (captionbus/web/errors.py).

Uploads are parsed as they arrive (`forms.py`) into a file next to the artifact root and
hardlinked into it: a 1 GB upload never sits in memory and is written once. Downloads are
`FileResponse`s (64 KiB chunks).
"""
from __future__ import annotations

import contextlib

from fastapi import FastAPI

from captionbus.gateway.ends import job_events
from captionbus.gateway.metrics import MetricsMiddleware
from captionbus.gateway.routes import docs, health, jobs, openai, webhooks
from captionbus.gateway.state import GatewayConfig, Gateway
from captionbus.web import errors
from captionbus.web.auth import LoopbackOnly

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
                  docs_url=None, redoc_url=None, openapi_url=None,  # routes/docs.py serves them, as config.docs says
                  description="Job API, OpenAI-compatible audio endpoints and webhooks over the captionbus bus. "
                              "Authorize with an API key (`captionbus gateway add-key NAME --keys FILE`); "
                              "a key sees its own jobs only, an admin key every job.")
    app.state.gateway = gateway
    errors.install(app)
    for module in (jobs, webhooks, openai, health):
        app.include_router(module.router)
    docs.install(app, config.docs or ("open" if config.keys is None else "key"))
    app.add_middleware(MetricsMiddleware, metrics=gateway.metrics)
    if config.keys is None:  # no keys: loopback's one trusted user, never a web page's (web.auth.LoopbackOnly)
        app.add_middleware(LoopbackOnly, what="this gateway")
    return app
