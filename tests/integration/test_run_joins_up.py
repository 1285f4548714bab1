"""`captionbus run` joins the `captionbus up` on its host when up's workers serve every stage of
the job (captionbus.stack.up_serving), and starts its own stack otherwise: a real nats-server
whose URL is in the data dir, as `up` leaves it, and stage workers' real $SRV micro services
(nats.micro, with the metadata and STATS data a worker registers: services/runtime/serve.py).
A real `run` joining a real `up` is tests/e2e/test_translate_subtitle.py's (hindi_runs)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import nats.micro

from captionbus.contracts.subjects import micro_service_name
from captionbus.contracts.workers import WorkerInfo, WorkerState
from captionbus.core.bus import connect
from captionbus.core.settings import Settings
from captionbus.services.runtime.info import flat_metadata
from captionbus.stack import up_serving


async def register(nc, stage: str, setup_error: str | None = None):
    """A stage worker's $SRV service: WorkerInfo in its metadata, WorkerState in its STATS."""
    info = WorkerInfo(stage=stage, env="common", interpreter="/x/python", python_version="3.11", host="h", pid=1,
                      worker_id=f"h/{stage}/0/1")
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
            fleet = Settings(home=captionbus_home, nats_url=nats_server)
            assert await asyncio.to_thread(up_serving, fleet, ["demux"]) is None  # a NATS_URL fleet: never
        finally:
            await nc.close()

    asyncio.run(go())
    # `up` gone, its URL file left behind: run starts its own stack.
    settings.embedded_url_file.write_text("nats://127.0.0.1:1")
    assert up_serving(settings, ["demux"]) is None
