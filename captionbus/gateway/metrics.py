"""The gateway's own `/metrics` (Prometheus text): requests by route and status, their latency,
webhook deliveries and failures. Per app instance (its own registry), so two gateways in one
test process do not share counters. The dashboard's `/metrics` is about the bus (jobs, stages,
workers); this is about the HTTP door."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# An OpenAI request lasts as long as its job (seconds to an hour); the job API answers in ms.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("captionbus_gateway_requests", "HTTP requests answered, by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("captionbus_gateway_request_seconds",
                                 "Time from a request's arrival to the end of its answer (an SSE stream: its life)",
                                 ["method", "route"], buckets=BUCKETS, registry=self.registry)
        self.webhook_deliveries = Counter("captionbus_gateway_webhook_deliveries",
                                          "Webhook events settled by this gateway, by outcome (delivered, failed)",
                                          ["outcome"], registry=self.registry)
        self.in_flight = Gauge("captionbus_gateway_requests_in_flight",
                               "Requests holding a key's slot (--concurrency) now, all keys together",
                               registry=self.registry)
        self.webhook_attempts_failed = Counter("captionbus_gateway_webhook_failed_attempts",
                                               "Webhook POSTs that got no 2xx (each retry counts)", registry=self.registry)

    def delivery(self, delivery) -> None:
        """Called by the dispatcher with each settled captionbus.gateway.webhooks.Delivery."""
        self.webhook_deliveries.labels(delivery.status).inc()
        self.webhook_attempts_failed.inc(delivery.attempts - (1 if delivery.status == "delivered" else 0))


class MetricsMiddleware:
    """Counts every HTTP request under its route template (`/v1/jobs/{job_id}`, never the id:
    bounded label values); a path no route matched is `unmatched`."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
