"""The CLI's contracts against a real nats-server: job states as exit codes, unknown jobs refused
by every job command, `events` replay / `--follow` / `--since` / Ctrl-C. The job records and
events are written to the bus as the coordinator writes them (KV `cb_jobs`, `captionbus.job.*`);
no stage runs, so these take seconds."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from captionbus import exitcodes
from captionbus.contracts import ArtifactRef, CurrentRequest, JobSpec, JobState, JobSubmitted, WorkerState, new_job_id, subjects
from captionbus.contracts.events import JobCompleted, JobFailed, JobRetryRequested, JobStarted
from captionbus.contracts.jobs import JobStatus
from captionbus.contracts.workers import worker_identity
from captionbus.core.bus import connect, provision, publish_event

INPUT = ArtifactRef(key="0" * 64, name="talk.mp4", size=1)


def spec(job_id: str) -> JobSpec:
    return JobSpec(job_id=job_id, workflow="transcribe", input=INPUT)


async def _write(url: str, states: list[JobState], events: list) -> None:
    nc = await connect(url, "test-writer")
    try:
        js = nc.jetstream()
        await provision(js)
        kv = await js.key_value(subjects.JOBS_BUCKET)
        for state in states:
            await kv.put(state.job_id, state.model_dump_json().encode())
        for event in events:
            await publish_event(js, event)
    finally:
        await nc.close()


def write(url: str, states: list[JobState] = (), events: list = ()) -> None:
    asyncio.run(_write(url, list(states), list(events)))


def cli_env(url: str, tmp_path) -> dict[str, str]:
    return {**os.environ, "NATS_URL": url, "CAPTIONBUS_HOME": str(tmp_path / "home")}


def cli(url: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "captionbus", *args], env=cli_env(url, tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def start(url: str, tmp_path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "captionbus", *args], env=cli_env(url, tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The process's output once it ends by itself; killed (and the test failed) if it does not."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running after {timeout}s")


def test_status_exit_code_follows_the_job_state(nats_server, tmp_path):
    write(nats_server, [
        JobState(spec=spec("j-failed"), status=JobStatus.failed, error="asr: model not found"),
        JobState(spec=spec("j-cancelled"), status=JobStatus.cancelled),
        JobState(spec=spec("j-partial"), status=JobStatus.completed, failed_branches={"ta": "no route"}),
        JobState(spec=spec("j-done"), status=JobStatus.completed),
        JobState(spec=spec("j-running"), status=JobStatus.running),
    ])
    failed = cli(nats_server, tmp_path, "status", "j-failed")
    assert failed.returncode == exitcodes.JOB_FAILED and "reason: asr: model not found" in failed.stdout
    assert cli(nats_server, tmp_path, "status", "j-cancelled").returncode == exitcodes.JOB_FAILED
    partial = cli(nats_server, tmp_path, "status", "j-partial", "--json")
    assert partial.returncode == exitcodes.PARTIAL and json.loads(partial.stdout)["failed_branches"] == {"ta": "no route"}
    assert cli(nats_server, tmp_path, "status", "j-done").returncode == exitcodes.OK
    assert cli(nats_server, tmp_path, "status", "j-running").returncode == exitcodes.OK


@pytest.mark.parametrize("command", [["status"], ["events"], ["events", "--follow"], ["cancel"], ["retry"]])
def test_unknown_job_is_an_error_for_every_job_command(nats_server, tmp_path, command):
    write(nats_server, [JobState(spec=spec("j-known"), status=JobStatus.running)])
    done = cli(nats_server, tmp_path, *command[:1], "nope", *command[1:])
    assert done.returncode == exitcodes.USAGE and "no job 'nope'" in done.stderr and done.stdout == ""


def test_events_replays_a_retried_job_whole_and_follow_ends_after_its_final_event(nats_server, tmp_path):
    events = [JobSubmitted(job_id="j1", spec=spec("j1")), JobStarted(job_id="j1", workflow="transcribe", nodes=["asr"]),
              JobFailed(job_id="j1", reason="asr crashed"), JobRetryRequested(job_id="j1"),
              JobCompleted(job_id="j1", outputs={})]
    write(nats_server, [JobState(spec=spec("j1"), status=JobStatus.completed)], events)
    replay = cli(nats_server, tmp_path, "events", "j1")
    assert replay.returncode == 0
    assert [json.loads(line)["kind"] for line in replay.stdout.splitlines()] == [
        "submitted", "started", "failed", "retry_requested", "completed"]
    # A finished job: --follow replays it and ends by itself (not at the first terminal event).
    follower = start(nats_server, tmp_path, "events", "j1", "--follow")
    out, err = finish(follower, 30)
    assert follower.returncode == 0, err
    assert [json.loads(line)["kind"] for line in out.splitlines()][-2:] == ["retry_requested", "completed"]


def test_events_follow_of_a_running_job_ends_with_it(nats_server, tmp_path):
    write(nats_server, [JobState(spec=spec("j2"), status=JobStatus.running)],
          [JobSubmitted(job_id="j2", spec=spec("j2"))])
    follower = start(nats_server, tmp_path, "events", "j2", "--follow")
    first = follower.stdout.readline()
    assert json.loads(first)["kind"] == "submitted"
    time.sleep(1)
    assert follower.poll() is None  # waiting for more
    # As the coordinator does: the state first, then the events. The follower ends at the job's
    # real end: its terminal event, nothing stored after it, the state finished.
    write(nats_server, [JobState(spec=spec("j2"), status=JobStatus.completed)],
          events=[JobStarted(job_id="j2", workflow="transcribe", nodes=["asr"]), JobCompleted(job_id="j2", outputs={})])
    out, err = finish(follower, 30)
    assert follower.returncode == 0, err
    assert [json.loads(line)["kind"] for line in out.splitlines()] == ["started", "completed"]


def test_events_since_skips_older_events(nats_server, tmp_path):
    write(nats_server, [JobState(spec=spec("j3"), status=JobStatus.completed)],
          [JobSubmitted(job_id="j3", spec=spec("j3"))])
    time.sleep(1.2)
    between = datetime.now(UTC).isoformat()
    time.sleep(0.2)
    write(nats_server, events=[JobCompleted(job_id="j3", outputs={})])
    done = cli(nats_server, tmp_path, "events", "j3", "--since", between)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["kind"] for line in done.stdout.splitlines()] == ["completed"]
    assert [json.loads(line)["kind"] for line in cli(nats_server, tmp_path, "events", "j3", "--since", "1h")
            .stdout.splitlines()] == ["submitted", "completed"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_events_follow_of_all_jobs_stops_on_ctrl_c(nats_server, tmp_path, sig):
    write(nats_server, [JobState(spec=spec("j4"), status=JobStatus.running)],
          [JobSubmitted(job_id="j4", spec=spec("j4"))])
    follower = start(nats_server, tmp_path, "events", "--follow")
    assert json.loads(follower.stdout.readline())["job_id"] == "j4"
    follower.send_signal(sig)
    _, err = finish(follower, 15)
    assert follower.returncode == exitcodes.INTERRUPTED, err


def test_jobs_table_uses_the_terminal_width_and_never_cuts_an_id(nats_server, tmp_path):
    """Issue 19: at 80 columns even on a 120-column terminal, once a job had a reason its id printed
    as `j1a24d72458c-096cb…`, which `status` cannot take; `--wide` wrapped ids over two lines."""
    long_name = "a-very-long-film-title-from-the-archive-reel-3.mkv"
    reason = "translation_nllb: the model folder /srv/models/nllb-200-distilled-600M is missing its tokenizer.json"
    states = [JobState(spec=JobSpec(job_id=new_job_id(), workflow="subtitle", source_language="en",
                                    input=INPUT.model_copy(update={"name": long_name}), target_languages=["hi"]),
                       status=JobStatus.failed, error=reason) for _ in range(3)]
    write(nats_server, states)

    def jobs(columns: int, *extra: str) -> list[str]:
        done = subprocess.run([sys.executable, "-m", "captionbus", "jobs", *extra], capture_output=True, text=True,
                              env={**cli_env(nats_server, tmp_path), "COLUMNS": str(columns)}, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    for columns in (120, 60):  # 60: too narrow for the ids and states: printed wider, never cut
        lines = jobs(columns)
        assert len(lines) == 4, lines
        for state, line in zip(states, lines[1:]):
            assert line.split()[0] == state.job_id and "subtitle" in line and "failed" in line, line
    lines = jobs(120)
    assert max(map(len, lines)) <= 120 and max(map(len, lines)) > 100, lines  # the terminal's width, used
    assert "…" in lines[1]  # the reason is elided, not the id
    wide = jobs(120, "--wide")
    assert [line.split()[0] for line in wide[1:] if not line.startswith(" ")] == [s.job_id for s in states]
    assert max(map(len, wide)) <= 120 and len(wide) > 4, wide  # input and reason wrapped, in full
    reason_at = wide[0].index("reason")
    starts = [n for n, line in enumerate(wide) if n and not line.startswith(" ")] + [len(wide)]
    first_job = "".join(line[reason_at:] for line in wide[starts[0]:starts[1]])
    assert "".join(first_job.split()) == "".join(reason.split()), wide  # every character, wrapped


def test_workers_table_is_one_line_per_worker_and_keeps_the_job_id_whole(nats_server, tmp_path):
    import nats.micro

    metadata = {"stage": "asr", "env": "whisperx", "host": "render-node-07", "pid": "4242", "replica": "0",
                "worker_id": worker_identity("render-node-07", "asr", "0", 4242),
                "interpreter": "/home/someone/.captionbus/envs/whisperx/bin/python3.11",
                "model": "/home/someone/.captionbus/models/whisper-base-ct2",
                **{f"pkg.{name}": "2.8.0+cu128" for name in ("torch", "torchaudio", "whisperx", "ctranslate2",
                                                             "faster-whisper", "pyannote.audio", "transformers")}}

    async def go():
        nc = await connect(nats_server, "test-worker")
        await provision(nc.jetstream())
        # What a worker's runtime answers in $SRV STATS (captionbus/services/runtime/state.py): busy on a job.
        state = WorkerState(state="busy", since=datetime.now(timezone.utc) - timedelta(seconds=42),
                            current=[CurrentRequest(job_id="j-20261201-long-id", node="asr-0007", attempt=2)],
                            jobs_done=17, jobs_failed=1, last_error="RuntimeError: CUDA out of memory")
        service = await nats.micro.add_service(nc, name="captionbus-asr", version="0.0.0", metadata=metadata,
                                               stats_handler=lambda _: state.model_dump(mode="json"))
        await service.add_endpoint(name="info", subject="$SRV.WORKER.captionbus-asr", handler=lambda r: None)
        try:
            outputs = []
            for extra, columns in (([], 80), ([], 160), (["--wide"], 80)):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "captionbus", "workers", *extra,
                    env={**cli_env(nats_server, tmp_path), "COLUMNS": str(columns)},
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 60)
                assert proc.returncode == 0, err
                outputs.append(out.decode())
            return outputs
        finally:
            await service.stop()
            await nc.close()

    narrow, broad, wide = asyncio.run(go())
    lines = narrow.splitlines()
    # Both ids whole on one line (the worker id every surface uses, and the busy job's): the
    # table is wider than 80 columns only by what the kept columns need; the model is elided.
    assert len(lines) == 2 and lines[0].split() == ["worker", "env", "state", "job", "model"], lines
    assert lines[1].split()[:2] == ["render-node-07/asr/0/4242", "whisperx"], lines[1]
    assert re.search(r"busy [4-9]\ds", lines[1]), lines[1]  # 42 s and counting (a slow machine)
    assert "j-20261201-long-id/asr-0007" in lines[1] and "whisper…" in lines[1], lines[1]
    assert 80 < max(map(len, lines)) < 90, lines
    assert "render-node-07/asr/0/4242" in broad and "whisper-base-ct2" in broad and len(broad.splitlines()) == 2
    assert "torch=2.8.0+cu128" in wide and "python3.11" in wide and "render-node-07/asr/0/4242" in wide
    assert "j-20261201-long-id/asr-0007 attempt 2" in wide
    assert "jobs done: 17, failed: 1; last error: RuntimeError: CUDA out of memory" in wide
