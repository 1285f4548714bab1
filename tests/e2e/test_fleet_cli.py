"""The fleet commands a person types against a running stack (NATS_URL), end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import wait_until
from tests.media import ENGLISH_SENTENCE, speech_video


def cli(stack, home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "NATS_URL": stack.url, "CAPTIONBUS_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "captionbus", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def status_of(stack, home: Path, job_id: str) -> dict:
    done = cli(stack, home, "status", job_id, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_workers_show_each_stage_in_its_own_environment(stack, tmp_path):
    done = cli(stack, tmp_path, "workers", "--json")
    assert done.returncode == 0, done.stderr
    by_stage = {w["metadata"]["stage"]: w["metadata"] for w in json.loads(done.stdout)}
    assert {"demux", "asr", "subtitle_gen", "mux"} <= set(by_stage)
    asr, demux = by_stage["asr"], by_stage["demux"]
    assert asr["env"] == "whisperx" and demux["env"] == "common"
    assert asr["interpreter"] != demux["interpreter"]
    assert asr["pkg.torch"].startswith("2.8") and "pkg.torch" not in demux
    assert "whisper-base" in asr["model"]


def test_submit_wait_status_jobs_events(stack, tmp_path):
    video, _ = speech_video(tmp_path / "talk.mp4", ENGLISH_SENTENCE)
    out = tmp_path / "out"
    done = cli(stack, tmp_path, "submit", str(video), "-s", "en", "--wait", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} >= {"talk.srt", "talk.vtt", "talk.subtitled.mp4", "talk.subtitled.mkv"}
    job_id = json.loads((out / "talk.job.json").read_text())["spec"]["job_id"]

    assert status_of(stack, tmp_path, job_id)["status"] == "completed"
    listed = [json.loads(line) for line in cli(stack, tmp_path, "jobs", "--json").stdout.splitlines()]
    assert job_id in [state["spec"]["job_id"] for state in listed]
    kinds = [json.loads(line)["kind"] for line in cli(stack, tmp_path, "events", job_id).stdout.splitlines()]
    assert kinds[0] == "submitted" and kinds[-1] == "completed"
    assert kinds.count("stage_completed") == 4


def test_cancel_then_retry(stack, tmp_path):
    video, _ = speech_video(tmp_path / "long.mp4", " ".join([ENGLISH_SENTENCE] * 4))
    done = cli(stack, tmp_path, "submit", str(video), "-s", "en")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()

    assert cli(stack, tmp_path, "cancel", job_id).returncode == 0
    wait_until(lambda: status_of(stack, tmp_path, job_id)["status"] == "cancelled", 60, "cancelled")

    assert cli(stack, tmp_path, "retry", job_id).returncode == 0
    wait_until(lambda: status_of(stack, tmp_path, job_id)["status"] == "completed", 240, "completed after retry")
    kinds = [json.loads(line)["kind"] for line in cli(stack, tmp_path, "events", job_id).stdout.splitlines()]
    assert "cancelled" in kinds and kinds[-1] == "completed"


def test_unknown_job_is_a_clear_error(stack, tmp_path):
    done = cli(stack, tmp_path, "status", "no-such-job")
    assert done.returncode == 2 and "no job 'no-such-job'" in done.stderr
