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


def test_run_no_setup_refuses_missing_environments_with_the_fixing_command(cli_env, some_file, tmp_path):
    cli_env["CAPTIONBUS_ENVS"] = str(tmp_path / "no-envs-here")
    started = time.monotonic()
    done = captionbus("run", str(some_file), "--no-setup", env=cli_env)
    assert done.returncode == 2
    assert "captionbus envs create common whisperx" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "no-envs-here" / "common").exists()  # nothing was built


def test_up_refuses_a_named_stage_whose_environment_is_not_built(cli_env, tmp_path):
    """`up --stages demux` without the common env ended in "internal error: FileNotFoundError"."""
    cli_env["CAPTIONBUS_ENVS"] = str(tmp_path / "no-envs-here")
    done = captionbus("up", "--no-dashboard", "--stages", "demux", env=cli_env)
    assert done.returncode == 2, done.stderr
    assert "stage environments not ready: common (missing); run: captionbus envs create common" in done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr


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


def test_retry_is_refused_for_running_and_completed_jobs_and_cancel_for_finished_ones(nats_server, cli_env):
    """`retry` of a running or completed job used to print "retry requested" and do nothing."""
    import asyncio

    from captionbus.contracts import ArtifactRef, JobSpec, subjects
    from captionbus.contracts.jobs import JobState, JobStatus
    from captionbus.core.bus import connect, provision

    async def states():
        nc = await connect(nats_server, "test-states")
        js = nc.jetstream()
        await provision(js)
        kv = await js.key_value(subjects.JOBS_BUCKET)
        ref = ArtifactRef(key="0" * 64, name="in.mp4", size=1)
        for status in JobStatus:
            state = JobState(spec=JobSpec(job_id=f"job-{status.value}", input=ref), status=status)
            await kv.put(state.job_id, state.model_dump_json().encode())
        await nc.close()

    asyncio.run(states())
    cli_env["NATS_URL"] = nats_server
    for status, hint in (("running", "cancel it first"), ("completed", "submit it again")):
        done = captionbus("retry", f"job-{status}", env=cli_env)
        assert done.returncode == 2, done.stderr
        assert f"job job-{status} is {status}; only failed or cancelled jobs can be retried" in done.stderr
        assert hint in done.stderr and "requested" not in done.stdout
    for status in ("failed", "cancelled"):
        done = captionbus("retry", f"job-{status}", env=cli_env)
        assert done.returncode == 0 and f"retry requested for job-{status}" in done.stdout, done.stderr
    done = captionbus("cancel", "job-completed", env=cli_env)
    assert done.returncode == 2 and "already completed; nothing to cancel" in done.stderr
    done = captionbus("cancel", "job-running", env=cli_env)
    assert done.returncode == 0, done.stderr
