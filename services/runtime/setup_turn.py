"""Replicas of one stage on one host load their models at most one per usable core at a time,
and only those loading in the first round take requests while they load.

Why: `run --replicas N` / `serve asr --replicas N` started N asr processes that imported torch and
loaded Whisper at the same moment, and each took a request as soon as it was registered and held
it until its own model was up (issue 22). A load is one busy thread (imports, reading the model),
so a host loads as many replicas at once as it has cores (core.hardware.usable_cores); a replica
that finds every load slot taken neither loads nor takes requests until a slot is free, then
loads and only then consumes, so no request waits on it while a loaded replica could run it.

Measured with one slot (every load after the other; `benchmarks/fanout.py --cold`, 10.6-minute
film, 2 cores at load average 15-17 from other work): the first replica decoded from 79 s, but
the second, loading after it, only from 158 s: two single-threaded loads on two cores do not
slow each other, so serialising them only delayed the second (job 366 s; 2 replicas 1.45x one
worker of one thread, where both ready at 79 s would have made it about 1.68x). Hence one slot
per core, not one in all.

A slot is an exclusive flock on HOME/locks/setup-<stage>.<n>.lock; a crashed replica's lock goes
with its process. Replicas with separate homes (separate hosts, as in a fleet) never wait for
each other.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
from contextlib import suppress
from pathlib import Path

from core.hardware import usable_cores

POLL_S = 0.2


class SetupTurn:
    """A load slot on this host for `stage`'s model (one of `slots` flock files under `home`)."""

    def __init__(self, home: Path, stage: str, slots: int | None = None):
        self.home, self.stage = home, stage
        self.slots = max(1, slots if slots is not None else usable_cores())
        self._fd: int | None = None
        self.held = False

    def try_take(self) -> bool:
        """Take a free slot now; False while every slot is loading another replica of the
        stage. True without a lock when no lock file can be made (a read-only home): replicas
        then load at once, as they did before slots, rather than not at all."""
        if self.held:
            return True
        for n in range(self.slots):
            try:
                (self.home / "locks").mkdir(parents=True, exist_ok=True)
                fd = os.open(self.home / "locks" / f"setup-{self.stage}.{n}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._fd, self.held = fd, True
            return True
        return False

    async def take(self, stop: asyncio.Event) -> bool:
        """Wait for a slot; False when `stop` was set first."""
        while not self.try_take():
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
            if stop.is_set():
                return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            with suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        self.held = False
