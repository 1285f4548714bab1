"""The dashboard process against a real nats-server with the deploy/nats role permissions: a real
coordinator and a real (noop) stage service run jobs, the dashboard reads them with the read-only
`dashboard` user and serves them over real HTTP (uvicorn)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from captionbus.client import submit
from captionbus.dashboard.auth import AuthError, check_bind
from captionbus.dashboard.serve import serve as serve_dashboard
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import Coordinator
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import StagePolicy, connect, provision
from captionbus.core.settings import Settings
from captionbus.services.noop.stage import STAGE as NOOP
from captionbus.services.runtime.serve import serve as serve_stage
from tests.gatewaytools import check_waits_for_the_bus
from tests.integration.test_bus import acl_server  # noqa: F401  (a fixture)
from tests.natsroles import violations as _violations

WORKFLOWS = {
    # one noop node: completes (or fails when the job's options say so)
    "probe": {"name": "probe", "nodes": {"first": {"stage": "noop", "inputs": {"media": "job.input"},
                                                   "outputs": ["media"], "params": {"sleep_s": 0.3, "warn": "a warning"}}},
              "outputs": {"media": "first.media"}},
    # then a vad node, and no vad worker runs: its request waits in the queue
    "stuck": {"name": "stuck", "nodes": {
        "first": {"stage": "noop", "inputs": {"media": "job.input"}, "outputs": ["media"]},
        "vad": {"inputs": {"audio": "first.media"}, "outputs": ["regions"]}},
        "outputs": {"regions": "vad.regions"}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def _first_sse(client: httpx.AsyncClient, kind: str, match, timeout: float) -> float:
    """Seconds until an SSE message of `kind` whose data satisfies `match` arrives."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        async with client.stream("GET", "/api/stream") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == kind and match(json.loads(line[6:])):
                    return time.monotonic() - started
    raise AssertionError("stream ended")


def test_dashboard_reads_jobs_queues_workers_and_metrics_with_the_dashboard_role(acl_server, tmp_path):  # noqa: F811
    urls, server_log = acl_server
    port = _free_port()
    base = f"http://127.0.0.1:{port}"

    def settings(role: str) -> Settings:
        return Settings(home=tmp_path / role, nats_url=urls[role], artifacts_mode="object", host_id=role)

    async def main():
        coord_nc = await connect(urls["coordinator"], "t-coordinator")
        client_nc = await connect(urls["client"], "t-client")
        await provision(coord_nc.jetstream())
        graphs = {name: Workflow.from_dict(data) for name, data in WORKFLOWS.items()}
        stop, ready = asyncio.Event(), asyncio.Event()
        dash_ready = asyncio.Event()
        async with Coordinator(coord_nc, graphs=graphs, tick_interval_s=0.2):
            worker = asyncio.create_task(serve_stage(NOOP, settings("worker"), urls["worker"], env_name="dash-test",
                                                     stop=stop, ready=ready, policy=StagePolicy(ack_wait=2.0)))
            dashboard = asyncio.create_task(serve_dashboard(urls["dashboard"], f"127.0.0.1:{port}", None, dash_ready))
            await asyncio.wait_for(asyncio.gather(ready.wait(), dash_ready.wait()), 30)
            js = client_nc.jetstream()
            store = ArtifactStore(settings("client"), js)
            media = tmp_path / "clip.wav"
            media.write_bytes(b"RIFF" + os.urandom(1000))
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                await _until(lambda: _ok(http, "/readyz"), 10, "/readyz")
                # A job's summary reaches an open stream within a second of its state changing.
                watch = asyncio.create_task(_first_sse(http, "job", lambda d: d["job_id"] == "job-ok"
                                                       and d["status"] == "completed", 30))
                await asyncio.sleep(0.3)
                t0 = time.monotonic()
                await submit(js, store, media, workflow="probe", job_id="job-ok")
                await watch
                assert time.monotonic() - t0 < 10
                await submit(js, store, media, workflow="probe", job_id="job-bad",
                             options={"noop": {"fail": "bad_input"}})
                await submit(js, store, media, workflow="stuck", job_id="job-stuck")

                async def failed():
                    page = (await http.get("/api/jobs", params={"status": "failed"})).json()
                    return page["jobs"]
                rows = await _until(failed, 20, "the failed job")
                assert [r["job_id"] for r in rows] == ["job-bad"]
                assert "noop was asked to fail: bad input" in rows[0]["error"]
                assert rows[0]["failure_class"] == "input"  # recorded by the coordinator (captionbus.contracts.failures)

                async def vad_problem():
                    rows = (await http.get("/api/queues")).json()
                    return next((r for r in rows if r["stage"] == "vad" and r["problem"]), None)
                vad = await _until(vad_problem, 20, "the vad queue flagged")
                assert vad["waiting"] == 1 and vad["workers"] == 0 and vad["oldest_waiting_s"] is not None
                assert "no live vad worker" in vad["problem"]

                # Filters and text search
                page = (await http.get("/api/jobs", params={"workflow": "stuck"})).json()
                assert [j["job_id"] for j in page["jobs"]] == ["job-stuck"]
                page = (await http.get("/api/jobs", params={"text": "JOB-O"})).json()
                assert [j["job_id"] for j in page["jobs"]] == ["job-ok"]
                assert (await http.get("/api/jobs", params={"language": "fr"})).json()["total"] == 0

                # The job page: who ran it, the warning, the timeline, outputs with sizes.
                job = (await http.get("/api/jobs/job-ok")).json()
                node = job["nodes"][0]
                assert node["worker"]["env"] == "dash-test" and "interpreter" not in node["worker"]
                assert job["warnings"] == [{"node": "first", "message": "a warning", "time": job["warnings"][0]["time"]}]
                assert [(a["node"], a["attempt"], a["status"]) for a in job["timeline"]] == [("first", 1, "completed")]
                assert job["timeline"][0]["duration_s"] >= 0.3
                assert job["outputs"] == [{"name": "media", "file": "clip.wav", "size": 1004, "download": None}]
                assert (await http.get("/api/jobs/..%2Fx")).status_code in (400, 404)

                async def noop_worker():
                    rows = (await http.get("/api/workers")).json()
                    return [w for w in rows if w["stage"] == "noop"]
                workers = await _until(noop_worker, 10, "the noop worker")
                assert workers[0]["state"] == "idle" and workers[0]["env"] == "dash-test"
                assert workers[0]["model"] == "none" and workers[0]["current"] == []
                assert workers[0]["heartbeat_age_s"] < 5 and workers[0]["jobs_done"] >= 2  # job-ok, job-stuck
                assert workers[0]["last_error"] == "noop was asked to fail: bad input"  # job-bad

                # A worker on a job is `busy` with that job, node and attempt.
                await submit(js, store, media, workflow="probe", job_id="job-busy", options={"noop": {"sleep_s": 4}})

                async def busy():
                    rows = await noop_worker()
                    return rows if rows and rows[0]["state"] == "busy" else None
                [row] = await _until(busy, 20, "the noop worker busy")
                assert [(c["job_id"], c["node"], c["attempt"]) for c in row["current"]] == [("job-busy", "first", 1)]
                async def busy_done():
                    return (await http.get("/api/jobs/job-busy")).json()["status"] == "completed"
                await _until(busy_done, 30, "job-busy completed")

                async def idle_again():
                    rows = await noop_worker()
                    return rows and rows[0]["state"] == "idle" and rows[0]["jobs_done"] >= 3
                await _until(idle_again, 20, "the noop worker idle again")

                # Downloads are off by default: no links, and the route refuses with the reason.
                assert job["downloads"] is False and all(o["download"] is None for o in job["outputs"])
                assert "--downloads" in job["downloads_note"]
                refused = await http.get("/api/jobs/job-ok/outputs/media")
                assert refused.status_code == 403 and "downloads are off" in refused.json()["error"]["message"]

                # /metrics, parsed with the Prometheus client's own parser, matches the jobs run.
                text = (await http.get("/metrics")).text
                samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                           for family in text_string_to_metric_families(text) for s in family.samples}
                assert samples[("captionbus_jobs", (("status", "completed"), ("workflow", "probe")))] == 2
                assert samples[("captionbus_jobs", (("status", "failed"), ("workflow", "probe")))] == 1
                assert samples[("captionbus_jobs", (("status", "running"), ("workflow", "stuck")))] == 1
                assert samples[("captionbus_queue_waiting", (("stage", "vad"),))] == 1
                assert samples[("captionbus_job_failures_total",
                                (("reason_class", "input"), ("stage", "noop"), ("workflow", "probe")))] == 1
                assert samples[("captionbus_workers", (("stage", "noop"), ("state", "idle")))] == 1
                durations = [v for (name, labels), v in samples.items() if name == "captionbus_stage_duration_seconds_count"
                             and ("stage", "noop") in labels and ("env", "dash-test") in labels]
                assert durations == [3.0]  # job-ok's, job-stuck's and job-busy's noop nodes
                # Every metric the Grafana board in deploy/ queries is one the dashboard exports.
                families = {f.name for f in text_string_to_metric_families(text)}
                board = (Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "captionbus.json").read_text()
                queried = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in re.findall(r"captionbus_\w+", board)}
                assert queried and queried <= families, queried - families
                assert (await http.get("/healthz")).json() == {"status": "ok"}
                assert (await http.get("/static/alpine-3.14.9.min.js")).status_code == 200

            await _check_downloads(urls, tmp_path, media.read_bytes())
            dashboard.cancel()
            stop.set()
            await asyncio.wait_for(worker, 15)
            with pytest.raises(BaseException):
                await dashboard
        await coord_nc.close()
        await client_nc.close()

    asyncio.run(asyncio.wait_for(main(), 120))
    # The one denied call: the --downloads probe of the plain dashboard role (it may not read objects).
    assert [v for v in _violations(server_log) if v[0] == "dashboard"] == [
        ("dashboard", "$JS.API.STREAM.MSG.GET.OBJ_cb_artifacts")]
    assert [v for v in _violations(server_log) if v[0] == "dashboard_downloads"] == []


async def _check_downloads(urls: dict[str, str], tmp_path: Path, media: bytes) -> None:
    """--downloads with the plain dashboard role: its probe finds it may not read artifacts, so
    no links. With the dashboard_downloads role: a link, streaming the output's exact bytes."""
    def download_dirs() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("captionbus-download-*"))

    before = download_dirs()  # other processes on this machine may have their own
    for role, allowed in (("dashboard", False), ("dashboard_downloads", True)):
        port, ready = _free_port(), asyncio.Event()
        settings = Settings(home=tmp_path / f"{role}-dl", nats_url=urls[role], artifacts_mode="object", host_id=role)
        task = asyncio.create_task(serve_dashboard(urls[role], f"127.0.0.1:{port}", None, ready, downloads=True,
                                                   settings=settings))
        try:
            await asyncio.wait_for(ready.wait(), 30)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                await _until(lambda: _ok(http, "/readyz"), 20, "/readyz")
                job = (await http.get("/api/jobs/job-ok")).json()
                [output] = job["outputs"]
                response = await http.get("/api/jobs/job-ok/outputs/media")
                if not allowed:
                    assert job["downloads"] is False and output["download"] is None
                    assert "dashboard_downloads role" in job["downloads_note"]
                    assert response.status_code == 403
                    continue
                assert job["downloads"] is True and output["download"] == "/api/jobs/job-ok/outputs/media"
                assert response.status_code == 200 and response.content == media
                assert response.headers["content-disposition"].startswith("attachment")
                assert response.headers["x-content-type-options"] == "nosniff"
                # Only outputs the job names: not another job's, not a key, not a path.
                assert (await http.get("/api/jobs/job-ok/outputs/nope")).status_code == 404
                assert (await http.get("/api/jobs/no-such-job/outputs/media")).status_code == 404
                assert (await http.get(f"/api/jobs/job-ok/outputs/{'0' * 64}")).status_code == 404
            # The temporary copy is removed by a background task after the body is sent, so
            # the client may see the response end a moment before the folder goes.
            deadline = time.monotonic() + 10
            while (left := download_dirs() - before) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not left, f"a download left its file: {left}"
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _ok(http: httpx.AsyncClient, path: str) -> bool:
    return (await http.get(path)).status_code == 200


def test_non_loopback_bind_needs_a_token_and_refuses_requests_without_it(nats_server, tmp_path):
    with pytest.raises(AuthError, match="CAPTIONBUS_DASHBOARD_TOKEN"):
        check_bind("0.0.0.0", None)
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    env = {**os.environ, "NATS_URL": nats_server, "CAPTIONBUS_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("CAPTIONBUS_DASHBOARD_TOKEN", None)
    env.pop("CAPTIONBUS_DASHBOARD_TOKEN_FILE", None)
    refused = subprocess.run([sys.executable, "-m", "captionbus", "dashboard", "--listen", "0.0.0.0:1"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "without auth" in refused.stderr

    async def provisioned():
        nc = await connect(nats_server, "t")
        await provision(nc.jetstream())
        await nc.close()
    asyncio.run(provisioned())
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    port = _free_port()
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "captionbus", "dashboard", "--listen", f"0.0.0.0:{port}"],
                            env={**env, "CAPTIONBUS_DASHBOARD_TOKEN_FILE": str(token_file)},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "dashboard.log").read_text()
            time.sleep(0.2)
        for path in ("/", "/api/jobs", "/api/stream", "/metrics", "/static/dashboard.js"):
            response = httpx.get(base + path, timeout=5)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(base + "/api/jobs", auth=("ops", "wrong"), timeout=5).status_code == 401
        assert httpx.get(base + "/api/jobs", auth=("ops", "s3cret-token"), timeout=5).json()["total"] == 0
        metrics = httpx.get(base + "/metrics", headers={"Authorization": "Bearer s3cret-token"}, timeout=5)
        assert metrics.status_code == 200 and "captionbus_jobs" in metrics.text
        # An open page (an SSE stream) does not hold a stop up: SIGTERM ends it in seconds, exit 0.
        with httpx.stream("GET", base + "/api/stream", auth=("ops", "s3cret-token"), timeout=5) as stream:
            assert stream.status_code == 200
            proc.terminate()
            started = time.monotonic()
            assert proc.wait(15) == 0
            assert time.monotonic() - started < 10
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_dashboard_survives_a_nats_server_restart(tmp_path):
    """The bus goes away and comes back (same port and store): /readyz says so meanwhile, and job
    states written after the restart reach the page without restarting the dashboard."""
    from captionbus.server import EmbeddedServer
    from captionbus.contracts import ArtifactRef, JobSpec, JobState, subjects

    server = EmbeddedServer(tmp_path / "nats")
    server.start()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"

    def job(job_id: str) -> bytes:
        spec = JobSpec(job_id=job_id, input=ArtifactRef(key="0" * 64, name=f"{job_id}.mp4", size=1))
        return JobState(spec=spec).model_dump_json().encode()

    async def main():
        nc = await connect(server.url, "t-writer")
        await provision(nc.jetstream())
        kv = await nc.jetstream().key_value(subjects.JOBS_BUCKET)
        await kv.put("job-before", job("job-before"))
        ready = asyncio.Event()
        dashboard = asyncio.create_task(serve_dashboard(server.url, f"127.0.0.1:{port}", None, ready))
        await asyncio.wait_for(ready.wait(), 30)
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            async def total():
                return (await http.get("/api/jobs")).json()["total"]
            await _until(lambda: _ok(http, "/readyz"), 10, "ready")
            assert await total() == 1
            await nc.close()
            server.stop()

            async def not_ready():
                response = await http.get("/readyz")
                return response.status_code == 503 and response.text
            assert "NATS" in await _until(not_ready, 20, "/readyz to report the lost bus")
            server.start()
            await _until(lambda: _ok(http, "/readyz"), 30, "ready again")
            nc2 = await connect(server.url, "t-writer-2")
            kv2 = await nc2.jetstream().key_value(subjects.JOBS_BUCKET)
            await kv2.put("job-after", job("job-after"))

            async def both():
                return await total() == 2
            await _until(both, 30, "the job written after the restart")
            await nc2.close()
        dashboard.cancel()
        with pytest.raises(BaseException):
            await dashboard

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        server.stop()


def test_the_dashboard_starts_before_the_bus_waits_and_survives_its_restart(tmp_path):
    """...and a page opened while it waits goes live: its event stream (opened before the bus
    existed) carries a job written once the bus is there."""
    import threading

    from captionbus.contracts import ArtifactRef, JobSpec, JobState, subjects

    seen: list[str] = []
    opened = threading.Event()

    def open_stream(base: str) -> None:
        def read():
            with httpx.stream("GET", f"{base}/api/stream", timeout=httpx.Timeout(5, read=None)) as response:
                assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
                opened.set()
                for line in response.iter_lines():
                    seen.append(line)
        threading.Thread(target=read, daemon=True).start()
        assert opened.wait(10)

    def write_job(base: str, bus: str) -> None:
        deadline = time.monotonic() + 10
        while "event: sync" not in seen:  # subscribed to the board: the page reads its lists again
            assert time.monotonic() < deadline, seen[-5:]
            time.sleep(0.1)

        async def put():
            nc = await connect(bus, "t-writer")
            kv = await nc.jetstream().key_value(subjects.JOBS_BUCKET)
            spec = JobSpec(job_id="job-live", input=ArtifactRef(key="0" * 64, name="a.mp4", size=1))
            await kv.put("job-live", JobState(spec=spec).model_dump_json().encode())
            await nc.close()

        asyncio.run(put())
        deadline = time.monotonic() + 20
        while not any("job-live" in line for line in seen):
            assert time.monotonic() < deadline, seen[-5:]
            time.sleep(0.1)

    _, log = check_waits_for_the_bus(["dashboard"], "/api/jobs", tmp_path,
                                     {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home")},
                                     while_waiting=open_stream, once_ready=write_job)
    assert "connected to the bus" in log


def test_the_read_only_dashboard_never_acts(tmp_path, nats_server):
    """Without an operator token the dashboard changes nothing: every write method on every API
    path is refused (405 in the one error shape; POST on the action routes 403, read-only, even
    with the page's action header), and a job is untouched by the attempts."""
    from captionbus.contracts import ArtifactRef, JobSpec, JobState, subjects

    port = _free_port()
    base = f"http://127.0.0.1:{port}"

    async def main():
        nc = await connect(nats_server, "t-writer")
        await provision(nc.jetstream())
        kv = await nc.jetstream().key_value(subjects.JOBS_BUCKET)
        spec = JobSpec(job_id="job-kept", input=ArtifactRef(key="0" * 64, name="a.mp4", size=1))
        await kv.put("job-kept", JobState(spec=spec).model_dump_json().encode())
        ready = asyncio.Event()
        dashboard = asyncio.create_task(serve_dashboard(nats_server, f"127.0.0.1:{port}", None, ready))
        await asyncio.wait_for(ready.wait(), 30)
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            await _until(lambda: _ok(http, "/readyz"), 20, "ready")
            actions = ("/api/jobs/job-kept/cancel", "/api/jobs/job-kept/retry")
            for path in ("/api/jobs", "/api/jobs/job-kept", *actions, "/api/jobs/job-kept/outputs/srt", "/api/workers",
                         "/api/queues", "/api/charts", "/api/webhooks", "/api/session", "/metrics"):
                for method in ("POST", "PUT", "PATCH", "DELETE"):
                    answer = await http.request(method, path, headers={"X-Captionbus-Action": "1"})
                    expected = (403,) if method == "POST" and path in actions else (404, 405)
                    assert answer.status_code in expected, (method, path, answer.status_code)
                    assert answer.json()["error"]["code"] == answer.status_code
                    if answer.status_code == 403:
                        assert "read-only" in answer.json()["error"]["message"]
            entry = await kv.get("job-kept")
            assert JobState.model_validate_json(entry.value).status.value == "pending" and entry.revision == 1
        dashboard.cancel()
        with contextlib.suppress(BaseException):
            await dashboard
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 90))
