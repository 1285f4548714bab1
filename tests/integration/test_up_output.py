"""`captionbus up` speaks one format per stream: JSON lines when asked (or when stderr is not a
terminal), human lines with --log-format human; it says where the logs are and "serving STAGE" as
each stage becomes ready."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest


def run_up(tmp_path, *args: str) -> tuple[int, list[str]]:
    env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home")}
    env.pop("NATS_URL", None)
    up = subprocess.Popen([sys.executable, "-m", "captionbus", "up", "--stages", "subtitle_gen", *args],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = up.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if "serving subtitle_gen (env common)" in line:
                break
    finally:
        up.send_signal(signal.SIGINT)
        try:
            rest = up.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            up.kill()
            rest = up.communicate()[1]
    return up.returncode, lines + rest.splitlines()


@pytest.mark.usefixtures("common_env")
def test_up_writes_json_lines_only_when_asked(tmp_path):
    code, lines = run_up(tmp_path, "--log-format", "json")
    assert code == 130, lines[-10:]  # stopped by Ctrl-C (SIGINT), as README says
    events = [json.loads(line) for line in lines if line.strip()]  # every line is JSON
    said = [e["event"] for e in events]
    assert any("service logs in" in s and "captionbus logs STAGE" in s for s in said), said
    assert "serving subtitle_gen (env common)" in said


@pytest.mark.usefixtures("common_env")
def test_up_writes_human_lines_when_asked(tmp_path):
    code, lines = run_up(tmp_path, "--log-format", "human")
    assert code == 130, lines[-10:]  # stopped by Ctrl-C (SIGINT), as README says
    assert any(line.startswith("captionbus up: NATS at ") and "service logs in" in line for line in lines), lines
    assert "serving subtitle_gen (env common)" in lines
    assert not any(line.startswith("{") for line in lines), lines
