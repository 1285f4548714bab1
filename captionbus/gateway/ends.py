"""How a gateway learns that a job ended: one core-NATS subscription per process, not a consumer per request.

The OpenAI endpoints answer when the job ends. They used to open an ordered JetStream consumer
per request, after publishing `submitted`, filtered on the job's subject: a JetStream API round
trip to create it, then a replay of every event of the job so far (each parsed with pydantic)
before the terminal one, and a consumer delete at the end. Now every gateway process holds three
plain subscriptions, made once when it connects, on `captionbus.job.*.{completed,failed,cancelled}`;
a request registers a future for its job id *before* it publishes `submitted` (the id is made
here, not by `client.submit`), so the terminal event cannot slip by, and no event but the
terminal one is ever delivered to the gateway.

Measured (benchmarks/gateway.py --clients 0 --upload-mb 0 --overhead-rounds 20: one 7.8 s espeak
clip, every stage a stage-cache hit, paired rounds), the code before this change and after it run
back to back on the same 2-core machine (load average ~6 from five other builds), p50 (p95) ms:
                                         before          after
  bus directly (submit + follow)       36.5 (59.1)     36.5 (46.0)
  gateway, openai client               54.1 (63.5)     39.2 (54.5)
  gateway overhead (paired difference) 16.2 (28.4)      3.8 (13.9)    ratio gateway/bus 1.48 -> 1.08
  HTTP floor (same upload answered 400)     -           9.7 (14.3)
  by phase (Server-Timing): form 5.2 -> 2.5, submit 5.8 -> 3.2, job 35.0 -> 29.0, answer 0.5 -> 0.3,
  outside the handler 7.6 -> 4.2.
Under heavier load (average 8-10) the after-numbers spread wider: overhead p50 2.5, 18.6, 7.0 ms
in three runs of 10-20 rounds (27.7 and 62 ms before, in earlier single runs).
Where the time goes now: the job phase is shorter than the direct path's submit + follow (29.0 vs
36.5, of which the submit is ~3), i.e. the per-request consumer cost 5-6 ms here; what is left of the
overhead is the HTTP floor, which any HTTP door pays: the openai client building the multipart
request and parsing the answer, the 344 kB body crossing a socket in 64 kB chunks (the form
phase; its parse alone is 0.7 ms, measured apart), and uvicorn/FastAPI (pure-Python h11 and
asyncio: uvloop/httptools are not installed here). Nothing in the gateway polls or sleeps on
the request's path; the upload is parsed as it arrives and hardlinked into the artifact store.

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

from captionbus import client
from captionbus.gateway import shown
from captionbus.contracts import parse_event, subjects
from captionbus.contracts.events import TERMINAL_KINDS

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
        self._subs = [await nc.subscribe(subject, cb=self._on_event)
                      for kind in sorted(TERMINAL_KINDS) for subject in subjects.job_kind_all_jobs(kind)]
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


# The job's history until its real end: the CLI's (`events ID --follow`, captionbus.client.job_events,
# which says why) for the SSE endpoint and webhook deliveries too.
async def job_events(js, job_id: str, after: int = 0, **options):
    """client.job_events with each event's error lines as an API key is shown them (gateway.shown):
    the SSE stream, webhook deliveries and the OpenAI endpoints' replay read events through it."""
    async for seq, event in client.job_events(js, job_id, after, **options):
        yield seq, shown.event(event)
