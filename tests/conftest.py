"""Shared fixtures: a real nats-server with JetStream in a temp dir, per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from captionbus.bus import EmbeddedServer


@pytest.fixture
def nats_server(tmp_path: Path):
    """URL of a fresh nats-server -js; each test gets its own streams and store dir."""
    server = EmbeddedServer(tmp_path / "nats")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def captionbus_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data dir; stage envs are shared from the real one (building them is minutes)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CAPTIONBUS_HOME", str(home))
    monkeypatch.delenv("NATS_URL", raising=False)
    return home
