"""How the gateway hears a job end (captionbus/gateway/ends.py) when the terminal event is lost on
its plain subscription, and the gateway config file's refusals (captionbus/gateway/cli.py)."""
from __future__ import annotations

import asyncio

import click
import pytest

from captionbus.gateway.cli import build_config
from captionbus.gateway.ends import JobEnds


def test_a_lost_terminal_event_is_read_from_the_stream_once_the_job_state_says_it_ended():
    async def go():
        ends = JobEnds(recheck_s=0.05)
        checks = []

        async def is_terminal() -> bool:
            checks.append(1)
            return len(checks) >= 3  # the job's KV record says terminal at the third look

        async def replay():
            return "completed-from-stream"

        with ends.expect("j1") as future:
            assert ends.waiters["j1"] == [future]
            got = await ends.wait(future, is_terminal, replay)
        assert "j1" not in ends.waiters  # nothing left behind for a finished request
        return got, len(checks)

    assert asyncio.run(go()) == ("completed-from-stream", 3)


def test_a_delivered_terminal_event_resolves_every_waiter_of_its_job_only():
    class Msg:
        data = b'{"kind": "cancelled", "job_id": "j1"}'

    async def go():
        ends = JobEnds(recheck_s=60)
        with ends.expect("j1") as a, ends.expect("j1") as b, ends.expect("j2") as c:
            await ends._on_event(Msg())
            return a.result().kind, b.result().kind, c.done()

    assert asyncio.run(go()) == ("cancelled", "cancelled", False)


def test_gateway_config_file_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONBUS_HOME", str(tmp_path))
    monkeypatch.setenv("CAPTIONBUS_WEBHOOK_SECRET", "s")
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:4222")  # named, not contacted
    config = tmp_path / "gateway.toml"

    def refused(text: str, allow: tuple[str, ...] = ()) -> str:
        config.write_text(text)
        with pytest.raises(click.ClickException) as e:
            build_config("127.0.0.1", None, 10, 2, None, allow, 60.0, config)
        return e.value.message

    hook = '[[subscribers]]\nname = "audit"\nurl = "http://hooks.example:8000/cb/"\n'
    assert "not in the gateway's webhook allow-list" in refused(hook)
    assert "unknown event kinds ['done']" in refused(hook + 'events = ["done"]\n', ("http://hooks.example:8000/",))
    assert "subscribers.0.name" in refused(hook.replace('"audit"', '"callback"'), ("http://hooks.example:8000/",))
    assert "gateway.toml" in refused("subscribers = [")  # TOML syntax, the file named
    assert "extra" in refused("webhook_lease = 3\n").lower()
    config.write_text('webhook_allow = ["http://hooks.example:8000/"]\n' + hook)  # the file's own allow-list
    built = build_config("127.0.0.1", None, 10, 2, None, (), 60.0, config)
    assert [s.name for s in built.webhook_subscribers] == ["audit"] and built.webhook_allow == ["http://hooks.example:8000/"]
    monkeypatch.delenv("CAPTIONBUS_WEBHOOK_SECRET")
    assert "CAPTIONBUS_WEBHOOK_SECRET" in refused(config.read_text())
