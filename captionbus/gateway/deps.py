"""The gateway's FastAPI dependencies: who is calling (the bearer key, declared in OpenAPI so
/docs' "Try it out" sends it), the bus, the caller's concurrency slot, the streamed form, and a
job the caller may see. Routes take them as `Annotated[...]` parameters; none calls auth by hand.

Every one is `async def`: none blocks (the keys are in memory, a key's sha256 and its comparison
with each stored hash are microseconds), and FastAPI runs a plain `def` dependency in its thread
pool: one hop per plain dependency per request (4 on a job's route: gateway, bearer_key, principal,
jetstream), each queued behind whatever holds the pool's 40 threads (file downloads and uploads,
a burst). tests/integration/test_gateway_thread_pool.py answers requests with the pool taken."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nats.js import JetStreamContext

from captionbus.gateway.forms import Form, read_form
from captionbus.gateway.keys import Caller
from captionbus.gateway.state import Gateway
from captionbus.web.errors import ApiError
from captionbus.contracts import JobState


async def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(gateway)]

bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="`captionbus gateway add-key NAME --keys FILE` prints a key; send it as Bearer.")


async def bearer_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str | None:
    return credentials.credentials if credentials else None


BearerKey = Annotated[str | None, Depends(bearer_key)]


async def principal(gw: GatewayDep, key: BearerKey) -> Caller:
    """The caller of every route but /metrics and the probes: 401 without a known key, 403 for a
    scraper's key (keys.METRICS), which reads /metrics only."""
    caller = gw.caller(key)
    if caller.metrics_only:
        raise ApiError(403, f"key {caller.name!r} is a metrics key: it reads /metrics only")
    return caller


CallerDep = Annotated[Caller, Depends(principal)]


async def metrics_reader(gw: GatewayDep, key: BearerKey) -> Caller:
    """An admin or metrics key (any caller of a keyless gateway): /metrics counts every key's
    requests and the gateway's deliveries, the operator's business, not a tenant's."""
    caller = gw.caller(key)
    if not (caller.admin or caller.metrics_only):
        raise ApiError(403, f"key {caller.name!r} may not read /metrics: it needs an admin key or a metrics key "
                            "(`captionbus gateway add-key NAME --metrics`)")
    return caller


MetricsReader = Annotated[Caller, Depends(metrics_reader)]


async def maybe_principal(gw: GatewayDep, key: BearerKey) -> Caller | None:
    """The caller, or None without a (known) key: for the routes open to anyone (/readyz)."""
    return gw.known(key)


MaybeCallerDep = Annotated[Caller | None, Depends(maybe_principal)]


async def jetstream(gw: GatewayDep) -> JetStreamContext:
    return gw.js()


JetStream = Annotated[JetStreamContext, Depends(jetstream)]


async def slot(gw: GatewayDep, caller: CallerDep):
    """The caller's request slot (429 past --concurrency), held until the answer is sent (an SSE
    stream's: until it ends or its client goes). `async def`, so FastAPI runs it on the event
    loop, never in its thread pool: state.Limiter has no lock and needs none. A route that takes
    a slot and a job (`OwnedJob`) names the slot first: FastAPI resolves dependencies in the
    order of the parameters, and a caller over its limit is refused before any bus read."""
    gw.limiter.acquire(caller.name)
    try:
        yield
    finally:
        gw.limiter.release(caller.name)


Slot = Annotated[None, Depends(slot)]


def form(references: bool):
    """A dependency: the streamed form (with known speakers' reference clips where `references`,
    forms.REFERENCES_TOTAL); its upload is removed once the request is answered."""

    async def streamed(request: Request, gw: GatewayDep, _slot: Slot, _js: JetStream):
        parsed: Form = await read_form(request, gw.config.max_upload_bytes, gw.upload_dir, references=references)
        try:
            yield parsed
        finally:
            parsed.cleanup()

    return streamed


FormDep = Annotated[Form, Depends(form(references=False))]
SpeakersFormDep = Annotated[Form, Depends(form(references=True))]  # routes that take known speakers


async def owned_job(job_id: str, gw: GatewayDep, caller: CallerDep, js: JetStream) -> JobState:
    return await gw.job(js, job_id, caller)


OwnedJob = Annotated[JobState, Depends(owned_job)]
