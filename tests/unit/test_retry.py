"""One retry policy type for the runtime, the coordinator and the launcher (captionbus.core.retry)."""
from __future__ import annotations

import pytest

from captionbus.runner import RESTART_RETRY
from captionbus.coordinator.decide import NODE_RETRY, Policy
from captionbus.coordinator.service import EVENT_RETRY
from captionbus.core.retry import RetryPolicy
from captionbus.services.runtime.serve import MAX_RETRY_DELAY_S, retry_policy


def test_each_user_keeps_its_numbers():
    # The formulas each place had before it held a RetryPolicy.
    for base in (0.1, 1.0, 3.0):
        policy = retry_policy(base)
        assert [policy.delay(n) for n in range(1, 12)] == [min(base * 2 ** (n - 1), MAX_RETRY_DELAY_S)
                                                           for n in range(1, 12)]
        assert policy.max_attempts is None  # the consumer's max_deliver counts deliveries
    assert [NODE_RETRY.delay(n) for n in range(0, 9)] == [2, 2, 4, 8, 16, 32, 64, 120, 120]
    assert NODE_RETRY.max_attempts == 3 and Policy().retry == NODE_RETRY
    assert [EVENT_RETRY.delay(n) for n in range(1, 6)] == [1, 2, 3, 4, 5]
    assert [EVENT_RETRY.exhausted(n) for n in range(1, 7)] == [False] * 4 + [True] * 2
    assert [RESTART_RETRY.delay(n) for n in range(1, 7)] == [min(2 ** n, 30) for n in range(1, 7)]
    assert not RESTART_RETRY.exhausted(4) and RESTART_RETRY.exhausted(5)


def test_delay_never_overflows_and_unlimited_never_exhausts():
    policy = RetryPolicy(initial_s=1.0, multiplier=2.0, max_s=60.0)
    assert policy.delay(5000) == 60.0
    assert RetryPolicy(initial_s=0.0).delay(5000) == 0.0
    assert not policy.exhausted(10**9)


@pytest.mark.parametrize("bad", [
    {"initial_s": -1}, {"multiplier": 0.5}, {"max_s": -2}, {"max_attempts": 0}, {"growth": "cubic"},
])
def test_nonsense_is_refused(bad):
    with pytest.raises(ValueError):
        RetryPolicy(**bad)


def test_a_node_policy_must_stop_somewhere():
    with pytest.raises(ValueError, match="max_attempts"):
        Policy(retry=RetryPolicy(initial_s=2.0))
