"""`captionbus run` joins the `captionbus up` on its host when up's workers serve every stage of
the job (captionbus.stack.up_serving), and starts its own stack otherwise: a real nats-server
whose URL is in the data dir, as `up` leaves it, and stage workers' real $SRV micro services
(nats.micro, with the metadata and STATS data a worker registers: services/runtime/serve.py).
A real `run` joining a real `up` is tests/e2e/test_translate_subtitle.py's (hindi_runs)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats.micro
import pytest

from captionbus.client import workers
from captionbus.contracts.subjects import micro_service_name
from captionbus.contracts.workers import WorkerInfo, WorkerState
from captionbus.core.bus import connect
from captionbus.core.settings import Settings
from captionbus.runner import start_stage_services
from captionbus.services.runtime.info import flat_metadata
from captionbus.stack import RUN_LAUNCHER, UP_LAUNCHER, stop_services, up_serving, wait_ready


async def register(nc, stage: str, setup_error: str | None = None, launcher: str | None = UP_LAUNCHER):
    """A stage worker's $SRV service: WorkerInfo in its metadata, WorkerState in its STATS;
    `launcher` as the worker reads it from CAPTIONBUS_LAUNCHER (`up` sets it on its services)."""
    info = WorkerInfo(stage=stage, env="common", interpreter="/x/python", python_version="3.11", host="h", pid=1,
                      worker_id=f"h/{stage}/0/1", launcher=launcher)
    state = WorkerState(state="idle" if setup_error is None else "setup_failed", setup_error=setup_error)
    service = await nats.micro.add_service(nc, name=micro_service_name(stage), version="1.0.0",
                                           metadata=flat_metadata(info),
                                           stats_handler=lambda _endpoint: state.model_dump(mode="json"))

    async def answer(request) -> None:
        await request.respond(b"{}")

    await service.add_endpoint(name="info", subject=f"test.info.{stage}", handler=answer)
    return service


def test_run_joins_the_local_up_only_when_it_serves_every_stage(nats_server: str, captionbus_home: Path):
    settings = Settings(home=captionbus_home)
    assert up_serving(settings, ["demux"]) is None  # no `up` here
    settings.embedded_url_file.parent.mkdir(parents=True)
    settings.embedded_url_file.write_text(nats_server)

    async def go() -> None:
        nc = await connect(nats_server, "test-workers")
        try:
            for stage in ("demux", "vad", "mux"):
                await register(nc, stage)
            await register(nc, "asr", setup_error="no model at /nowhere")
            await nc.flush()

            def joins(stages: list[str]) -> str | None:
                return up_serving(settings, stages)

            assert await asyncio.to_thread(joins, ["demux", "vad", "mux"]) == nats_server
            assert await asyncio.to_thread(joins, ["demux", "subtitle_gen"]) is None  # nobody serves one
            assert await asyncio.to_thread(joins, ["demux", "asr"]) is None  # its only worker cannot serve
            # Services another `run` started on up's bus (they stop with that run), and a
            # `captionbus serve` by hand: not up's, so a job that needs them runs its own stack.
            await register(nc, "subtitle_gen", launcher="run")
            await register(nc, "transcript_join", launcher=None)
            await nc.flush()
            assert await asyncio.to_thread(joins, ["demux", "subtitle_gen"]) is None
            assert await asyncio.to_thread(joins, ["demux", "transcript_join"]) is None
            assert await asyncio.to_thread(joins, ["demux", "vad", "mux"]) == nats_server  # up's own still join
            fleet = Settings(home=captionbus_home, nats_url=nats_server)
            assert await asyncio.to_thread(up_serving, fleet, ["demux"]) is None  # a NATS_URL fleet: never
        finally:
            await nc.close()

    asyncio.run(go())
    # `up` gone, its URL file left behind: run starts its own stack.
    settings.embedded_url_file.write_text("nats://127.0.0.1:1")
    assert up_serving(settings, ["demux"]) is None


@pytest.mark.usefixtures("common_env")
def test_a_real_up_is_joined_for_its_own_workers_and_not_for_a_runs_on_its_bus(captionbus_home: Path):
    """The whole chain: `captionbus up` starts its services with CAPTIONBUS_LAUNCHER=up, each
    reports it in its $SRV metadata, and up_serving counts those. A service `run` started on the
    same bus (runner.start_stage_services, as run's own stack starts it) says `run`: before, it
    counted, and a job joined up for a stage whose only worker stopped with that run."""
    settings = Settings(home=captionbus_home)
    env = {**os.environ, "CAPTIONBUS_HOME": str(captionbus_home)}
    env.pop("NATS_URL", None)
    up = subprocess.Popen([sys.executable, "-m", "captionbus", "up", "--stages", "subtitle_gen", "--log-format",
                           "human"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    services = []
    try:
        said = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "serving subtitle_gen (env common)" not in said:
            said.append(up.stderr.readline().rstrip("\n"))
            assert up.poll() is None, said
        url = settings.embedded_url_file.read_text().strip()
        assert up_serving(settings, ["subtitle_gen"]) == url

        services = start_stage_services(settings, url, ["transcript_join"])  # another `run`'s, on up's bus

        async def ready() -> list[dict]:
            nc = await connect(url, "test-ready")
            try:
                await wait_ready(nc, services, timeout=120)
                return await workers(nc, 1.0)
            finally:
                await nc.close()

        launchers = {w["metadata"]["stage"]: w["metadata"].get("launcher") for w in asyncio.run(ready())}
        assert launchers == {"subtitle_gen": UP_LAUNCHER, "transcript_join": RUN_LAUNCHER}
        assert up_serving(settings, ["subtitle_gen", "transcript_join"]) is None
        assert up_serving(settings, ["subtitle_gen"]) == url
    finally:
        stop_services(services)
        up.send_signal(signal.SIGINT)
        try:
            up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.communicate()
