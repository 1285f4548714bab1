"""Replicas of one stage on one host load their models a few at a time (half the usable cores,
at least one), and one waiting for a load slot takes no request until it has loaded.

Why: `run --replicas N` / `serve asr --replicas N` started N asr processes that imported torch and
loaded Whisper at the same moment, while demux and VAD ran too, and each took a request as soon
as it was registered and held it until its own model was up; on a 2-core machine the first
chunks of a 10.6-minute film finished 33-36 s into the job, both replicas ready at once and late
(issue 22, 1.38x one worker). Before the first chunk the host runs the loads, demux and VAD: with
one load at a time on 2 cores, the first replica is up sooner and decodes while the second
loads beside it. A replica that finds every slot taken neither loads nor takes requests until a
slot is free, so no request waits on it while a loaded replica could run it.

Measured (`benchmarks/fanout.py --cold`, 10.6-minute film, 12 chunks, `-s en`, 2 cores shared
with other sessions, so only as good as the load allowed):
- one slot (load average 15-17): the first replica decoded from 79 s, the second from 158 s
  (each load took ~70 s at that load); run 374 s against 542 s for one worker of one thread:
  1.45x;
- one slot per core, both loading at once (load average 8): both loads took 74-79 s against 48 s
  for the one worker's alone, decoding began at 82-86 s; run 233 s against 228 s: 0.98x (one
  worker of two threads: 222 s).
- one slot again (as shipped, load average 4-6): run 132 s against 149 s, 1.12x; one worker of
  two threads 124 s.
Half the cores keeps one slot on 2 cores and lets a big host load several at once.

Since then `--replicas N` of asr on a CPU host is one process of N decoders sharing one load
(captionbus.stack.replica_processes), which removes the second load altogether; these turns still
order the stages and hosts that start N processes (a GPU host without --devices, an operator's
CAPTIONBUS_ASR_WORKERS, `serve asr` started N times).

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

from captionbus.core.hardware import usable_cores

POLL_S = 0.2


class SetupTurn:
    """A load slot on this host for `stage`'s model (one of `slots` flock files under `home`)."""

    def __init__(self, home: Path, stage: str, slots: int | None = None):
        self.home, self.stage = home, stage
        self.slots = max(1, slots if slots is not None else usable_cores() // 2)
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
