"""Which coordinator owns which jobs: leases on partitions in KV cb_coordinators.

Why (issue 22, README "Several coordinators, and how far they go"): coordinators that shared one
durable consumer of CB_EVENTS were each handed any job's events, so one usually decided on a
state another had written. Under `benchmarks/fleet_sim.py --hops` with 3 of them a profile counted
~0.7 KV reads and ~1.3 repeated job-event publishes per event, and 2 coordinators cost 8.07 ms of
CPU a request against one's 4.6: more coordinators bought availability, not throughput.

Now each job belongs to one of P partitions (`subjects.job_partition`: FNV-1a of the job id), and
every event of the job carries its partition in its subject (`subjects.job_event`:
`captionbus.job.<tenant>.<partition>.<job>.<kind>`, computed by whoever publishes it), so each
partition has one durable consumer on CB_EVENTS itself, filtered by that token
(`subjects.partition_filters`), and each coordinator pulls only the partitions it holds a lease
on: one coordinator sees all of a job's events while it lives, keeps the job's state in memory (no
read per event) and alone sends its outbox. Each event is stored once, in CB_EVENTS.

Why not the server filing the events (a first version, not merged): a work-queue stream CB_COORD
that the server filled from CB_EVENTS through a stream source with subject transforms (publishers
unchanged) stored every event a coordinator acts on twice; with one coordinator it cost more than
no ownership at all (fleet_sim --hops, single node: coordinator CPU 2.55-2.71 ms a hop against
1.63-1.84; the 3-node cluster 36 against 72 hops/s, the servers' CPU a hop 10.2-12.2 against
4.6-4.9 ms). A stream's own `subject_transform` (applied as it stores, so stored once) is a single
source -> destination pair, and a job's id is the third token of a job of no tenant's subject and
the fourth of a tenant's: one transform cannot hash both, and hashing the first token would put
all of a tenant's jobs in one partition. So the publishers put the partition in.

The leases, the simplest robust form found:
  * A lease is the key `partition.<p>` holding the coordinator's id, made with `kv.create` (only
    one creator wins) and renewed every `renew_s` with `kv.update(last=revision)` (a compare and
    set: it fails once anyone else wrote the key). The bucket's TTL (its max_age,
    core.bus.COORDINATOR_LEASE_TTL_S) removes a lease nobody renewed: a coordinator killed -9
    hands its partitions over within about the TTL, to whoever creates the key next. No clock of
    ours decides: the server ages the keys.
  * A coordinator that could not renew a lease for `fence_s` (80 % of the TTL) stops consuming
    that partition before the lease can lapse and be taken (a process starved of CPU, a lost
    connection), so two coordinators consume one partition only if its renewals were delayed
    past the TTL by more than that margin. Even then nothing goes wrong: every state write is
    checked against the revision the decision read, so the stale owner's write fails, it drops
    its memory of the job, and its next renewal fails and drops the partition.
  * Balance: each live coordinator also keeps `member.<id>` written (same TTL). With N members a
    coordinator holds at most ceil(P / N) partitions (`plan`): it takes free ones up to that, and
    when none is free and it holds more, it releases the extras (stops consuming them, finishes
    the events in hand, deletes the key at its revision), which the coordinators below the share
    take at their next round. A coordinator that stops releases all of its leases, so a
    restart hands over at once instead of after the TTL.
  * Handover: the new owner forgets whatever it remembered of the partition's jobs and reads each
    fresh from the KV; the partition's durable consumer still holds the events the old owner had
    not acked (redelivered after the ack wait) and those it never pulled.

`plan` is pure (tests/unit/coordinator/test_leases.py); `Leases` does the KV round trips.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from captionbus.contracts import subjects
from captionbus.core.bus import live_keys

log = structlog.get_logger("captionbus.coordinator.leases")

MEMBER_PREFIX = "member."
PARTITION_PREFIX = "partition."


def new_coordinator_id() -> str:
    """`<host>-<pid>-<random>`, cut to a valid token (subjects.coordinator_member_key)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def share(partitions: int, members: int) -> int:
    """The most partitions one of `members` live coordinators holds: ceil(P / N)."""
    return math.ceil(partitions / max(1, members))


def plan(partitions: int, members: int, mine: Iterable[int], taken: Iterable[int]) -> tuple[list[int], list[int]]:
    """(partitions to try to take, partitions to release) for one coordinator: `mine` are its
    leases, `taken` every partition anyone holds (its own included), `members` the live
    coordinators (at least itself). It takes free partitions up to its share; it releases what
    it holds above its share only when no partition is free (then another member is below the
    share and takes them; were some free, a member below the share would take those first, and
    releasing would only move jobs about). Releases are its highest partitions."""
    mine, taken = set(mine), set(taken) | set(mine)
    target = share(partitions, members)
    free = [p for p in range(partitions) if p not in taken]
    take = free[:max(0, target - len(mine))]
    release = sorted(mine)[target:] if not free else []
    return take, release


class Leases:
    """One coordinator's leases. `round()` (every `renew_s`) keeps its member key, renews its
    leases, and takes or releases partitions by `plan`; `on_gain(p, share)` is awaited once a
    lease is taken (start consuming p), `on_loss(p)` before a release and after a lease is lost
    (stop consuming p; return once its events in hand are done)."""

    def __init__(self, js: Any, kv: Any, coordinator_id: str, partitions: int, ttl_s: float,
                 on_gain: Callable[[int, int], Awaitable[None]], on_loss: Callable[[int], Awaitable[None]]):
        self.js, self.kv, self.id, self.partitions = js, kv, coordinator_id, partitions
        self.ttl_s = ttl_s
        self.renew_s = ttl_s / 4  # 3 renewals may fail or come late before the fence
        self.fence_s = ttl_s * 0.8
        self.on_gain, self.on_loss = on_gain, on_loss
        # partition -> (revision of our lease, monotonic time of its last write)
        self.held: dict[int, tuple[int, float]] = {}
        self.members = 1

    def holds(self, partition: int) -> bool:
        return partition in self.held

    async def round(self) -> None:
        await self._renew()  # first: a failure below must not keep the leases from being renewed
        await self.kv.put(subjects.coordinator_member_key(self.id), self.id.encode())
        keys = await live_keys(self.js, subjects.COORDINATORS_BUCKET)
        self.members = max(1, sum(key.startswith(MEMBER_PREFIX) for key in keys))
        taken = {int(key[len(PARTITION_PREFIX):]) for key in keys if key.startswith(PARTITION_PREFIX)}
        take, release = plan(self.partitions, self.members, self.held, taken)
        for partition in release:
            await self.release(partition)
        for partition in take:
            try:
                revision = await self.kv.create(subjects.partition_lease_key(partition), self.id.encode())
            except (KeyWrongLastSequenceError, KeyNotFoundError):
                # Another coordinator took it first; or the key was there for the create and gone
                # for nats-py's read after it (a lease that lapsed or was released between: seen
                # on the 3-node cluster). Either way the next round sees.
                continue
            except Exception as e:  # a timeout, a leader election: the next round tries again
                log.warning("could not take a partition; trying again next round", partition=partition,
                            error=repr(e))
                continue
            self.held[partition] = (revision, time.monotonic())
            log.info("partition taken", partition=partition, coordinator=self.id, members=self.members)
            try:
                await self.on_gain(partition, share(self.partitions, self.members))
            except Exception as e:  # a lease held but not consumed would strand its jobs: give it back
                log.warning("could not consume a partition taken; released", partition=partition, error=repr(e))
                await self.release(partition)

    async def _renew(self) -> None:
        now = time.monotonic()
        for partition, (revision, renewed) in sorted(self.held.items()):
            try:
                written = await self.kv.update(subjects.partition_lease_key(partition), self.id.encode(), last=revision)
            except KeyWrongLastSequenceError:
                await self._lost(partition, "another coordinator holds it now (or it lapsed)")
                continue
            except Exception as e:  # a timeout, a reconnect: try again next round, unless too late
                if now - renewed >= self.fence_s:
                    await self._lost(partition, f"not renewed for {now - renewed:.1f} s ({e!r})")
                else:
                    log.warning("lease not renewed; trying again", partition=partition, error=repr(e))
                continue
            self.held[partition] = (written, time.monotonic())
        # A round that came late (the process starved of CPU) must not consume what may be gone.
        for partition, (_, renewed) in sorted(self.held.items()):
            if time.monotonic() - renewed >= self.fence_s:
                await self._lost(partition, f"not renewed for {time.monotonic() - renewed:.1f} s")

    async def _lost(self, partition: int, why: str) -> None:
        self.held.pop(partition, None)
        log.warning("partition lease lost; its jobs go to whoever holds it", partition=partition, why=why)
        await self.on_loss(partition)

    async def release(self, partition: int) -> None:
        """Stop consuming `partition`, then delete its lease (if still ours) for another to take."""
        revision, _ = self.held.pop(partition)
        await self.on_loss(partition)
        with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError):
            await self.kv.delete(subjects.partition_lease_key(partition), last=revision)
        log.info("partition released", partition=partition, coordinator=self.id, members=self.members)

    async def release_all(self) -> None:
        """Every lease, and the member key (a coordinator that stops)."""
        for partition in sorted(self.held):
            with contextlib.suppress(Exception):
                await self.release(partition)
        with contextlib.suppress(Exception):
            await self.kv.delete(subjects.coordinator_member_key(self.id))
