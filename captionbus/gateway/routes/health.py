"""Probes and the gateway's own metrics. `/healthz`: the process answers (liveness); `/readyz`:
it is on the bus (503 until then, and while NATS is away; the reason only to a caller with a key)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from captionbus.gateway.deps import GatewayDep, MaybeCallerDep, MetricsReader
from captionbus.gateway.schemas import Health
from captionbus.web.auth import not_ready_for_outsiders
from captionbus.web.errors import ApiError, documented

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz():
    return Health()


@router.get("/readyz", response_model=Health, responses=documented(503))
async def readyz(gw: GatewayDep, caller: MaybeCallerDep):
    """Open to probes: 200 once on the bus, else 503; the reason (`bus unavailable: <why>`) only
    to a caller with a key, or on a keyless (loopback) gateway."""
    if not gw.link.ready and caller is None:
        raise ApiError(503, not_ready_for_outsiders("the gateway"))
    gw.js()  # 503 "bus unavailable: <why>" until connected
    return Health()


@router.get("/metrics", response_class=Response,
            responses={**documented(401, 403), 200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(gw: GatewayDep, reader: MetricsReader):
    """Prometheus text: captionbus_gateway_requests_total{method,route,status},
    captionbus_gateway_request_seconds (histogram), captionbus_gateway_requests_in_flight,
    captionbus_gateway_webhook_deliveries_total{outcome}, captionbus_gateway_webhook_failed_attempts_total.
    Where keys are on, an admin key or a metrics key (`add-key NAME --metrics`) reads it; an
    ordinary key gets 403. No label names a key or a job: route templates, statuses, outcomes."""
    del reader
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

