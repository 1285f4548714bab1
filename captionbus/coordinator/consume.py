"""Pulling one partition's events as they are stored: a consume loop over a JetStream pull consumer.

Why (issue 22, job ownership: leases.py). Each partition has its own durable consumer on
CB_EVENTS, and a coordinator holds several (all of them when alone). nats-py has no consume loop, only
`fetch`, and its fetch of a batch waits out its whole timeout for the rest of the batch once a
first message came, so the coordinator used to keep one `fetch(batch=1)` waiting per event it
could hold: 16 on the one events consumer before job ownership. Spread over 16 partition
consumers (the first count of partitions) that was one waiting pull each, and a lone coordinator
then cost more than it did on one consumer (benchmarks/fleet_sim.py --hops, one nats-server, side by side with the code before
job ownership: coordinator CPU 1.58-1.87 against 1.13-1.40 ms a hop, the server's 1.08-1.17
against 0.44-0.50): a partition's next event found no pull waiting, one job's events and another's
of the same partition were taken one at a time, and every event cost a pull request of its own.
More single-message pulls per partition closed the gap (256 in all: the same cost as before, in
one turn) but each one expires and is asked again every second while idle. With this loop one
coordinator of 16 partitions cost 1.19-1.31 ms a hop against 1.13-1.19, its server 0.63-0.75
against 0.44-0.48 (the rest is per consumer: subjects.PARTITIONS says why 8).

So this keeps *credit* outstanding instead, as the JetStream clients that have a consume loop do
(nats.go's Consume): one pull request for up to `in_hand` messages, which the server fills as events
are stored, each handed at once to its own task; when the events in hand and the credit still
outstanding fall to half of `in_hand`, one more request tops the credit up. A request lasts
EXPIRES_S; the server answers its end (408, or 409 for a consumer deleted, a leader change, too
many waiting requests) with a status message on the same inbox, and requests end in the order they
were made (the server serves its waiting requests in order), so the credit is counted per request,
oldest first. A request whose end never came (a reconnect lost it) is dropped EXPIRES_S + GRACE_S
after it was made. What this holds at a stop: the events in hand finish (the caller's bound);
those delivered and not yet handed to a task are nak'ed, so the partition's next holder gets them
at once rather than after the ack wait.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("captionbus.coordinator.consume")

# A pull request's life: an idle partition asks again this often; a request the server lost (it
# restarted) is given up EXPIRES_S + GRACE_S after it was made, and the partition waits that long.
EXPIRES_S = 5.0
GRACE_S = 1.0


class PullConsumer:
    """Consume `stream`'s durable `consumer` on `nc`, handling up to `in_hand` messages at once
    with `handle` (each in its own task), until `stop` is set."""

    def __init__(self, nc: Any, stream: str, consumer: str, in_hand: int,
                 handle: Callable[[Any], Awaitable[None]], stop: asyncio.Event, what: str = "events"):
        self.nc, self.stream, self.consumer = nc, stream, consumer
        self.in_hand = max(1, in_hand)
        self.handle, self.stop, self.what = handle, stop, what
        self.requests: deque[list[float | int]] = deque()  # [made at (monotonic), credit left], oldest first
        self.running: set[asyncio.Task] = set()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.unhandled: list[Any] = []
        self._wake = asyncio.Event()

    def credit(self) -> int:
        return sum(int(left) for _, left in self.requests)

    async def run(self) -> None:
        reply = self.nc.new_inbox()
        sub = await self.nc.subscribe(reply, cb=self._on_msg)
        api = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"
        stopping = asyncio.create_task(self.stop.wait())
        try:
            while not self.stop.is_set():
                self._expire()
                want = self.in_hand - len(self.running) - self.credit()
                if want > 0 and (want * 2 >= self.in_hand or not self.requests):
                    body = json.dumps({"batch": want, "expires": int(EXPIRES_S * 1e9)}).encode()
                    try:
                        await self.nc.publish(api, body, reply=reply)
                        self.requests.append([time.monotonic(), want])
                    except Exception as e:  # reconnecting: try again shortly
                        log.warning(f"pulling {self.what} failed", consumer=self.consumer, error=repr(e))
                        await asyncio.sleep(0.5)
                        continue
                while not self.inbox.empty():
                    self._take(self.inbox.get_nowait())
                self._wake.clear()
                if not self.inbox.empty():
                    continue
                waited = asyncio.create_task(self._wake.wait())
                await asyncio.wait({waited, stopping}, timeout=EXPIRES_S / 2, return_when=asyncio.FIRST_COMPLETED)
                waited.cancel()
        finally:
            stopping.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if self.running:
                await asyncio.wait(self.running)
            while not self.inbox.empty():
                self.unhandled.append(self.inbox.get_nowait())
            for msg in self.unhandled:  # delivered, never handled: to the next holder now
                if not _status(msg):
                    with contextlib.suppress(Exception):
                        await msg.nak()

    async def _on_msg(self, msg: Any) -> None:
        await self.inbox.put(msg)
        self._wake.set()

    def _take(self, msg: Any) -> None:
        status = _status(msg)
        if status is not None:
            if status == "100":  # a heartbeat (none asked)
                return
            if status in ("408", "404") and self.requests:  # the oldest request ended
                self.requests.popleft()
            elif status == "409":  # every request ended (consumer deleted, leader change, ...)
                self.requests.clear()
            return
        if self.requests:
            self.requests[0][1] -= 1
            if self.requests[0][1] <= 0:
                self.requests.popleft()
        if self.stop.is_set():
            self.unhandled.append(msg)  # nak'ed on the way out
            return
        task = asyncio.create_task(self._handle(msg))
        self.running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        self._wake.set()

    async def _handle(self, msg: Any) -> None:
        try:
            await self.handle(msg)
        except Exception as e:  # e.g. an ack or nak lost in a reconnect: the server redelivers
            log.exception(f"handling one of the {self.what} failed; it will be redelivered",
                          subject=getattr(msg, "subject", None), error=repr(e))

    def _expire(self) -> None:
        now = time.monotonic()
        while self.requests and now - self.requests[0][0] > EXPIRES_S + GRACE_S:
            self.requests.popleft()


def _status(msg: Any) -> str | None:
    """A JetStream status message's code (no data, a Status header), or None for a message."""
    headers = getattr(msg, "headers", None) or {}
    status = headers.get("Status")
    return status if status and not msg.data else None
