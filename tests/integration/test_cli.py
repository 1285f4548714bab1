"""The CLI refuses what cannot work before anything runs, in one line a person can act on."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


def captionbus(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captionbus", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(tmp_path):
    env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home")}
    env.pop("NATS_URL", None)
    return env


@pytest.fixture
def some_file(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 16)
    return path


def test_run_refuses_missing_environments_with_the_fixing_command(cli_env, some_file, tmp_path):
    cli_env["CAPTIONBUS_ENVS"] = str(tmp_path / "no-envs-here")
    started = time.monotonic()
    done = captionbus("run", str(some_file), env=cli_env)
    assert done.returncode == 2
    assert "captionbus envs create common whisperx" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    "args, message",
    [
        (["-s", "xx"], "unknown language code 'xx'"),
        (["-w", "nosuch"], "unknown workflow 'nosuch'"),
        (["-w", "../../etc/passwd"], "invalid workflow name"),
        (["-t", "ta"], "workflow 'transcribe' does not translate"),
    ],
)
def test_run_refuses_bad_job_options(cli_env, some_file, args, message):
    done = captionbus("run", str(some_file), *args, env=cli_env)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_run_refuses_a_missing_file(cli_env, tmp_path):
    done = captionbus("run", str(tmp_path / "nope.mp4"), env=cli_env)
    assert done.returncode == 2
    assert "no such file" in done.stderr


def test_fleet_commands_without_a_server_say_how_to_get_one(cli_env):
    done = captionbus("jobs", env=cli_env)
    assert done.returncode == 4  # captionbus.exitcodes.BUS
    assert "captionbus up" in done.stderr and "NATS_URL" in done.stderr
