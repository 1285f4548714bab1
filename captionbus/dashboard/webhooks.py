"""The gateway view: webhook deliveries and failures as the gateways recorded them in the KV bucket
`cb_webhooks` (captionbus/gateway/dispatch.py, one record per (job, subscriber)).

Followed like the job states (an ordered consumer on the bucket, replayed at start), with the
read rights every dashboard role has on that bucket (deploy/nats/roles.conf). Kept outside the
dashboard's readiness: a fleet whose dashboard user predates those rights still gets its Jobs,
Workers and Queues; this view then answers 503 with the bus's reason, never an empty list.

A record's URL may carry a receiver's secret (a token in the query, user:password in the
authority, or the path itself: a Slack, Discord or Teams incoming-webhook URL is
`/services/T…/B…/<secret>`, `/api/webhooks/<id>/<token>`, and anyone holding it may post there):
the page shows scheme, host and the path's first segment only, enough to tell receivers apart.
"""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import structlog
from pydantic import ValidationError

from captionbus.gateway.dispatch import Record
from captionbus.contracts import subjects

log = structlog.get_logger("captionbus.dashboard")

RETRY_S = 5.0


def shown_url(url: str) -> str:
    """scheme://host[:port]/first-segment: no user info, no deeper path, no query, no fragment
    (each hidden part shown as …)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    first, slash, rest = parts.path.lstrip("/").partition("/")
    path = ("/" + first if parts.path.startswith("/") else first) + ("/…" if rest else slash)
    hidden = "?…" if parts.query else ""
    return f"{parts.scheme}://{host}{path}{hidden}"


def record_row(record: Record) -> dict[str, Any]:
    delivered = [d for d in record.deliveries if d.get("status") == "delivered"]
    failed = [d for d in record.deliveries if d.get("status") == "failed"]
    last = record.deliveries[-1] if record.deliveries else None
    last_failure = failed[-1] if failed else None
    return {
        "job_id": record.job_id, "subscriber": record.subscriber, "url": shown_url(record.url),
        "events": record.events, "cursor": record.cursor, "done": record.done, "owner": record.owner,
        "delivered": len(delivered), "failed": len(failed),
        "pending": len(record.deliveries) - len(delivered) - len(failed),
        "attempts": sum(int(d.get("attempts") or 0) for d in record.deliveries),
        "older_not_kept": record.dropped,
        "last": {k: last.get(k) for k in ("kind", "sequence", "status", "attempts", "http_status")} if last else None,
        "last_failure": {k: last_failure.get(k) for k in ("kind", "sequence", "http_status", "error")}
        if last_failure else None,
    }


class WebhookView:
    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.loaded = False
        self.error: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        return sorted(self.records.values(), key=lambda r: (r["job_id"], r["subscriber"]), reverse=True)

    def totals(self) -> dict[str, int]:
        rows = self.records.values()
        return {"records": len(self.records), "delivered": sum(r["delivered"] for r in rows),
                "failed": sum(r["failed"] for r in rows), "open": sum(1 for r in rows if not r["done"])}

    async def follow(self, js) -> None:
        while True:
            try:
                await self._watch(js)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001  the bucket missing, the user lacking rights, the bus away
                reason = f"cannot read the webhook records (KV {subjects.WEBHOOKS_BUCKET}): {type(e).__name__}: {e}"
                if reason != self.error:
                    log.warning("webhook records unreadable; retrying", reason=reason)
                self.error, self.loaded = reason, False
            await asyncio.sleep(RETRY_S)

    async def _watch(self, js) -> None:
        kv = await js.key_value(subjects.WEBHOOKS_BUCKET)
        watcher = await kv.watchall()
        records: dict[str, dict[str, Any]] = {}
        async for entry in watcher:
            if entry is None:  # the end of the stored records
                self.records, self.loaded, self.error = records, True, None
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                records.pop(entry.key, None)
                continue
            try:
                records[entry.key] = record_row(Record.model_validate_json(entry.value))
            except ValidationError:
                continue  # a newer gateway's shape: not ours to interpret
