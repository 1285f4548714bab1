"""Webhook delivery state in the bus (KV cb_webhooks): a gateway killed mid-job is restarted and
resumes the job's deliveries after the last one it settled, without sending any again; two
gateways with the same gateway-wide subscriber deliver each event once between them, and either
reports every delivery. Real nats-server, the real coordinator, gateway processes (the CLI), the
example receiver from examples/; no stage services, so jobs wait at demux until cancelled."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
import pytest

from captionbus.client import cancel
from captionbus.gateway.app import GatewayConfig
from captionbus.gateway.dispatch import Subscriber
from captionbus.core.bus import connect
from captionbus.core.settings import Settings
from tests.e2e.test_gateway_openai import load_receiver
from tests.gatewaytools import free_port, running_gateway, start_gateway_process
from tests.integration.test_gateway import coordinator, parse_sse  # noqa: F401  (a fixture)

SECRET = "state-test-secret"


class Receiver:
    """The example receiver; with `fail_first`, the first POST of each delivery id breaks the
    connection (the gateway retries), so attempts show in the records."""

    def __init__(self, fail_first: bool = False):
        self.got: list[tuple[dict, dict]] = []
        self.posts: list[str] = []  # every POST's delivery id, before the example's own dedupe
        self.tried: set[str] = set()
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def on_event(self, event: dict, headers: dict) -> None:
        delivery = headers["X-Captionbus-Delivery"]
        with self.lock:
            if self.fail_first and delivery not in self.tried:
                self.tried.add(delivery)
                raise ConnectionAbortedError("receiver hiccup (test)")
            self.got.append((event, headers))

    def kinds(self, job_id: str, path: str) -> list[str]:
        with self.lock:
            return [e["kind"] for e, h in self.got if e["job_id"] == job_id and h["X-Captionbus-Path"] == path]

    def deliveries(self, job_id: str) -> list[str]:
        with self.lock:
            return [h["X-Captionbus-Delivery"] for e, h in self.got if e["job_id"] == job_id]


@pytest.fixture
def receiver():
    rec = Receiver()
    module = load_receiver()
    server = module.make_server(("127.0.0.1", free_port()), SECRET.encode(), rec.on_event)
    # which path each POST went to (callback or subscriber), kept beside the headers
    handler = server.RequestHandlerClass
    original = handler.do_POST

    def do_post(self):
        self.headers["X-Captionbus-Path"] = self.path
        with rec.lock:
            rec.posts.append(self.headers.get("X-Captionbus-Delivery", ""))
        original(self)

    handler.do_POST = do_post
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", rec
    server.shutdown()


def wait_until(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def cancel_on_bus(url: str, job_id: str) -> None:
    async def go():
        nc = await connect(url, "test-cancel")
        await cancel(nc.jetstream(), job_id)
        await nc.close()

    asyncio.run(go())


def test_a_restarted_gateway_resumes_webhooks_without_sending_any_twice(coordinator, receiver, tmp_path):  # noqa: F811
    hooks, rec = receiver
    config = tmp_path / "gateway.toml"
    config.write_text(f'webhook_lease_s = 2\n[[subscribers]]\nname = "audit"\nurl = "{hooks}audit/"\n'
                      'events = ["submitted", "started", "cancelled"]\n')
    env = {**os.environ, "NATS_URL": coordinator, "CAPTIONBUS_HOME": str(tmp_path / "gw"),
           "CAPTIONBUS_ARTIFACTS": "object", "CAPTIONBUS_WEBHOOK_SECRET": SECRET,
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = ["--webhook-allow", hooks, "--config", str(config)]
    first, base = start_gateway_process(args, env, tmp_path / "first.log")
    try:
        created = httpx.post(f"{base}/v1/jobs", files={"file": ("talk.wav", b"RIFF upload")},
                             data={"workflow": "speech", "callback_url": f"{hooks}cb/"}, timeout=30)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        # Delivered so far: the job's events up to demux's request (it waits there), and the
        # subscriber's two; the records in the bus say so (settled: cursor at the last one).
        wait_until(lambda: "stage_requested" in rec.kinds(job_id, "/cb/"), "the callback's stage_requested")
        wait_until(lambda: rec.kinds(job_id, "/audit/") == ["submitted", "started"], "the subscriber's events")

        def settled():
            records = httpx.get(f"{base}/v1/jobs/{job_id}/webhooks", timeout=10).json()["data"]
            sent = {r["subscriber"]: [d for d in r["deliveries"] if d["status"] == "delivered"] for r in records}
            return (len(sent.get("callback", [])) == len(rec.kinds(job_id, "/cb/"))
                    and len(sent.get("audit", [])) == 2 and records)

        records = wait_until(settled, "the deliveries recorded in KV")
        assert [r["subscriber"] for r in records] == ["audit", "callback"]
        assert all(not r["done"] for r in records)
    finally:
        first.send_signal(signal.SIGKILL)  # no clean shutdown: its leases must expire
        first.wait(10)
    before = list(rec.deliveries(job_id))

    cancel_on_bus(coordinator, job_id)  # the job ends while no gateway runs
    second, base = start_gateway_process(args, env, tmp_path / "second.log")
    try:
        wait_until(lambda: "cancelled" in rec.kinds(job_id, "/cb/") and "cancelled" in rec.kinds(job_id, "/audit/"),
                   "the restarted gateway to deliver the rest")
        with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", timeout=30) as response:
            events = parse_sse(response.iter_lines())
        # Every event exactly once, in order; nothing sent before the restart was sent again.
        assert rec.kinds(job_id, "/cb/") == [e["event"] for e in events]
        assert rec.kinds(job_id, "/audit/") == ["submitted", "started", "cancelled"]
        delivered = rec.deliveries(job_id)
        assert delivered[:len(before)] == before
        assert len(rec.posts) == len(set(rec.posts)) == len(delivered)  # not one POST twice
        assert all(d.startswith((f"{job_id}.callback.", f"{job_id}.audit.")) for d in delivered)
        records = wait_until(lambda: [r for r in httpx.get(f"{base}/v1/jobs/{job_id}/webhooks", timeout=10)
                                      .json()["data"] if r["done"]] or None, "the records to be done")
        records = httpx.get(f"{base}/v1/jobs/{job_id}/webhooks", timeout=10).json()["data"]
        assert [r["done"] for r in records] == [True, True]
        assert [d["status"] for r in records for d in r["deliveries"]] == ["delivered"] * len(delivered)
    finally:
        second.terminate()
        second.wait(20)


def test_two_gateways_deliver_each_subscriber_event_once_and_both_report_it(coordinator, receiver, tmp_path):  # noqa: F811
    hooks, rec = receiver
    rec.fail_first = True  # every delivery needs a second attempt: attempts are recorded

    def config(who: str) -> GatewayConfig:
        return GatewayConfig(
            settings=Settings(home=tmp_path / who, nats_url=coordinator, artifacts_mode="object", host_id=who),
            nats_url=coordinator, webhook_allow=[hooks], webhook_secret=SECRET.encode(), webhook_lease_s=2,
            webhook_subscribers=[Subscriber(name="audit", url=f"{hooks}audit/")],
        )

    with running_gateway(config("one")) as one, running_gateway(config("two")) as two:
        created = httpx.post(f"{one}/v1/jobs", files={"file": ("talk.wav", b"RIFF upload")},
                             data={"workflow": "speech"}, timeout=30)
        job_id = created.json()["id"]
        wait_until(lambda: "stage_requested" in rec.kinds(job_id, "/audit/"), "the subscriber's stage_requested")
        cancel_on_bus(coordinator, job_id)
        wait_until(lambda: "cancelled" in rec.kinds(job_id, "/audit/"), "the subscriber's cancelled", timeout=90)
        with httpx.stream("GET", f"{two}/v1/jobs/{job_id}/events", timeout=30) as response:
            kinds = [e["event"] for e in parse_sse(response.iter_lines())]
        assert rec.kinds(job_id, "/audit/") == kinds  # once each, in order, from one gateway or the other
        views = [wait_until(lambda base=base: [r for r in httpx.get(f"{base}/v1/jobs/{job_id}/webhooks", timeout=10)
                                               .json()["data"] if r["done"]], "done") for base in (one, two)]
        assert views[0] == views[1] and len(views[0]) == 1
        deliveries = views[0][0]["deliveries"]
        assert [d["kind"] for d in deliveries] == kinds
        assert all(d["status"] == "delivered" and d["attempts"] == 2 for d in deliveries)
        # two POSTs per delivery id (the refused one and the retry), not four: one gateway sent each
        assert sorted(rec.posts) == sorted([d["delivery_id"] for d in deliveries] * 2)
        flat = httpx.get(f"{two}/v1/jobs/{job_id}/deliveries", timeout=10).json()["data"]
        assert [(d["subscriber"], d["sequence"]) for d in flat] == [("audit", d["sequence"]) for d in deliveries]
        # Each gateway's /metrics counts what it delivered; together: every delivery once, one failed attempt each.
        delivered = failed_attempts = 0.0
        for base in (one, two):
            for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
                for sample in family.samples:
                    if sample.name == "captionbus_gateway_webhook_deliveries_total":
                        assert sample.labels == {"outcome": "delivered"}
                        delivered += sample.value
                    elif sample.name == "captionbus_gateway_webhook_failed_attempts_total":
                        failed_attempts += sample.value
        assert delivered == failed_attempts == len(deliveries)
