"""A job's webhook records and deliveries, read from the bus (any gateway answers for any job).

A key that is not admin sees its job's own `callback_url` record only. The gateway-wide
subscribers (the operator's config file) get every job's events, so they had a record on every
job, and any key read their URLs and delivery errors from its own job: a subscriber URL is often
the credential itself (a Slack or Teams incoming-webhook URL carries its secret in the path), and
its errors tell an outsider what the operator's receivers are and whether they are up."""
from __future__ import annotations

from fastapi import APIRouter

from captionbus.gateway.deps import CallerDep, GatewayDep, JetStream, OwnedJob
from captionbus.gateway.dispatch import CALLBACK
from captionbus.gateway.schemas import DeliveryList, WebhookList, WebhookRecord
from captionbus.gateway.state import on_bus
from captionbus.web.errors import ApiError, documented

router = APIRouter(prefix="/v1/jobs", tags=["webhooks"], responses=documented(401, 404, 422, 503))


async def records(gw, js, job_id: str, caller):
    """The job's records `caller` may see: all for an admin key, else its callback's only."""
    if gw.dispatcher is None:
        return []
    try:
        async with on_bus():
            found = await gw.dispatcher.records(js, job_id)
    except RuntimeError as e:
        raise ApiError(503, str(e)) from None
    return [r for r in found if caller.admin or r.subscriber == CALLBACK]


@router.get("/{job_id}/webhooks", response_model=WebhookList)
async def job_webhooks(state: OwnedJob, gw: GatewayDep, js: JetStream, caller: CallerDep):
    """The job's webhook subscribers (its callback_url; for an admin key the gateway-wide ones
    too) and every delivery (delivered or failed, attempts), from the bus: any gateway answers
    for any job."""
    return WebhookList(data=[WebhookRecord(**r.view()) for r in await records(gw, js, state.job_id, caller)])


@router.get("/{job_id}/deliveries", response_model=DeliveryList)
async def job_deliveries(state: OwnedJob, gw: GatewayDep, js: JetStream, caller: CallerDep):
    """Every webhook delivery of the job the caller may see (as /webhooks), in one list (each
    names its subscriber)."""
    return DeliveryList(data=[{"subscriber": r.subscriber, **d}
                              for r in await records(gw, js, state.job_id, caller) for d in r.deliveries])
