"""The embedded nats-server's Go collector setting (captionbus.server.server_environment, issue
22: its memory on a long film): a real server, its environment read back from /proc."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from captionbus.contracts import subjects
from captionbus.core.bus import connect, provision
from captionbus.server import EMBEDDED_GOGC, EmbeddedServer, server_environment

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/environ")


def environment_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


async def store_and_read(url: str) -> bytes:
    nc = await connect(url, "embedded-server-test")
    try:
        js = nc.jetstream()
        await provision(js)
        kv = await js.key_value(subjects.JOBS_BUCKET)
        await kv.put("j1", b"state")
        return (await kv.get("j1")).value
    finally:
        await nc.close()


def test_the_embedded_server_runs_with_the_lower_gogc(tmp_path, monkeypatch):
    monkeypatch.delenv("GOGC", raising=False)
    monkeypatch.delenv("GOMEMLIMIT", raising=False)
    with EmbeddedServer(tmp_path / "nats") as server:
        env = environment_of(server.process.pid)
        assert asyncio.run(store_and_read(server.url)) == b"state"
    assert EMBEDDED_GOGC == "25"
    assert env["GOGC"] == EMBEDDED_GOGC
    assert "GOMEMLIMIT" not in env


def test_a_go_setting_of_the_caller_is_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("GOGC", raising=False)
    monkeypatch.setenv("GOMEMLIMIT", "64MiB")
    with EmbeddedServer(tmp_path / "nats") as server:
        env = environment_of(server.process.pid)
    assert env["GOMEMLIMIT"] == "64MiB"
    assert "GOGC" not in env  # the caller's limit alone, not mixed with ours

    assert server_environment({"GOGC": "100", "PATH": "/bin"}) == {"GOGC": "100", "PATH": "/bin"}
    assert server_environment({"PATH": "/bin"}) == {"GOGC": EMBEDDED_GOGC, "PATH": "/bin"}
