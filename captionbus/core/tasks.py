"""Ending asyncio tasks for sure, and saying where one waits.

On Python 3.11 a cancellation can be lost: `asyncio.wait_for` that is cancelled in the same turn of
the loop as the future it awaits completes returns that future's result and drops the
cancellation (fixed in 3.12, whose wait_for is built on asyncio.timeout). nats-py awaits every
request and every fetch through wait_for, so a task cancelled while its request's reply arrives
runs on. `cancel(); await task` then waits forever: tests/system/test_model.py hung 300 s (and once
751 s) in restart-dashboard, in the dashboard's Board.stop, whose worker poll (`$SRV STATS`, a
stream info, a consumer info every 2 s) had lost its cancellation and kept polling
(`tests/unit/test_tasks.py` shows the race). `cancel_and_wait` cancels again while a task goes on.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task], within_s: float | None = None,
                          retry_s: float = 0.5) -> set[asyncio.Task]:
    """Cancel `tasks` and wait for them to end, cancelling again every `retry_s` those still
    running (a lost cancellation: see the module); the ones still running after `within_s` (None:
    no bound) are returned. What the tasks raise, their cancellations included, is not raised
    here (asyncio.wait); the caller's own cancellation is, after the tasks are cancelled again."""
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = None if within_s is None else loop.time() + within_s
    try:
        while pending:
            for task in pending:
                task.cancel()
            wait_s = retry_s if deadline is None else min(retry_s, deadline - loop.time())
            if wait_s <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=wait_s)
    except asyncio.CancelledError:
        for task in pending:
            task.cancel()
        raise
    return pending


def await_stack(task: asyncio.Task) -> str:
    """Where `task` waits: every coroutine of its await chain (file, line, function), then what the
    innermost awaits. Task.print_stack shows only the task's own coroutine's frame while it is
    suspended (the frames it awaits through are on cr_await, which it does not follow)."""
    lines, awaited = [f"task {task.get_name()}:"], task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is None:
            lines.append(f"  awaiting {awaited!r}")
            break
        lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}')
        awaited = (getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
                   or getattr(awaited, "ag_await", None))
    return "\n".join(lines)
