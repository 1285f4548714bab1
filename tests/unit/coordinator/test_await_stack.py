"""await_stack: where a task waits, through its whole await chain (the watchdog of
tests/system/test_model.py and Coordinator.stop's log of a task that ignores its cancellation)."""
from __future__ import annotations

import asyncio

from captionbus.coordinator.service import await_stack


async def innermost(event: asyncio.Event) -> None:
    await event.wait()


async def middle(event: asyncio.Event) -> None:
    await innermost(event)


def test_await_stack_follows_the_await_chain_to_what_the_innermost_coroutine_waits_for():
    async def main():
        event = asyncio.Event()
        task = asyncio.create_task(middle(event), name="stuck-here")
        await asyncio.sleep(0.01)
        stack = await_stack(task)
        event.set()
        await task
        return stack

    lines = asyncio.run(main()).splitlines()
    assert lines[0] == "task stuck-here:"
    assert [line.rsplit(" in ", 1)[-1] for line in lines[1:4]] == ["middle", "innermost", "wait"]
    assert lines[4].startswith("  awaiting ")  # a future (its iterator)
