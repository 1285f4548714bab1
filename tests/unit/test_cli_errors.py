"""Errors are handled once, by the root group's class: a command nobody decorated still ends in one
line and the exit code of captionbus.exitcodes (issue 20: `captionbus gateway` without a bus
printed a BusError traceback because it lacked `@_friendly_errors`)."""
from __future__ import annotations

import click
import nats.errors
import pytest
from click.testing import CliRunner

from captionbus import exitcodes
from captionbus.cli import CaptionbusGroup, main
from captionbus.core.bus import BusError


def _group_raising(error: BaseException) -> click.Group:
    @click.group(cls=CaptionbusGroup)
    def root() -> None:
        pass

    @root.group()
    def nested() -> None:
        pass

    @nested.command()
    def fails() -> None:  # a command written tomorrow, with no decorator of its own
        raise error

    return root


@pytest.mark.parametrize("error, code, line", [
    (BusError("no NATS server: start the local stack"), exitcodes.BUS, "error: no NATS server: start the local stack"),
    (nats.errors.TimeoutError(), exitcodes.BUS, "error: NATS: timeout"),
    (nats.errors.ConnectionClosedError(), exitcodes.BUS, "error: NATS: connection closed"),
    (ValueError("bad value"), exitcodes.USAGE, "error: bad value"),
    (RuntimeError("boom"), exitcodes.JOB_FAILED,
     "error: internal error: RuntimeError: boom (set CAPTIONBUS_DEBUG=1 for the traceback)"),
    (KeyboardInterrupt(), exitcodes.INTERRUPTED, "interrupted"),
])
def test_any_command_of_the_group_ends_in_one_line_and_its_exit_code(error, code, line, monkeypatch):
    monkeypatch.delenv("CAPTIONBUS_DEBUG", raising=False)
    result = CliRunner().invoke(_group_raising(error), ["nested", "fails"])
    assert result.exit_code == code, result.output
    assert result.output.strip().splitlines() == [line], result.output
    assert "Traceback" not in result.output


def test_the_captionbus_command_is_that_group():
    assert isinstance(main, CaptionbusGroup)
    assert {"gateway", "envs", "subs", "jobs", "submit", "up"} <= set(main.commands)
