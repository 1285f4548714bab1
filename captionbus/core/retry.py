"""Retry policy as data: how long to wait before the next attempt, and when to stop.

One type for every retry loop (in the style of temporalio's `RetryPolicy`): the stage
runtime's nak delay for a failed request (`captionbus/services/runtime/serve.py` `retry_policy`), the
coordinator's wait before re-running a failed node (`captionbus/coordinator/decide.py` `Policy.retry`) and
its redelivery of an event it failed to apply (`captionbus/coordinator/service.py` `EVENT_RETRY`), and the
launcher's restart of a stage service that died (`captionbus/runner.py` `RESTART_RETRY`).

A policy only computes; whoever holds it sleeps, naks or schedules, so the coordinator's
`decide` stays a pure function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 1.0  # the wait after the first failure
    multiplier: float = 2.0  # exponential growth per failure
    max_s: float | None = None  # no wait longer than this
    max_attempts: int | None = None  # attempts in all, the first included; None: no limit
    growth: Literal["exponential", "linear"] = "exponential"  # linear: initial_s × n

    def __post_init__(self) -> None:
        if not self.initial_s >= 0:
            raise ValueError(f"initial_s must be >= 0, not {self.initial_s}")
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier must be >= 1, not {self.multiplier}")
        if self.max_s is not None and not self.max_s >= 0:
            raise ValueError(f"max_s must be >= 0, not {self.max_s}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {self.max_attempts}")
        if self.growth not in ("exponential", "linear"):
            raise ValueError(f"growth must be 'exponential' or 'linear', not {self.growth!r}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt (1-based; less counts as 1):
        initial_s × multiplier^(failures-1), or initial_s × failures when linear; at most max_s."""
        n = max(failures, 1)
        if self.growth == "linear":
            seconds = self.initial_s * n
        else:
            try:
                seconds = self.initial_s * self.multiplier ** (n - 1)
            except OverflowError:
                seconds = math.inf if self.initial_s else 0.0
        return seconds if self.max_s is None else min(seconds, self.max_s)

    def exhausted(self, attempts: int) -> bool:
        """Whether `attempts` attempts so far use the policy up (never without max_attempts)."""
        return self.max_attempts is not None and attempts >= self.max_attempts
