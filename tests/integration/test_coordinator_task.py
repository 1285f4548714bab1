"""runner.coordinator_task (run's and up's in-process coordinator) ends the coordinator with its
caller: a caller cancelled while it waits for the coordinator's own end (a second Ctrl-C) cancels
the coordinator too, within cancel_and_wait's bound, and its cancellation goes on. Before
(50c6ee6), the caller's CancelledError left the coordinator running on its own (on a bus that does
not answer: until its requests time out, or up to Coordinator.stop's 15 s) after `run` had given up
on it.

A real nats-server, stopped with SIGSTOP (a host under memory pressure, a paused VM) before the
coordinator starts: its start waits on the bus (a stop set meanwhile is read once it has started),
and the caller is cancelled twice, as `run` is by two Ctrl-Cs."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from captionbus.core.bus import connect, provision
from captionbus.core.tasks import await_stack
from captionbus.runner import coordinator_task
from captionbus.server import EmbeddedServer

PACKAGE = str(Path(__file__).resolve().parents[2] / "captionbus")


def captionbus_tasks() -> set[asyncio.Task]:
    """The running tasks whose coroutine is captionbus code (not nats-py's own readers)."""
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current and not t.done()
            and getattr(t.get_coro(), "cr_code", None) is not None
            and t.get_coro().cr_code.co_filename.startswith(PACKAGE)}


@pytest.mark.timeout(120)
def test_a_caller_cancelled_while_the_coordinator_stops_cancels_it_and_leaves_no_task(
        tmp_path: Path, captionbus_home: Path):
    server = EmbeddedServer(tmp_path / "nats")
    server.start()

    async def go() -> None:
        nc = await connect(server.url, "test-coordinator-task")
        paused = False
        try:
            js = nc.jetstream()
            await provision(js)
            before = captionbus_tasks()
            entered: list[asyncio.Task] = []

            async def caller() -> None:
                async with coordinator_task(nc) as coordinator:
                    entered.append(coordinator)
                    await asyncio.Event().wait()  # `run` following its job

            os.kill(server.process.pid, signal.SIGSTOP)
            paused = True
            outer = asyncio.create_task(caller())
            while not entered:
                await asyncio.sleep(0.05)
            coordinator = entered[0]
            outer.cancel()  # Ctrl-C: coordinator_task sets stop and waits for the coordinator's own end
            await asyncio.sleep(1.0)
            assert not coordinator.done(), "the coordinator ended at once: the bus pause did not hold its start"
            loop = asyncio.get_running_loop()
            started = loop.time()
            outer.cancel()  # a second Ctrl-C
            await asyncio.wait({outer}, timeout=20)
            took = loop.time() - started
            assert outer.done() and outer.cancelled()  # the caller's cancellation went on
            assert coordinator.done(), "the caller ended and left its coordinator running:\n" + await_stack(coordinator)
            left = captionbus_tasks() - before
            assert not left, "\n".join(await_stack(t) for t in left)
            assert took < 7, took  # cancel_and_wait's 5 s bound
        finally:
            if paused:
                os.kill(server.process.pid, signal.SIGCONT)
            await nc.close()

    try:
        asyncio.run(go())
    finally:
        server.stop()

