"""Server-Sent Events for every web door, through sse-starlette: it frames events, sends pings
(comments) while nothing happens, ends the generator when the client goes, and lets uvicorn's
graceful shutdown close open streams (an open page must not hold a stop up)."""
from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse, ServerSentEvent

PING_S = 15  # proxies drop a silent connection after 30-60 s


def event_stream(events: AsyncIterator[dict | ServerSentEvent], *, ping_s: float = PING_S,
                 retry_ms: int | None = None) -> EventSourceResponse:
    """`events` yields dicts (`id`, `event`, `data`) or ServerSentEvents; `retry_ms` tells the
    browser how soon to reconnect after a drop."""

    async def framed():
        if retry_ms is not None:
            yield ServerSentEvent(retry=retry_ms, comment="connected")
        async for event in events:
            yield event

    return EventSourceResponse(framed(), ping=ping_s, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
