"""Replicas of one stage on one host load their models one at a time, and only the first takes
requests while it loads.

Why: `run --replicas 2` / `serve asr --replicas 2` started two asr processes that imported torch
and loaded Whisper at the same moment on the same cores, each as slowly as the pair shared them,
and each took a request as soon as it was registered and held it until its own model was up; on
a 2-core machine the first chunks of a 10.6-minute film finished 33-36 s into the job (issue 22).
Now the first replica to take this host's turn (an exclusive flock on
HOME/locks/setup-<stage>.lock) consumes at once and loads with the cores to itself; a replica
that finds the turn taken neither loads nor takes requests until the turn is free, then loads
and only then consumes, so a request never waits on a loading replica while a loaded one could
run it. A crashed replica's lock goes with its process (flock is released on close). Replicas
with separate homes (separate hosts, as in a fleet) never wait for each other.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
from contextlib import suppress
from pathlib import Path

POLL_S = 0.2


class SetupTurn:
    """This host's turn to load `stage`'s model (one flock file under `home`)."""

    def __init__(self, home: Path, stage: str):
        self.path = home / "locks" / f"setup-{stage}.lock"
        self._fd: int | None = None
        self.held = False

    def try_take(self) -> bool:
        """Take the turn if it is free now; False while another replica of the stage loads.
        True without a lock when the lock file cannot be made (a read-only home): replicas then
        load at once, as they did before turns, rather than not at all."""
        if self._fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    async def take(self, stop: asyncio.Event) -> bool:
        """Wait for the turn; False when `stop` was set first."""
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
