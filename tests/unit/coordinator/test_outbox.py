"""What of a job state's outbox the coordinator sends again, and when: the pure rules
(captionbus.coordinator.service.awaited / resend_due), no server."""
from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from pathlib import Path

from captionbus.contracts import StageRequest, request_key
from captionbus.coordinator.decide import decide, result_token
from captionbus.coordinator.graph import load_workflow
from captionbus.coordinator.service import (
    OUTBOX_GRACE_S,
    REQUEST_RESEND_LIMIT_S,
    awaited,
    outbox_id,
    request_entry,
    resend_due,
)
from tests.unit.coordinator.test_coordinator_decide import POLICY, T0, completed, submit

TRANSCRIBE = load_workflow(Path(__file__).parent / "linear.yaml")


def after(seconds: float):
    return T0 + timedelta(seconds=seconds)


def test_another_coordinators_request_goes_out_again_only_once_its_writer_had_time_to_send_it():
    """Review of issue 22: a coordinator resent every request of the outbox it had not published
    itself on each write of the job, under the job's lock, so with several coordinators each hop
    paid for a repeat of the other coordinator's request. Now: its own unsent request at once,
    another's only once it is OUTBOX_GRACE_S old (its writer clears it within a tick)."""
    d = submit()  # demux requested at T0
    [request] = d.requests
    entry = request_entry(request)
    assert not resend_due(entry, d.state, T0, own=False)
    assert not resend_due(entry, d.state, after(OUTBOX_GRACE_S - 0.1), own=False)
    assert resend_due(entry, d.state, after(OUTBOX_GRACE_S), own=False)
    assert resend_due(entry, d.state, T0, own=True)  # ours: its publish after our write failed
    event = {"kind": "started", "event_id": "j1.started"}
    assert not resend_due(event, d.state, after(OUTBOX_GRACE_S), own=True)  # events go out in order, not here
    done = decide(d.state, completed("demux"), TRANSCRIBE, T0, POLICY).state
    assert not resend_due(entry, done, after(OUTBOX_GRACE_S), own=True)  # no node waits for it any more


def test_no_request_goes_out_again_once_the_duplicate_window_may_have_passed():
    """Review of issue 22: after an outage longer than the requests stream's 120 s duplicate
    window a resend is stored as a new message, and a request that had been stored (perhaps done)
    runs twice. Past REQUEST_RESEND_LIMIT_S (inside the window) a request is neither sent again
    nor kept in the outbox: its node stays requested and its deadline decides."""
    duplicate_window_s = 120.0  # the requests stream's (captionbus.core.bus.provision)
    assert 1.0 < OUTBOX_GRACE_S < REQUEST_RESEND_LIMIT_S <= duplicate_window_s - 20  # a tick < the grace
    d = submit()
    [request] = d.requests
    entry = request_entry(request)
    just_inside, past = after(REQUEST_RESEND_LIMIT_S - 1), after(REQUEST_RESEND_LIMIT_S)
    assert resend_due(entry, d.state, just_inside, own=False) and awaited(entry, d.state, just_inside)
    for own in (False, True):
        assert not resend_due(entry, d.state, past, own=own)
    assert not awaited(entry, d.state, past)
    assert d.state.nodes["demux"].status.value == "requested"  # the deadline's, not the outbox's
    event = {"kind": "started", "event_id": "j1.started"}
    assert awaited(event, d.state, after(10 * REQUEST_RESEND_LIMIT_S))  # events always go out

    # a node retried since: the old attempt's request is not awaited at any age
    retried = replace_attempt(d.state, "demux", request.attempt + 1)
    assert not awaited(entry, retried, T0) and not resend_due(entry, retried, after(OUTBOX_GRACE_S), own=True)


def replace_attempt(state, node_id: str, attempt: int):
    node = state.nodes[node_id].model_copy(update={"attempt": attempt})
    return state.model_copy(update={"nodes": {**state.nodes, node_id: node}})


def test_every_name_of_a_request_is_built_by_request_key():
    """One function names a try of a node: the request's key (its Nats-Msg-Id), the outbox's id
    of its entry (built from the entry's JSON, not the model) and what its result token signs."""
    request = StageRequest(job_id="j1", stage="asr", node="asr-3", attempt=2)
    assert request.key == request_key("j1", "asr-3", 2) == "j1.asr-3.2"
    assert outbox_id(request_entry(request)) == f"request:{request_key('j1', 'asr-3', 2)}"
    signed = hmac.new(b"s", request_key("j1", "asr-3", 2).encode(), hashlib.sha256).hexdigest()[:32]
    assert result_token(b"s", "j1", "asr-3", 2) == signed
