"""The dashboard's cancel and retry, charts, worker history and webhook view, against a real
nats-server with deploy/nats/roles.conf's users: a real coordinator and a real (noop) stage service
run jobs; two dashboards serve them over real HTTP (uvicorn): the default read-only one (the
`dashboard` user, no operator token) and an acting one (the `dashboard_operator` user with a view
token and an operator token). Every number the dashboard shows is compared with the events the bus
recorded, read as the client user. The browser test drives the pages in Debian's Chromium."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from nats.js.api import Header
from prometheus_client.parser import text_string_to_metric_families

from captionbus.client import job_events, submit
from captionbus.contracts import subjects
from captionbus.dashboard.auth import READ_ONLY, Access, AuthError
from captionbus.dashboard.serve import serve as serve_dashboard
from captionbus.dashboard.stats import percentile
from captionbus.gateway.app import GatewayConfig
from captionbus.gateway.dispatch import Record, Subscriber, record_key
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import Coordinator
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import StagePolicy, connect, provision
from captionbus.core.settings import Settings
from captionbus.services.noop.stage import STAGE as NOOP
from captionbus.services.runtime.serve import serve as serve_stage
from tests.gatewaytools import running_gateway
from tests.integration.test_dashboard import _until as until
from tests.integration.test_gateway_webhook_state import SECRET, receiver  # noqa: F401  (a fixture)
from tests.natsroles import free_ports, roles_server, violations
from tests.security.attacks import refused

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROBE = {"name": "probe", "nodes": {"first": {"stage": "noop", "inputs": {"media": "job.input"}, "outputs": ["media"],
                                              "params": {"sleep_s": 0.2}}},
         "outputs": {"media": "first.media"}}
# a vad node after it, and no vad worker runs: the job stays running
STUCK = {"name": "stuck", "nodes": {"first": {"stage": "noop", "inputs": {"media": "job.input"}, "outputs": ["media"]},
                                    "vad": {"inputs": {"audio": "first.media"}, "outputs": ["regions"]}},
         "outputs": {"regions": "vad.regions"}}
USERS = {"coordinator": "COORDINATOR", "worker": "WORKER", "client": "CLIENT", "gateway": "HTTP_GATEWAY",
         "dashboard": "DASHBOARD", "dashboard_operator": "DASHBOARD_OPERATOR"}
VIEW, OPERATOR = "view-token", "operator-token"
ACT = {"X-Captionbus-Action": "1"}
SECRET_URL = "https://ops:hunter2@hooks.example/captionbus?token=s3cr3t"


@dataclass
class Stack:
    urls: dict[str, str]
    log: Path
    js: object  # the client user's JetStream
    store: ArtifactStore
    media: Path
    readonly: str  # base URL of the read-only dashboard
    acting: str  # base URL of the acting dashboard
    misconfigured: str  # an operator token, but the read-only `dashboard` bus user


@contextlib.asynccontextmanager
async def running(tmp_path: Path):
    with roles_server(tmp_path, USERS) as (urls, log):
        coord_nc = await connect(urls["coordinator"], "t-coordinator")
        client_nc = await connect(urls["client"], "t-client")
        await provision(coord_nc.jetstream())
        settings = {r: Settings(home=tmp_path / r, nats_url=urls[r], artifacts_mode="object", host_id=r) for r in USERS}
        stop, ready = asyncio.Event(), asyncio.Event()
        ports = free_ports(3)
        readies = [asyncio.Event(), asyncio.Event(), asyncio.Event()]
        tasks = []
        async with Coordinator(coord_nc, graphs={g["name"]: Workflow.from_dict(g) for g in (PROBE, STUCK)}, tick_interval_s=0.2):
            tasks.append(asyncio.create_task(serve_stage(NOOP, settings["worker"], urls["worker"], env_name="act-test",
                                                         stop=stop, ready=ready, policy=StagePolicy(ack_wait=2.0))))
            tasks.append(asyncio.create_task(serve_dashboard(urls["dashboard"], f"127.0.0.1:{ports[0]}", None, readies[0])))
            tasks.append(asyncio.create_task(serve_dashboard(urls["dashboard_operator"], f"127.0.0.1:{ports[1]}", VIEW,
                                                             readies[1], operator=OPERATOR)))
            tasks.append(asyncio.create_task(serve_dashboard(urls["dashboard"], f"127.0.0.1:{ports[2]}", VIEW,
                                                             readies[2], operator=OPERATOR)))
            try:
                await asyncio.wait_for(asyncio.gather(ready.wait(), *(r.wait() for r in readies)), 30)
                media = tmp_path / "clip.wav"
                media.write_bytes(b"RIFF" + bytes(2000))
                yield Stack(urls, log, client_nc.jetstream(), ArtifactStore(settings["client"], client_nc.jetstream()),
                            media, *(f"http://127.0.0.1:{port}" for port in ports))
            finally:
                stop.set()
                for task in tasks[1:]:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(BaseException):
                        await asyncio.wait_for(task, 15)
        await coord_nc.close()
        await client_nc.close()


async def status_is(http: httpx.AsyncClient, job_id: str, *statuses: str) -> dict | None:
    response = await http.get(f"/api/jobs/{job_id}")
    job = response.json() if response.status_code == 200 else None
    return job if job and job["status"] in statuses else None


async def node_started(http: httpx.AsyncClient, job_id: str) -> bool:
    """The worker says it works on the job (its $SRV.STATS state)."""
    return any(c["job_id"] == job_id for w in (await http.get("/api/workers")).json() for c in w["current"])


async def recorded(js, job_id: str, running_s: float | None = None) -> list:
    """The job's events as the bus stored them (the client user's read, as `captionbus events`).
    A job that runs on is read for `running_s`."""
    events = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(running_s):
            async for _, event in job_events(js, job_id, settle_s=0.3):
                events.append(event)
    return events


async def write_webhook_record(url: str, job_id: str) -> None:
    """A delivery record as a gateway writes it (captionbus/gateway/dispatch.py), as the gateway user."""
    nc = await connect(url, "t-gateway")
    try:
        kv = await nc.jetstream().key_value("cb_webhooks")
        record = Record(job_id=job_id, subscriber="callback", url=SECRET_URL, cursor=7, done=True, deliveries=[
            {"delivery_id": f"{job_id}.callback.1", "event_id": "e1", "kind": "submitted", "sequence": 1,
             "status": "delivered", "attempts": 1, "http_status": 204, "error": None},
            {"delivery_id": f"{job_id}.callback.7", "event_id": "e7", "kind": "completed", "sequence": 7,
             "status": "failed", "attempts": 5, "http_status": 500, "error": "HTTP 500 from the receiver"}])
        await kv.create(record_key(job_id, "callback"), record.model_dump_json().encode())
    finally:
        await nc.close()


def test_access_rules():
    assert Access().why_not(OPERATOR) == READ_ONLY and not Access().required
    both = Access(VIEW, OPERATOR)
    assert both.admits(VIEW) and both.admits(OPERATOR) and not both.admits("nope") and not both.admits(None)
    assert both.may_act(OPERATOR) and not both.may_act(VIEW) and "not act" in both.why_not(VIEW)
    assert Access(None, OPERATOR).required  # an acting dashboard asks who is there, on loopback too
    with pytest.raises(AuthError, match="must differ"):
        Access("same", "same")


def test_actions_are_refused_unless_allowed_and_every_number_matches_the_bus(tmp_path):
    async def main():
        async with running(tmp_path) as stack:
            ro = httpx.AsyncClient(base_url=stack.readonly, timeout=15)
            anon = httpx.AsyncClient(base_url=stack.acting, timeout=15)
            viewer = httpx.AsyncClient(base_url=stack.acting, timeout=15, auth=("ops", VIEW))
            op = httpx.AsyncClient(base_url=stack.acting, timeout=15, auth=("ops", OPERATOR))
            async with ro, anon, viewer, op:
                await until(lambda: _ready(ro), 20, "read-only dashboard ready")
                await until(lambda: _ready(op), 20, "acting dashboard ready")
                for job_id in ("job-a", "job-b"):
                    await submit(stack.js, stack.store, stack.media, workflow="probe", job_id=job_id)
                await submit(stack.js, stack.store, stack.media, workflow="stuck", job_id="job-stuck")
                await until(lambda: status_is(op, "job-stuck", "running"), 15, "job-stuck running")
                # An operator token in front of the read-only bus user: the server refuses the publish.
                async with httpx.AsyncClient(base_url=stack.misconfigured, timeout=30, auth=("ops", OPERATOR)) as mis:
                    await until(lambda: _ready(mis), 20, "misconfigured dashboard ready")
                    response = await mis.post("/api/jobs/job-stuck/cancel", headers=ACT)
                    assert response.status_code == 503 and "dashboard_operator" in response.json()["error"]["message"]
                assert (await status_is(op, "job-stuck", "running"))
                await submit(stack.js, stack.store, stack.media, workflow="probe", job_id="job-long",
                             options={"noop": {"sleep_s": 10}})
                await until(lambda: node_started(op, "job-long"), 30, "job-long running on the worker")

                # What each browser may do.
                assert (await ro.get("/api/session")).json() == {"actions": False, "reason": READ_ONLY}
                assert (await viewer.get("/api/session")).json()["actions"] is False
                assert (await op.get("/api/session")).json() == {"actions": True, "reason": None}
                assert (await anon.get("/api/session")).status_code == 401

                # The attacker's requests: none of them acts.
                refusals = [
                    (ro, {**ACT}, 403), (ro, {**ACT, "Authorization": f"Bearer {OPERATOR}"}, 403),
                    (anon, ACT, 401), (viewer, ACT, 403), (op, {}, 403),
                    (op, {**ACT, "Origin": "https://evil.example"}, 403),
                ]
                for http, headers, expected in refusals:
                    for what in ("cancel", "retry"):
                        response = await http.post(f"/api/jobs/job-long/{what}", headers=headers)
                        assert response.status_code == expected, (http.base_url, headers, what, response.text)
                        assert set(response.json()) == {"error"}
                read_only = await ro.post("/api/jobs/job-long/cancel", headers=ACT)
                assert "read-only" in read_only.json()["error"]["message"]
                assert (await ro.get("/api/jobs/job-long/cancel")).status_code == 405
                assert (await op.post("/api/jobs/no-such-job/cancel", headers=ACT)).status_code == 404
                assert (await op.post("/api/jobs/..%2Fx/cancel", headers=ACT)).status_code in (400, 404)
                assert (await op.post("/api/jobs/job-a/cancel", headers=ACT)).status_code == 409  # completed
                assert (await op.post("/api/jobs/job-long/retry", headers=ACT)).status_code == 409  # running
                # The operator's bus user cannot purge the events stream through its two subjects.
                nc = await connect(stack.urls["dashboard_operator"], "t-operator")
                held = (await stack.js.stream_info("CB_EVENTS")).state.messages
                assert await refused(nc.jetstream(), subjects.job_event("job-long", "cancel_requested"),
                                     headers={Header.ROLLUP: "all"})
                after = (await stack.js.stream_info("CB_EVENTS")).state  # progress events go on arriving
                assert after.first_seq == 1 and after.messages >= held and not after.num_deleted  # nothing purged
                await nc.close()
                assert (await status_is(op, "job-long", "running"))

                # The operator cancels, then retries; the job ends completed.
                cancel = await op.post("/api/jobs/job-long/cancel", headers={**ACT, "Origin": stack.acting})
                assert cancel.status_code == 202 and cancel.json() == {"id": "job-long", "requested": "cancel"}
                cancelled_at = time.monotonic()
                await until(lambda: status_is(op, "job-long", "cancelled"), 15, "job-long cancelled")
                assert time.monotonic() - cancelled_at < 10
                response = await op.post("/api/jobs/job-long/retry", headers=ACT)
                assert response.status_code == 202, response.text
                job = await until(lambda: status_is(op, "job-long", "completed"), 60, "job-long completed")

                events = await recorded(stack.js, "job-long")
                kinds = [e.kind for e in events]
                for kind in ("cancel_requested", "cancelled", "retry_requested", "completed"):
                    assert kind in kinds, kinds
                assert kinds.index("cancel_requested") < kinds.index("cancelled") < kinds.index("retry_requested") \
                    < kinds.index("completed")
                # The job page's history is the bus's, event for event, and no attempt is left running.
                assert [h["kind"] for h in job["history"]] == [k for k in kinds if k != "stage_progress"]
                assert [a["status"] for a in job["timeline"]] == ["cancelled", "completed"]
                assert [m["kind"] for m in job["marks"]][-4:] == ["cancelled", "retry_requested", "started", "completed"]

                # The duration column: the job's started event to its end event.
                started = next(e for e in events if e.kind == "started")
                completed = next(e for e in events if e.kind == "completed")
                assert job["duration_s"] == round((completed.time - started.time).total_seconds(), 3)
                rows = {r["job_id"]: r for r in (await ro.get("/api/jobs")).json()["jobs"]}
                assert rows["job-long"]["duration_s"] == job["duration_s"]

                # Charts: each stage attempt's duration and queue wait, recomputed from the events.
                durations, waits = [], []
                for job_id in ("job-a", "job-b", "job-long", "job-stuck"):
                    evs = await recorded(stack.js, job_id, 3.0 if job_id == "job-stuck" else None)
                    requested = [e for e in evs if e.kind == "stage_requested" and e.node == "first"][-1]
                    done = next(e for e in evs if e.kind == "stage_completed" and e.attempt == requested.attempt)
                    # the coordinator's next decision (job-stuck: requesting vad) carries the time it
                    # applied the completion at, which it recorded as the node's finished_at
                    end = next(e for e in evs[evs.index(done):] if e.kind in ("stage_requested", "completed"))
                    durations.append((end.time - requested.time).total_seconds())
                    waits.append(max(0.0, done.metrics["started_at"] - requested.time.timestamp()))
                charts = (await ro.get("/api/charts")).json()
                [noop] = charts["stages"]
                assert noop["stage"] == "noop" and noop["duration"]["count"] == 4 == noop["queue_wait"]["count"]
                for key, values in (("duration", durations), ("queue_wait", waits)):
                    for p in ("p50", "p95"):
                        assert noop[key][p] == pytest.approx(percentile(values, {"p50": 0.5, "p95": 0.95}[p]), abs=1e-3)
                assert charts["jobs_per_minute"]["submitted_total"] == 4  # job-stuck runs on
                assert charts["jobs_per_minute"]["finished_total"] == 3
                # /metrics holds the same samples.
                text = (await ro.get("/metrics")).text
                samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                           for f in text_string_to_metric_families(text) for s in f.samples}
                wait_sum = samples[("captionbus_stage_queue_wait_seconds_sum", (("stage", "noop"),))]
                assert samples[("captionbus_stage_queue_wait_seconds_count", (("stage", "noop"),))] == 4
                assert wait_sum == pytest.approx(sum(waits), abs=1e-3)
                duration_sum = sum(v for (name, labels), v in samples.items()
                                   if name == "captionbus_stage_duration_seconds_sum" and ("stage", "noop") in labels)
                assert duration_sum == pytest.approx(sum(durations), abs=1e-3)

                # Each worker's recent requests: the last attempt of every node it ran.
                [worker] = [w for w in (await ro.get("/api/workers")).json() if w["stage"] == "noop"]
                recent = {r["job_id"]: r for r in worker["recent"]}
                assert set(recent) == {"job-a", "job-b", "job-long", "job-stuck"}
                assert recent["job-long"]["attempt"] == 2 and recent["job-long"]["status"] == "completed"
                assert recent["job-long"]["duration_s"] == pytest.approx(durations[2], abs=1e-3)
                assert recent["job-long"]["queue_wait_s"] == pytest.approx(waits[2], abs=1e-3)

                # The gateway view: the delivery record as the gateway wrote it, its secrets hidden.
                await write_webhook_record(stack.urls["gateway"], "job-a")
                for http in (ro, op):
                    async def listed(http=http):
                        response = await http.get("/api/webhooks")
                        return response.json() if response.status_code == 200 and response.json()["records"] else None
                    hooks = await until(listed, 15, "the webhook record")
                    [row] = hooks["records"]
                    assert hooks["totals"] == {"records": 1, "delivered": 1, "failed": 1, "open": 0}
                    assert row["url"] == "https://hooks.example/captionbus?…"
                    assert "hunter2" not in str(hooks) and "s3cr3t" not in str(hooks)
                    assert row["last_failure"] == {"kind": "completed", "sequence": 7, "http_status": 500,
                                                   "error": "HTTP 500 from the receiver"}
                    assert row["attempts"] == 6 and row["cursor"] == 7 and row["done"] is True

    asyncio.run(asyncio.wait_for(main(), 180))
    # The read-only user's one refusal is the misconfigured dashboard's cancel; the operator user was
    # refused nothing (its rollup is refused by the stream, not by its permissions).
    assert sorted({v for v in violations(tmp_path / "server.log") if v[0] in ("dashboard", "dashboard_operator")}) \
        == [("dashboard", subjects.job_event("job-stuck", "cancel_requested"))]


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


def test_cancel_and_retry_in_a_browser_and_no_buttons_for_the_read_only_role(tmp_path):
    """Chromium (Playwright on the system binary): the operator cancels a running job and retries
    it from its page; the page then shows both in its history and on its timeline, and no bar is
    left running. A viewer's token and the read-only dashboard show no button, and the request the
    page would send is refused (403) when made from their pages."""
    playwright = pytest.importorskip("playwright.async_api", reason="pip install playwright (dev extra)")
    if not Path(CHROMIUM).exists():
        pytest.skip("apt-get install chromium")

    async def refused_from(page, job_id: str) -> int:
        return await page.evaluate(
            """async id => (await fetch(`/api/jobs/${id}/retry`, {method: 'POST', headers: {'X-Captionbus-Action': '1'}})).status""",
            job_id)

    async def main():
        async with running(tmp_path) as stack, playwright.async_playwright() as p:
            await submit(stack.js, stack.store, stack.media, workflow="probe", job_id="job-bad",
                         options={"noop": {"fail": "bad_input"}})
            await submit(stack.js, stack.store, stack.media, workflow="probe", job_id="job-b",
                         options={"noop": {"sleep_s": 10}})
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            operator = await browser.new_context(viewport={"width": 1400, "height": 900},
                                                 http_credentials={"username": "ops", "password": OPERATOR})
            page = await operator.new_page()
            await page.goto(stack.acting + "/#/job/job-b")
            await page.wait_for_selector("[data-testid=session]:text('operator')", timeout=10_000)
            status = page.locator("[data-testid=job-status]")
            await page.locator("[data-testid=job-status]:text('running')").wait_for(timeout=20_000)
            await page.locator("[data-testid=cancel]").click()
            await page.locator("[data-testid=job-status]:text('cancelled')").wait_for(timeout=15_000)
            assert await page.locator("[data-testid=cancel]").count() == 0
            await page.locator("[data-testid=retry]").click()
            await page.locator("[data-testid=job-status]:text('completed')").wait_for(timeout=60_000)
            assert await status.inner_text() == "completed"
            history = page.locator("[data-testid=history] tr[data-kind]")
            await page.locator("[data-testid=history] tr[data-kind=completed]").wait_for(timeout=10_000)
            kinds = [await row.get_attribute("data-kind") for row in await history.all()]
            for kind in ("cancel_requested", "cancelled", "retry_requested", "completed"):
                assert kind in kinds, kinds
            timeline = page.locator("[data-testid=timeline]")
            assert [await m.get_attribute("data-status") for m in await timeline.locator(".gmeta[data-status]").all()] \
                == ["cancelled", "completed"]
            assert "running" not in await timeline.inner_text()  # no stale running bar
            assert await timeline.locator(".gmark[data-kind=retry_requested]").count() == 1
            assert await page.locator("[data-testid=retry], [data-testid=cancel]").count() == 0  # completed
            await page.screenshot(path=str(tmp_path / "dashboard-job-cancel-retry.png"), full_page=True)

            # The list: a duration for the finished job, retry offered on the failed one only.
            await page.goto(stack.acting + "/#/jobs")
            done = page.locator("tr[data-job='job-b'][data-status='completed']")
            await done.wait_for(timeout=10_000)
            assert (await done.locator("td.duration").inner_text()).endswith(" s")
            assert await done.locator("button:visible").count() == 0
            assert await page.locator("tr[data-job='job-bad'] button[data-action=retry]:visible").count() == 1

            # Workers: the noop worker's recent requests; Charts: the noop stage's p50/p95.
            await page.goto(stack.acting + "/#/workers")
            await page.locator("[data-testid=worker-recent] [data-job='job-b'][data-status=completed]").wait_for(timeout=10_000)
            await page.goto(stack.acting + "/#/charts")
            row = page.locator("[data-testid=chart-duration] tr[data-stage=noop]")
            await row.wait_for(timeout=10_000)
            assert (await row.locator("td.p95").inner_text()).endswith(" s")
            assert await page.locator("[data-testid=jobs-per-minute] .bar.finished").count() == 60
            await page.screenshot(path=str(tmp_path / "dashboard-charts.png"), full_page=True)
            # Webhooks: the record a gateway wrote, its receiver's secrets not on the page.
            await write_webhook_record(stack.urls["gateway"], "job-bad")
            await page.goto(stack.acting + "/#/webhooks")
            hook = page.locator("[data-testid=webhooks] tr[data-job='job-bad'][data-subscriber=callback]")
            await hook.wait_for(timeout=20_000)  # the page reads the view every 10 s
            assert await hook.locator("td.failed").inner_text() == "1"
            assert "hunter2" not in await page.content() and "s3cr3t" not in await page.content()

            # A viewer's token on the acting dashboard, and the read-only dashboard: no buttons, 403.
            viewer = await browser.new_context(http_credentials={"username": "ops", "password": VIEW})
            for context, base in ((viewer, stack.acting), (await browser.new_context(), stack.readonly)):
                page = await context.new_page()
                await page.goto(base + "/#/job/job-bad")
                await page.locator("[data-testid=job-status]:text('failed')").wait_for(timeout=10_000)
                await page.wait_for_selector("[data-testid=session]:text('read-only')", timeout=10_000)
                assert await page.locator("[data-testid=retry], [data-testid=cancel]").count() == 0
                assert await refused_from(page, "job-bad") == 403
                await page.goto(base + "/#/jobs")
                await page.locator("tr[data-job='job-bad']").wait_for(timeout=10_000)
                assert await page.locator("button[data-action]:visible").count() == 0
            await browser.close()
            if os.environ.get("CAPTIONBUS_TEST_ARTIFACTS"):
                for shot in tmp_path.glob("dashboard-*.png"):
                    shutil.copy(shot, Path(os.environ["CAPTIONBUS_TEST_ARTIFACTS"]) / shot.name)
            # the refused attempts changed nothing
            assert [e.kind for e in await recorded(stack.js, "job-bad")].count("retry_requested") == 0

    asyncio.run(asyncio.wait_for(main(), 240))


def test_the_webhook_view_is_what_a_real_gateway_recorded(tmp_path, receiver):  # noqa: F811
    """A real gateway (the gateway user) delivers a job's events to a gateway-wide subscriber whose
    receiver refuses each first attempt; the dashboard's Webhooks rows equal the gateway's own
    records (/v1/jobs/ID/webhooks) and the POSTs the receiver saw."""
    hooks, rec = receiver
    rec.fail_first = True

    async def main():
        async with running(tmp_path) as stack:
            config = GatewayConfig(
                settings=Settings(home=tmp_path / "gw", nats_url=stack.urls["gateway"], artifacts_mode="object",
                                  host_id="gw"),
                nats_url=stack.urls["gateway"], webhook_allow=[hooks], webhook_secret=SECRET.encode(),
                webhook_lease_s=2, webhook_subscribers=[Subscriber(name="audit", url=f"{hooks}audit/?token=s3cr3t")])
            gateway = running_gateway(config)
            base = await asyncio.to_thread(gateway.__enter__)
            try:
                await submit(stack.js, stack.store, stack.media, workflow="probe", job_id="job-hooked")
                async with httpx.AsyncClient(timeout=15) as http:
                    async def gateway_done():
                        data = (await http.get(f"{base}/v1/jobs/job-hooked/webhooks")).json()["data"]
                        return data if data and all(r["done"] for r in data) else None
                    [record] = await until(gateway_done, 60, "the gateway's record done")

                    async def dashboard_row():
                        response = await http.get(f"{stack.readonly}/api/webhooks")
                        rows = response.json()["records"] if response.status_code == 200 else []
                        return next((r for r in rows if r["job_id"] == "job-hooked" and r["done"]), None)
                    row = await until(dashboard_row, 20, "the dashboard's row done")
            finally:
                await asyncio.to_thread(gateway.__exit__, None, None, None)
            deliveries = record["deliveries"]
            assert row["subscriber"] == "audit" and row["cursor"] == record["cursor"]
            assert row["delivered"] == len(deliveries) == sum(d["status"] == "delivered" for d in deliveries)
            assert row["failed"] == 0 and row["attempts"] == sum(d["attempts"] for d in deliveries) == len(rec.posts)
            assert row["last"]["kind"] == deliveries[-1]["kind"] == "completed"
            assert row["url"] == f"{hooks}audit/?…"

    asyncio.run(asyncio.wait_for(main(), 180))


def test_the_dashboard_command_reads_the_operator_token_and_asks_on_loopback_too(nats_server, tmp_path):
    """`captionbus dashboard` with CAPTIONBUS_DASHBOARD_OPERATOR_TOKEN_FILE: every page asks for a
    token on 127.0.0.1 too, the operator's may act; the same secret as the view token is refused
    at start."""
    env = {**os.environ, "NATS_URL": nats_server, "CAPTIONBUS_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for name in ("TOKEN", "TOKEN_FILE", "OPERATOR_TOKEN", "OPERATOR_TOKEN_FILE"):
        env.pop(f"CAPTIONBUS_DASHBOARD_{name}", None)
    secret = tmp_path / "operator"
    secret.write_text(OPERATOR + "\n")
    same = subprocess.run([sys.executable, "-m", "captionbus", "dashboard", "--listen", "127.0.0.1:1"],
                          env={**env, "CAPTIONBUS_DASHBOARD_TOKEN": OPERATOR,
                               "CAPTIONBUS_DASHBOARD_OPERATOR_TOKEN_FILE": str(secret)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert same.returncode == 2 and "must differ" in same.stderr, same.stderr
    [port] = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "dashboard.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "captionbus", "dashboard", "--listen", f"127.0.0.1:{port}"],
                                env={**env, "CAPTIONBUS_DASHBOARD_OPERATOR_TOKEN_FILE": str(secret)},
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                        break
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "dashboard.log").read_text()
                time.sleep(0.2)
            assert httpx.get(base + "/", timeout=5).status_code == 401
            assert httpx.get(base + "/api/session", auth=("ops", OPERATOR), timeout=5).json()["actions"] is True
        finally:
            proc.terminate()
            proc.wait(20)
    assert "cancel and retry for the operator token" in (tmp_path / "dashboard.log").read_text()
