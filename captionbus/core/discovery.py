"""Which stage workers are there: one ask of `$SRV STATS` (ADR-32 micro services), read the same
way by every reader — `captionbus workers`, the dashboard's Workers page, /api/queues and
/metrics, the gateway's model list, a worker looking for healthy replicas, and the coordinator's
count of live replicas that sizes a film's chunk window (`Census`).

Why the coordinator no longer gathers replies for a fixed 0.25 s: a worker answers STATS from its
own event loop, and under load (load average 20-30 on 2 cores) that loop gets the CPU late; a live
asr worker answered after the window and was counted as 0 for a moment, which shrank a film's
chunk window to 1 (and a listing said it was gone). Now:
- every ask ends at once when the server answers "no responders" (a 503 status: nothing
  subscribes to the subject, nobody will answer), so discovery stays quick with no workers;
- a Census count waits up to `COUNT_WAIT_S` (2 s) for every worker it counted last time, and at
  least `NEW_WORKER_S` (1 s) from the ask for one it has not counted yet, then ends `QUIET_S`
  after the last reply. Without that floor a slow worker answering beside a quick one was never
  counted: once the known ones had answered, the count ended 0.25 s after the quick one (a
  review's run: one worker answering at once, one after 0.6 s, four counts of 1);
- a worker the Census counted stays counted through one ask it misses (`TOLERATED_MISSES`): one
  slow answer does not take it out of the window; a second miss in a row, or "no responders",
  does. A worker that stops is out of the window two counts later (6-8 s at the coordinator's
  2 s interval: each count waits up to 2 s for it), or at once when it was its stage's last;
  counted a little long, it costs one more request queued per film for those seconds, where
  counted out it cost the film its fan-out.
Measured (tests/integration/test_coordinator.py): a replica whose STATS answer takes 0.6 s is
counted by a first count and by the next one, beside one that answers at once; a count with
nothing answering took 0.002 s. `captionbus workers` and the dashboard keep their own waits (1 s; 0.5 s
a poll, with a worker unseen for 10 s shown `lost`) over the same ask.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from captionbus.contracts import subjects
from captionbus.core.bus import BusError
from captionbus.core.text import one_line

QUIET_S = 0.25  # an ask ends this long after the last reply, once every expected worker answered
COUNT_WAIT_S = 2.0  # how long the Census waits for a worker it counted last time
NEW_WORKER_S = 1.0  # and at least this long for one it has not counted yet
TOLERATED_MISSES = 1  # asks a counted worker may miss in a row and stay counted
# The most slots one worker's $SRV metadata may claim (asr's `workers` option allows 64): a
# worker's word sizes windows, and decide() caps each window at max_in_flight as well.
MAX_WORKER_SLOTS = 64


def no_responders(msg: Any) -> bool:
    """Whether `msg` is the server's "no responders" status (nothing subscribes to the subject)."""
    return not msg.data and (getattr(msg, "headers", None) or {}).get("Status") == "503"


async def ask(nc: Any, subject: str, timeout: float = 1.0, *,
              until: Callable[[list[dict]], bool] | None = None, quiet_s: float | None = None,
              expect: Callable[[list[dict]], bool] | None = None,
              min_s: float = 0.0) -> tuple[list[dict], bool]:
    """Publish once on `subject` and gather every JSON reply (many services answer $SRV.*);
    (replies, nobody), `nobody` when the server said nothing subscribes to `subject`. The
    gathering ends at that answer, when `until(replies so far)` holds, `quiet_s` after the last
    reply (when given; once `expect(replies so far)` holds, if given, and never before `min_s`
    from the ask), or at `timeout`.
    BusError when the server refused the ask or its inbox to this login: no reply would come,
    and an empty list would read as "no workers". The server's -ERR lands in nats-py's
    `last_error`; it usually comes before the flush's PONG, but not always (1 run in 3 here), so
    it is looked for again after the wait for replies."""
    replies: list[dict] = []
    nobody = False
    inbox = nc.new_inbox()
    seen = nc.last_error

    async def check_refused() -> None:
        refused = nc.last_error
        if refused is not seen and refused is not None and "permissions violation" in str(refused).lower() \
                and any(f'"{name.lower()}"' in str(refused).lower() for name in (subject, inbox)):  # quoted, lowercased by nats-py
            raise BusError(f"this login may not ask {subject} (the server refused it: {one_line(str(refused))}); "
                           "ask with a login whose role may (the dashboard's, an operator's)")

    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        await nc.flush(timeout=max(timeout, 2.0))
        await check_refused()
        asked = time.monotonic()
        deadline = asked + timeout
        messages = sub.messages.__aiter__()
        while (left := deadline - time.monotonic()) > 0:
            quiet = bool(replies) and quiet_s is not None and (expect is None or expect(replies))
            wait = max(quiet_s or 0.0, asked + min_s - time.monotonic()) if quiet else left
            try:
                msg = await asyncio.wait_for(messages.__anext__(), min(left, wait))
            except TimeoutError:
                if quiet and time.monotonic() >= asked + min_s - 0.001:
                    break
                continue
            except StopAsyncIteration:  # the subscription ended (the connection closed)
                break
            if no_responders(msg):
                nobody = True
                break
            with contextlib.suppress(ValueError):
                replies.append(json.loads(msg.data))
            if until is not None and until(replies):
                break
        if not replies:
            await check_refused()
    finally:
        with contextlib.suppress(Exception):  # a closed connection: nothing left to unsubscribe
            await sub.unsubscribe()
    return replies, nobody


async def collect_replies(nc: Any, subject: str, timeout: float = 1.0,
                          until: Callable[[list[dict]], bool] | None = None) -> list[dict]:
    """Every JSON reply to one ask of `subject` within `timeout` (`ask`: at once when nothing
    subscribes to it), or until `until(replies so far)` holds."""
    return (await ask(nc, subject, timeout, until=until))[0]


def merge_state(reply: dict) -> dict:
    """A $SRV STATS reply with its worker state (contracts.WorkerState, the endpoint's `data`)
    as `state`, and the facts that become known after registration (the loaded model, setup's
    error) merged into `metadata`, where readers of $SRV INFO found them before."""
    data = next((e.get("data") for e in reply.get("endpoints") or [] if isinstance(e.get("data"), dict)), None)
    meta = dict(reply.get("metadata") or {})
    if data:
        meta.update({k: str(data[k]) for k in ("model", "setup_error") if data.get(k) is not None})
    return {**reply, "metadata": meta, "state": data or {}}


def stage_services(replies: list[dict]) -> list[dict]:
    """The replies of captionbus stage services, through merge_state."""
    return [merge_state(r) for r in replies if str(r.get("name", "")).startswith("captionbus-")]


def stats_subject(stage: str | None = None) -> str:
    return f"$SRV.STATS.{subjects.micro_service_name(stage)}" if stage else "$SRV.STATS"


async def stage_workers(nc: Any, stage: str | None = None, timeout: float = 1.0,
                        until: Callable[[list[dict]], bool] | None = None) -> list[dict]:
    """Every captionbus stage service's $SRV.STATS reply (or one stage's), through merge_state:
    metadata (WorkerInfo, flat) plus `state` (contracts.WorkerState); `until(workers so far)`
    ends the wait early (collect_replies)."""
    replies = await collect_replies(nc, stats_subject(stage), timeout,
                                    until=None if until is None else lambda raw: until(stage_services(raw)))
    return stage_services(replies)


def serving(worker: dict) -> bool:
    """Whether a worker (a stage_workers entry) takes work: not one whose setup failed (its
    STATS data says state setup_failed; an older worker said setup_error in its metadata). One
    still loading counts: it will serve."""
    return worker["state"].get("state") != "setup_failed" and not (worker.get("metadata") or {}).get("setup_error")


def worker_slots(metadata: dict) -> int:
    """A replica's `slots` (WorkerInfo.slots, a string in $SRV metadata: the requests it runs at
    once, e.g. one asr process of two decoders), 1 when absent or unreadable, at most
    MAX_WORKER_SLOTS."""
    try:
        return min(MAX_WORKER_SLOTS, max(1, int(str(metadata.get("slots", "1")))))
    except ValueError:
        return 1


class Census:
    """Live, serving replicas' slots per stage (worker_slots: what a replica runs at once),
    counted by asking `$SRV STATS` (the coordinator's window).

    Each count waits for the workers counted last time (up to `wait_s`), at least `NEW_WORKER_S`
    for one not counted yet, and ends `QUIET_S` after the last reply (so each count takes 1-2 s
    while workers answer; at once when none subscribes). A counted worker that misses an
    ask stays counted (`tolerated_misses` in a row): one slow answer under load is not a worker
    gone. One whose setup failed is out at once, and all are out when the server says nothing
    subscribes to the stage's subject."""

    def __init__(self, wait_s: float = COUNT_WAIT_S, tolerated_misses: int = TOLERATED_MISSES):
        self.wait_s = wait_s
        self.tolerated_misses = tolerated_misses
        self.misses: dict[str, dict[str, int]] = {}  # stage -> $SRV id -> asks missed in a row
        self.slots: dict[str, int] = {}  # $SRV id -> its slots, as it last answered
        self._lock = asyncio.Lock()  # one count at a time: a miss is one ask, not two at once

    async def count(self, nc: Any, stage: str) -> int:
        async with self._lock:
            return await self._count(nc, stage)

    async def _count(self, nc: Any, stage: str) -> int:
        known = self.misses.setdefault(stage, {})
        expected = set(known)
        replies, nobody = await ask(
            nc, stats_subject(stage), self.wait_s, quiet_s=QUIET_S, min_s=NEW_WORKER_S,
            expect=(lambda raw: expected <= {str(r.get("id")) for r in raw}) if expected else None)
        workers = stage_services(replies)
        answered = {str(w.get("id")): serving(w) for w in workers}
        self.slots.update({str(w.get("id")): worker_slots(w.get("metadata") or {}) for w in workers})
        for worker_id in list(known):
            if worker_id not in answered:
                known[worker_id] += 1
                if nobody or known[worker_id] > self.tolerated_misses:
                    del known[worker_id]
        for worker_id, serves in answered.items():
            if serves:
                known[worker_id] = 0
            else:
                known.pop(worker_id, None)
        counted = {w for stage_known in self.misses.values() for w in stage_known}
        for worker_id in set(self.slots) - counted:  # gone: forget its slots too
            del self.slots[worker_id]
        return sum(self.slots.get(worker_id, 1) for worker_id in known)
