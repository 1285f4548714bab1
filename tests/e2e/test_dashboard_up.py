"""`captionbus up` starts the dashboard beside the services, and stops it with them."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx

from tests.e2e.conftest import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    try:
        return httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None


def test_up_serves_the_dashboard_and_stops_it(tmp_path, stage_envs):
    home = tmp_path / "home"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CAPTIONBUS_HOME": str(home)}
    env.pop("NATS_URL", None)
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, "-m", "captionbus", "up", "--stages", "demux",
                           "--dashboard", f"127.0.0.1:{port}"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (r := _get(base + "/readyz")) is not None and r.status_code == 200, 120, "the dashboard")

        def demux_live() -> bool:
            response = _get(base + "/api/workers")
            return bool(response) and any(w["stage"] == "demux" and w["state"] in ("idle", "busy") for w in response.json())
        wait_until(demux_live, 180, "the demux worker on the dashboard")
        # `up` prints its summary line after its own readiness checks, which may trail the page's view.
        wait_until(lambda: f"dashboard on http://127.0.0.1:{port}/" in (tmp_path / "up.log").read_text(), 30,
                   "up's serving line")
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(60)
        log.close()
    assert code == 130, (tmp_path / "up.log").read_text()[-2000:]  # Ctrl-C
    assert _get(base + "/healthz") is None  # stopped with the stack
    assert (home / "logs" / "dashboard.log").exists()
