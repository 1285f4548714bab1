"""The events consumer's ack wait has a floor (core/settings.py EVENT_ACK_WAIT_MIN_S): below it a
live coordinator's events are handed to another while it still applies them. Settings holds it
for CAPTIONBUS_EVENT_ACK_WAIT; a Coordinator built in code is held to it too. No server: a
Coordinator is built on a client that has not connected (start() would connect it)."""
import math

import pytest
from nats.aio.client import Client

from captionbus.coordinator.service import Coordinator
from captionbus.core.settings import EVENT_ACK_WAIT_MIN_S


@pytest.mark.parametrize("wait", [0.0, 0.5, -1.0, math.nan])
def test_an_ack_wait_under_the_floor_is_refused(wait):
    with pytest.raises(ValueError, match=r"event_ack_wait_s=.*at least 1 s"):
        Coordinator(Client(), event_ack_wait_s=wait)


def test_the_floor_itself_is_taken():
    assert Coordinator(Client(), event_ack_wait_s=EVENT_ACK_WAIT_MIN_S).event_ack_wait_s == EVENT_ACK_WAIT_MIN_S
