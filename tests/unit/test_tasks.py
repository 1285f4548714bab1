"""captionbus.core.tasks: a cancellation lost by Python 3.11's asyncio.wait_for (the cause of
tests/system/test_model.py's restart-dashboard hang), cancel_and_wait that ends such a task
anyway, and await_stack (where a task waits, through its whole await chain)."""
from __future__ import annotations

import asyncio
import sys

import pytest

from captionbus.core.tasks import await_stack, cancel_and_wait


async def waits_for_a_reply(reply: asyncio.Future, ran_on: list[str]) -> None:
    """A poll like the dashboard's: a request (nats-py awaits its reply through wait_for), again."""
    while True:
        await asyncio.wait_for(reply, 10)
        ran_on.append("after its cancellation")
        await asyncio.sleep(3600)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12's wait_for keeps the cancellation")
def test_a_cancellation_that_meets_its_reply_is_lost_and_cancel_and_wait_still_ends_the_task():
    async def main():
        reply = asyncio.get_running_loop().create_future()
        ran_on: list[str] = []
        task = asyncio.create_task(waits_for_a_reply(reply, ran_on))
        await asyncio.sleep(0)
        reply.set_result(b"{}")  # the reply arrives ...
        task.cancel()  # ... as the poll is cancelled (Board.stop)
        await asyncio.sleep(0.05)
        lost = not task.done() and ran_on == ["after its cancellation"]  # `await task` would wait forever
        left = await cancel_and_wait([task], within_s=2, retry_s=0.05)
        return lost, left, task.cancelled()

    assert asyncio.run(main()) == (True, set(), True)


def test_cancel_and_wait_is_bounded_and_raises_its_callers_cancellation():
    async def deaf() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # never ends

    async def main():
        task = asyncio.create_task(deaf())
        await asyncio.sleep(0)
        left = await cancel_and_wait([task], within_s=0.3, retry_s=0.05)
        waiting = asyncio.create_task(cancel_and_wait([task]))  # no bound: until cancelled
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        task.get_coro().close()  # a coroutine that never ends: not left for the loop's shutdown
        return left == {task}

    assert asyncio.run(main())


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
