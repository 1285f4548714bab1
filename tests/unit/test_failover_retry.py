"""captionbus.core.bus.through_failover: which bus errors are waited out (a stream or cluster between
leaders) and which are re-raised at once, and the one line a lasting placement failure ends with."""
from __future__ import annotations

import asyncio

import pytest
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, BadRequestError

from captionbus.core.bus import NO_PEERS_ERR_CODE, BusError, through_failover
from captionbus.core.retry import RetryPolicy

FAST = RetryPolicy(initial_s=0.01, multiplier=1.0, max_s=0.01, max_attempts=3)


def _failing(errors: list[BaseException]):
    calls = []

    async def step():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "done"
    return step, calls


def no_peers() -> APIError:
    return BadRequestError(code=400, err_code=NO_PEERS_ERR_CODE, description="no suitable peers for placement")


def test_a_forming_cluster_is_waited_out():
    step, calls = _failing([NatsTimeout(), no_peers()])
    assert asyncio.run(through_failover(step, "provision", FAST)) == "done"
    assert len(calls) == 3


def test_a_placement_failure_that_lasts_ends_with_what_to_check():
    step, calls = _failing([no_peers() for _ in range(5)])
    with pytest.raises(BusError, match="provision: the cluster has too few JetStream servers .*R3 needs 3.*"
                                       "no suitable peers"):
        asyncio.run(through_failover(step, "provision", FAST))
    assert len(calls) == 3


def test_other_refusals_are_not_retried():
    step, calls = _failing([BadRequestError(code=400, err_code=10058, description="subjects overlap")])
    with pytest.raises(BadRequestError):
        asyncio.run(through_failover(step, "provision", FAST))
    assert len(calls) == 1
