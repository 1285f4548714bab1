"""A job's webhook records and deliveries, read from the bus (any gateway answers for any job)."""
from __future__ import annotations

from fastapi import APIRouter

from captionbus.gateway.deps import GatewayDep, JetStream, OwnedJob
from captionbus.gateway.schemas import DeliveryList, WebhookList, WebhookRecord
from captionbus.gateway.state import on_bus
from captionbus.web.errors import ApiError, documented

router = APIRouter(prefix="/v1/jobs", tags=["webhooks"], responses=documented(401, 404, 422, 503))


async def records(gw, js, job_id: str):
    if gw.dispatcher is None:
        return []
    try:
        async with on_bus():
            return await gw.dispatcher.records(js, job_id)
    except RuntimeError as e:
        raise ApiError(503, str(e)) from None


@router.get("/{job_id}/webhooks", response_model=WebhookList)
async def job_webhooks(state: OwnedJob, gw: GatewayDep, js: JetStream):
    """The job's webhook subscribers (its callback_url, the gateway-wide ones) and every delivery
    (delivered or failed, attempts), from the bus: any gateway answers for any job."""
    return WebhookList(data=[WebhookRecord(**r.view()) for r in await records(gw, js, state.job_id)])


@router.get("/{job_id}/deliveries", response_model=DeliveryList)
async def job_deliveries(state: OwnedJob, gw: GatewayDep, js: JetStream):
    """Every webhook delivery of the job, in one list (each names its subscriber)."""
    return DeliveryList(data=[{"subscriber": r.subscriber, **d}
                              for r in await records(gw, js, state.job_id) for d in r.deliveries])
