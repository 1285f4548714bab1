"""Every surface against every other, on one real local stack (issue 19): what the CLI, the
dashboard (/api/workers, /api/queues, /metrics, the job page), the gateway's SSE and webhook
deliveries say must be the same list of workers and the same history of a job.

The stack: a real nats-server; two hosts' worth of stage service processes (CAPTIONBUS_HOST_ID
`alpha` and `beta`): noop twice on alpha (replicas 0 and 1) and once on beta, demux and vad on
alpha, subtitle_gen and mux on beta, the real stages in their own `common` env; the real
coordinator; the gateway with a gateway-wide webhook subscriber (the example receiver); the
dashboard; the CLI as a subprocess. A job is created, cancelled while its first noop node runs,
retried, and completes; then the surfaces are compared."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from captionbus.client import submit
from captionbus.dashboard.serve import serve as serve_dashboard
from captionbus.gateway.app import GatewayConfig
from captionbus.gateway.dispatch import Subscriber
from captionbus.stack import ServiceProcess, start_service, stop_services, wait_ready
from contracts import worker_identity
from coordinator.graph import Workflow
from coordinator.service import Coordinator
from core.artifacts import ArtifactStore
from core.bus import connect, provision
from core.settings import PROJECT_ROOT, Settings
from tests.gatewaytools import free_port, running_gateway
from tests.integration.test_dashboard import _until
from tests.integration.test_gateway import parse_sse
from tests.integration.test_gateway_webhook_state import SECRET, receiver  # noqa: F401  (a fixture)

PAIR = {"name": "pair", "nodes": {
    "first": {"stage": "noop", "inputs": {"media": "job.input"}, "outputs": ["media"], "params": {"sleep_s": 8}},
    "second": {"stage": "noop", "inputs": {"media": "first.media"}, "outputs": ["media"],
               "params": {"sleep_s": 0.3, "warn": "a warning"}}},
    "outputs": {"media": "second.media"}}
# (host, stage, replica): noop has two replicas on alpha.
FLEET = [("alpha", "noop", 0), ("alpha", "noop", 1), ("beta", "noop", 0), ("alpha", "demux", 0),
         ("alpha", "vad", 0), ("beta", "subtitle_gen", 0), ("beta", "mux", 0)]


def _start_fleet(url: str, root: Path) -> list[ServiceProcess]:
    from captionbus.envs import env_for_stage, interpreter_for_stage

    services = []
    for host, stage, replica in FLEET:
        settings = Settings(home=root / f"{host}-{stage}-{replica}", nats_url=url, artifacts_mode="object", host_id=host)
        if stage == "noop":  # a test stage: no env of its own, the test's interpreter runs it
            env, interpreter = "test", Path(sys.executable)
        else:
            env, interpreter = env_for_stage(stage), interpreter_for_stage(stage)
        services.append(start_service(stage, env, interpreter, url, settings, replica=replica,
                                      extra_env={"CAPTIONBUS_ACK_WAIT": "30"}))
    return services


def test_cli_dashboard_metrics_sse_and_webhooks_agree(nats_server, tmp_path, receiver):  # noqa: F811
    hooks, rec = receiver
    dash_port = free_port()
    dash = f"http://127.0.0.1:{dash_port}"
    env = {**os.environ, "NATS_URL": nats_server, "CAPTIONBUS_HOME": str(tmp_path / "cli"),
           "PYTHONPATH": str(PROJECT_ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "captionbus", *args], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        return done

    followers: list[subprocess.Popen] = []
    gateway_config = GatewayConfig(
        settings=Settings(home=tmp_path / "gw", nats_url=nats_server, artifacts_mode="object", host_id="gw"),
        nats_url=nats_server, webhook_allow=[hooks], webhook_secret=SECRET.encode(), webhook_lease_s=5,
        webhook_subscribers=[Subscriber(name="audit", url=f"{hooks}audit/")])

    async def main(gateway: str):
        nc = await connect(nats_server, "t-surfaces")
        js = nc.jetstream()
        await provision(js)
        services = _start_fleet(nats_server, tmp_path / "fleet")
        dash_ready = asyncio.Event()
        try:
            async with Coordinator(nc, graphs={"pair": Workflow.from_dict(PAIR)}, tick_interval_s=0.2):
                await wait_ready(nc, services, timeout=120)
                dashboard = asyncio.create_task(serve_dashboard(nats_server, f"127.0.0.1:{dash_port}", None, dash_ready))
                await asyncio.wait_for(dash_ready.wait(), 30)
                async with httpx.AsyncClient(base_url=dash, timeout=15) as http, \
                        httpx.AsyncClient(base_url=gateway, timeout=15) as gw:
                    await check_workers(http, services)
                    job_id = await cancel_then_retry(js, http, gw)
                    await check_history(http, gw, job_id)
                    await check_job_workers(http, job_id)
                dashboard.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dashboard
        finally:
            stop_services(services)
            await nc.close()

    async def check_workers(http: httpx.AsyncClient, services: list[ServiceProcess]) -> None:
        expected = {worker_identity(host, stage, str(replica), svc.process.pid)
                    for (host, stage, replica), svc in zip(FLEET, services)}
        listed = json.loads((await asyncio.to_thread(cli, "workers", "--json")).stdout)
        from_cli = [w["metadata"]["worker_id"] for w in listed]
        assert sorted(from_cli) == sorted(expected), "captionbus workers"

        async def dashboard_sees_all():
            rows = (await http.get("/api/workers")).json()
            return rows if sorted(r["worker_id"] for r in rows if r["state"] != "lost") == sorted(expected) else None
        rows = await _until(dashboard_sees_all, 15, "the dashboard to list every worker")
        assert {(r["host"], r["stage"], r["replica"]) for r in rows} == {(h, s, str(r)) for h, s, r in FLEET}
        per_stage = Counter(stage for _, stage, _ in FLEET)

        queues = {q["stage"]: q for q in (await http.get("/api/queues")).json()}
        for stage, n in per_stage.items():
            if stage in queues:  # stages the dashboard knows (config) or the requests stream has
                assert queues[stage]["workers"] == n, f"/api/queues workers of {stage}"
        assert {"demux", "vad", "subtitle_gen", "mux"} <= set(queues)

        metrics = (await http.get("/metrics")).text
        samples = Counter()
        for family in text_string_to_metric_families(metrics):
            if family.name == "captionbus_workers":
                for sample in family.samples:
                    if sample.labels["state"] != "lost":
                        samples[sample.labels["stage"]] += int(sample.value)
        assert samples == per_stage, "/metrics captionbus_workers"

    async def cancel_then_retry(js, http: httpx.AsyncClient, gw: httpx.AsyncClient) -> str:
        media = tmp_path / "clip.wav"
        media.write_bytes(b"RIFF" + os.urandom(2000))
        spec = await submit(js, ArtifactStore(Settings(home=tmp_path / "client", nats_url=nats_server,
                                                       artifacts_mode="object", host_id="client"), js),
                            media, workflow="pair")
        job_id = spec.job_id

        async def running_first():
            rows = (await http.get("/api/workers")).json()
            return next((r for r in rows for c in r["current"] if c["job_id"] == job_id and c["node"] == "first"), None)
        holder = await _until(running_first, 30, "a noop worker to run the first node")
        assert holder["stage"] == "noop"
        await asyncio.sleep(0.5)
        started = time.monotonic()
        assert (await gw.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202

        async def let_go():
            rows = (await http.get("/api/workers")).json()
            return not any(c["job_id"] == job_id for r in rows for c in r["current"])
        await _until(let_go, 10, "the worker to let the cancelled request go")
        # dashboard polls every 2 s: within 2 s of the cancel plus one poll
        assert time.monotonic() - started < 2.0 + 2.5
        await _until(lambda: _status(gw, job_id, "cancelled"), 10, "cancelled")

        async def record_done():  # the job ended: its webhook record is done (a retry reopens it)
            records = (await gw.get(f"/v1/jobs/{job_id}/webhooks")).json()["data"]
            return records and all(r["done"] for r in records)
        await _until(record_done, 15, "the webhook record done at `cancelled`")
        assert [e["kind"] for e, _ in rec.got if e["job_id"] == job_id][-1] == "cancelled"
        assert (await gw.post(f"/v1/jobs/{job_id}/retry")).status_code == 202
        # A follower started now replays past `cancelled` (not the end any more) and ends by
        # itself at `completed`.
        followers.append(subprocess.Popen([sys.executable, "-m", "captionbus", "events", job_id, "--follow"],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        await _until(lambda: _status(gw, job_id, "completed"), 60, "completed after the retry")
        return job_id

    async def check_history(http: httpx.AsyncClient, gw: httpx.AsyncClient, job_id: str) -> None:
        cli_events = [json.loads(line) for line in (await asyncio.to_thread(cli, "events", job_id)).stdout.splitlines()]
        ids = [e["event_id"] for e in cli_events]
        kinds = [e["kind"] for e in cli_events]
        assert kinds[0] == "submitted" and kinds[-1] == "completed"
        for kind in ("cancel_requested", "cancelled", "retry_requested"):
            assert kind in kinds
        assert kinds.index("cancelled") < kinds.index("retry_requested") < len(kinds) - 1
        assert kinds.count("started") == 2  # the start and the restart
        assert len(ids) == len(set(ids))
        print(f"job {job_id}: {len(ids)} events, {' '.join(k for k in kinds if k != 'stage_progress')}")
        cancelled_at = kinds.index("cancelled")
        # Nothing from the cancelled attempt's worker after `cancelled`: it stopped.
        after = [e for e in cli_events[cancelled_at:kinds.index("retry_requested")]
                 if e.get("node") == "first" and e.get("attempt") == 1]
        assert after == [], after

        out, err = await asyncio.to_thread(followers[0].communicate, timeout=20)
        assert followers[0].returncode == 0, err
        assert [json.loads(line)["event_id"] for line in out.splitlines()] == ids, "events --follow"

        # SSE: the whole history, and it ends by itself at the real end (not at `cancelled`).
        read_at = time.monotonic()
        sse = await _sse(gw, job_id)
        print(f"SSE of the finished job: {len(sse)} events, closed after {time.monotonic() - read_at:.2f} s")
        assert [json.loads(e["data"])["event_id"] for e in sse] == ids
        assert [e["event"] for e in sse] == kinds
        # ... and resumed after `cancelled` with Last-Event-ID: exactly the rest.
        resumed = await _sse(gw, job_id, last_id=sse[cancelled_at]["id"])
        assert [json.loads(e["data"])["event_id"] for e in resumed] == ids[cancelled_at + 1:]

        # Webhooks: every event once, in order, and the record is done at `completed`.
        async def delivered():
            got = [(int(h["X-Captionbus-Sequence"]), e["event_id"]) for e, h in rec.got if e["job_id"] == job_id]
            return got if len(got) >= len(ids) else None
        got = await _until(delivered, 30, "every webhook delivery")
        assert [event_id for _, event_id in got] == ids, "webhook deliveries"
        assert [seq for seq, _ in got] == [int(e["id"]) for e in sse]
        records = (await gw.get(f"/v1/jobs/{job_id}/webhooks")).json()["data"]
        assert [(r["subscriber"], r["done"], r["cursor"]) for r in records] == [("audit", True, int(sse[-1]["id"]))]

        # The job page: the same events but progress, in the same order, with the same sequences;
        # the cancelled attempt is closed (no running bar) and cancel and retry are marked.
        page = (await http.get(f"/api/jobs/{job_id}")).json()
        listed = [(int(e["id"]), json.loads(e["data"])["event_id"]) for e in sse if e["event"] != "stage_progress"]
        assert [(h["seq"], h["event_id"]) for h in page["history"]] == listed
        assert page["status"] == "completed"
        assert all(row["end"] for row in page["timeline"]), page["timeline"]
        first_attempts = {row["attempt"]: row["status"] for row in page["timeline"] if row["node"] == "first"}
        assert first_attempts == {1: "cancelled", 2: "completed"}
        assert [m["kind"] for m in page["marks"]] == [k for k in kinds if k in (
            "started", "cancel_requested", "cancelled", "retry_requested", "completed")]

    async def check_job_workers(http: httpx.AsyncClient, job_id: str) -> None:
        """job.json / the job page name the workers the Workers page lists."""
        page = (await http.get(f"/api/jobs/{job_id}")).json()
        workers = {r["worker_id"] for r in (await http.get("/api/workers")).json()}
        ran = {n["worker"]["worker_id"] for n in page["nodes"]}
        assert ran <= workers and all(w.split("/")[1] == "noop" for w in ran), ran
        state = json.loads((await asyncio.to_thread(cli, "status", job_id, "--json")).stdout)
        assert {n["worker"]["worker_id"] for n in state["nodes"].values()} == ran

    try:
        with running_gateway(gateway_config) as gateway:
            asyncio.run(asyncio.wait_for(main(gateway), 300))
    finally:
        for follower in followers:
            if follower.poll() is None:
                follower.kill()
                follower.communicate()


async def _status(gw: httpx.AsyncClient, job_id: str, status: str) -> bool:
    return (await gw.get(f"/v1/jobs/{job_id}")).json()["status"] == status


async def _sse(gw: httpx.AsyncClient, job_id: str, last_id: str | None = None) -> list[dict]:
    """The SSE stream of a finished job, read until the gateway closes it (it must, by itself)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    lines = []
    async with asyncio.timeout(20):
        async with gw.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(line)
    return parse_sse(lines + [""])
