"""A real `captionbus dashboard` for tests: a process on a free loopback port, and the speaker lane
as its JSON API gives it."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.gatewaytools import free_port


def start_dashboard(url: str, home: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "captionbus", "dashboard", "--listen", f"127.0.0.1:{port}", *args],
                               env={**os.environ, "NATS_URL": url, "CAPTIONBUS_HOME": str(home)},
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def lane_of(base: str, job_id: str) -> httpx.Response:
    """The job's lane once the dashboard's copy of the job state has it (it follows the KV)."""
    deadline = time.monotonic() + 20
    while (answer := httpx.get(f"{base}/api/jobs/{job_id}/speakers", timeout=10)).status_code == 404 \
            and "no completed diarization node" in answer.text and time.monotonic() < deadline:
        time.sleep(0.2)
    return answer
