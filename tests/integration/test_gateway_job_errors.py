"""A job's error line, as an API key reads it through the gateway, names no filesystem path of
the worker (its home, its user name, the layout of its artifact root): the job, the node, the SSE
failure events (gateway.shown); the job's record on the bus and the worker's log keep the whole
line for the operator.

Real parts: a nats-server, the coordinator, the gateway (uvicorn), and the demux stage's own
service (captionbus.services.demux, real ffmpeg) on a host of its own (its own data dir). The
job's input is gone from the object store before the worker reads it, as retention or gc leaves
a job that waited too long for a worker: the store's error names this host's artifact root."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx

from captionbus.client import job_state
from captionbus.contracts import subjects
from captionbus.core.bus import StagePolicy, connect
from captionbus.core.settings import Settings
from captionbus.gateway.app import GatewayConfig
from captionbus.gateway.keys import KeyRing, add_key
from captionbus.services.demux.stage import STAGE as DEMUX
from captionbus.services.runtime.serve import serve
from tests.gatewaytools import running_gateway
from tests.integration.test_gateway import coordinator, parse_sse, wait_status  # noqa: F401  (a fixture)


def demux_worker(url: str, home: Path, done: threading.Event) -> threading.Thread:
    """The demux service on `url`, as host `wk` with data dir `home`, until `done` is set."""

    def run() -> None:
        async def go() -> None:
            stop = asyncio.Event()
            settings = Settings(home=home, nats_url=url, artifacts_mode="object", host_id="wk")
            task = asyncio.create_task(serve(DEMUX, settings, url, env_name="common", stop=stop, retry_delay_s=0.2,
                                             policy=StagePolicy(ack_wait=5.0, max_deliver=2)))
            while not done.is_set() and not task.done():
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(task, 15)

        asyncio.run(go())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_keys_job_error_names_no_path_of_the_worker_and_the_workers_log_does(tmp_path: Path, coordinator: str,  # noqa: F811
                                                                               capfd):
    key = add_key(tmp_path / "keys", "alice")
    config = GatewayConfig(settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object",
                                             host_id="gw"),
                           nats_url=coordinator, keys=KeyRing.load(tmp_path / "keys"))
    worker_home = tmp_path / "worker-home"
    done = threading.Event()
    with running_gateway(config) as url:
        alice = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        created = alice.post("/v1/jobs", files={"file": ("talk.wav", b"RIFF upload")},
                             data={"workflow": "transcribe", "source_language": "en"})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        async def purge() -> None:  # retention emptied the store while the job waited for a worker
            nc = await connect(coordinator, "test-retention")
            await nc.jetstream().purge_stream(f"OBJ_{subjects.ARTIFACTS_BUCKET}")
            await nc.close()

        asyncio.run(purge())
        worker = demux_worker(coordinator, worker_home, done)
        try:
            job = wait_status(alice, job_id, {"failed"}, timeout=90)
        finally:
            done.set()
            worker.join(20)
        with alice.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            events = parse_sse(response.iter_lines())

    async def record() -> str:
        nc = await connect(coordinator, "test-operator")
        try:
            return (await job_state(nc.jetstream(), job_id)).nodes["demux"].error
        finally:
            await nc.close()

    operators = asyncio.run(record())
    log = capfd.readouterr().out

    node = job["nodes"]["demux"]
    failed = [e["data"] for e in events if e["event"] in ("stage_failed", "failed")]
    lines = [job["error"], node["error"], *failed]
    assert all(lines) and len(failed) == 2, (lines, [e["event"] for e in events])
    for line in lines:
        assert str(tmp_path) not in line and "/tmp" not in line, line
    assert "ArtifactMissing" in node["error"] and "artifact root (…/artifacts)" in node["error"], node["error"]
    # The operator's: the record (`captionbus status`, the dashboard) and the worker's log have the
    # whole line, the artifact root under the worker's data dir.
    assert "ArtifactMissing" in operators and str(worker_home / "artifacts") in operators, operators
    assert "ArtifactMissing" in log and str(worker_home) in log, log[-3000:]
