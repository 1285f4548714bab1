"""Two replicas of one stage on a one-core host (one home, one load slot) against a real
nats-server: they load their models one after the other, and the one waiting for its slot takes
no request, so a request goes to the replica that loads first and runs as soon as its model is
up (captionbus/services/runtime/setup_turn.py)."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

from tests.integration.test_runtime import run
from tests.integration.test_stage_cache import UPPER, complete


def test_replicas_on_one_host_load_one_at_a_time_and_a_waiting_one_takes_no_request(
        nats_server: str, captionbus_home: Path, tmp_path: Path, monkeypatch):
    from captionbus.core.bus import StagePolicy
    from captionbus.services.runtime import setup_turn
    from captionbus.services.runtime.serve import serve

    monkeypatch.setattr(setup_turn, "usable_cores", lambda: 1)  # a one-core host: one load slot

    gates = {"a": threading.Event(), "b": threading.Event()}
    log: list[str] = []

    def setup_of(name: str):
        def setup(ctx):
            log.append(f"{name} loads")
            gates[name].wait(60)
            log.append(f"{name} loaded")
            return {"model": name}
        return setup

    source = tmp_path / "in.txt"
    source.write_text("namaste")

    async def body(bus):
        async def start(name: str):
            definition = dataclasses.replace(UPPER, setup=setup_of(name), describe_model=lambda r: r and r["model"])
            stop = asyncio.Event()
            task = asyncio.create_task(serve(definition, bus.settings, bus.url, env_name="test", stop=stop,
                                             replica_id=name, policy=StagePolicy(ack_wait=2.0, max_deliver=3)))
            return task, stop

        async def until(predicate, timeout=20.0):
            async with asyncio.timeout(timeout):
                while not predicate():
                    await asyncio.sleep(0.05)

        a, stop_a = await start("a")
        await until(lambda: log == ["a loads"])
        b, stop_b = await start("b")
        await asyncio.sleep(1.0)
        assert log == ["a loads"], "b loaded while a did"
        # A request now: b waits for its turn and does not take it; a takes it and runs it
        # as soon as its model is up.
        pending = asyncio.create_task(complete(bus, "j0001", await bus.store.put(source, name="in.txt"),
                                               {"cache": "false"}))
        await asyncio.sleep(1.0)
        gates["a"].set()
        done = await asyncio.wait_for(pending, 30)
        assert done.worker["replica"] == "a", done.worker  # both run in this process: the replica tells them apart
        await until(lambda: log[:3] == ["a loads", "a loaded", "b loads"])  # then b's turn
        gates["b"].set()
        await until(lambda: log == ["a loads", "a loaded", "b loads", "b loaded"])
        for stop, task in ((stop_a, a), (stop_b, b)):
            stop.set()
            await task

    run(nats_server, captionbus_home, body)
