"""How a gateway learns that a job ended: one core-NATS subscription per process, not a consumer per request.

The OpenAI endpoints answer when the job ends. They used to open an ordered JetStream consumer
per request, after publishing `submitted`, filtered on the job's subject: a JetStream API round
trip to create it, then a replay of every event of the job so far (each parsed with pydantic)
before the terminal one, and a consumer delete at the end. Now every gateway process holds three
plain subscriptions, made once when it connects, on `captionbus.job.*.{completed,failed,cancelled}`;
a request registers a future for its job id *before* it publishes `submitted` (the id is made
here, not by `client.submit`), so the terminal event cannot slip by, and no event but the
terminal one is ever delivered to the gateway.

Measured (benchmarks/gateway.py, 8 rounds of one 7.8 s espeak clip on stage-cache hits, 2-core
machine shared with five other builds, so noisy), p50 ms, before -> after this change:
  bus directly (client.submit + follow)    84.0 -> see the benchmark's output
  gateway, openai client                   133.5
  overhead (paired difference)             27.7
  by phase (Server-Timing): form 13.0 (receiving the 344 kB multipart body: the parse itself is
  0.7 ms, measured alone), submit 4.0 (validate, hardlink into the store, publish), job 84.3
  (the coordinator's own work, the same as the direct path's), answer 0.4, and 31.8 ms outside
  the handler (the openai client building the multipart request and parsing the answer, HTTP).
The numbers after the change are in the module docstring of benchmarks/gateway.py and the commit.

Core subscriptions are at-most-once: a terminal event published while the gateway is
reconnecting is not delivered to it. So a waiter also looks at the job's KV record every
`recheck_s` (5 s) and, once the job is terminal there, reads the terminal event from the
stream (the old path): a lost message costs at most `recheck_s`, never a hung request.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from pydantic import ValidationError

from contracts import parse_event, subjects
from contracts.events import TERMINAL_KINDS

log = structlog.get_logger("captionbus.gateway")


class JobEnds:
    """Futures of job ids resolved by the job's first terminal event."""

    def __init__(self, recheck_s: float = 5.0):
        self.recheck_s = recheck_s
        self.waiters: dict[str, list[asyncio.Future]] = {}
        self._nc = None
        self._subs: list = []

    async def attach(self, nc) -> None:
        """Subscribe on `nc` (once per connection; nats-py re-subscribes after reconnects)."""
        if self._nc is nc:
            return
        self._subs = [await nc.subscribe(subjects.job_kind_all_jobs(kind), cb=self._on_event)
                      for kind in sorted(TERMINAL_KINDS)]
        self._nc = nc

    async def _on_event(self, msg) -> None:
        try:
            event = parse_event(msg.data)
        except (ValueError, ValidationError):
            return
        for future in self.waiters.pop(event.job_id, []):
            if not future.done():
                future.set_result(event)

    @contextlib.contextmanager
    def expect(self, job_id: str):
        """A future for `job_id`'s terminal event; register before the job is submitted."""
        future = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(job_id, []).append(future)
        try:
            yield future
        finally:
            waiting = self.waiters.get(job_id)
            if waiting and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self.waiters[job_id]

    async def wait(self, future: asyncio.Future, is_terminal: Callable[[], Awaitable[bool]],
                   replay: Callable[[], Awaitable[object]]):
        """The terminal event: from the subscription, or, once `is_terminal()` says the job
        ended (checked every `recheck_s`), from `replay()` (the job's stream)."""
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.recheck_s)
            except TimeoutError:
                if await is_terminal():
                    log.info("terminal event not seen on the subscription; read from the stream")
                    return await replay()
