"""The fleet commands a person types against a running stack (NATS_URL), end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    state = json.loads(done.stdout)
    # captionbus.exitcodes: failed/cancelled 1, completed without some languages 3, else 0
    expected = {"failed": 1, "cancelled": 1}.get(state["status"], 3 if state["failed_branches"] else 0)
    assert done.returncode == expected, done.stderr
    return state


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
    assert kinds.count("stage_completed") == 7  # demux vad chunk asr-0 transcript_join subtitle_gen mux


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


def test_serve_replicas_share_one_queue_and_stop_on_sigint(stack, tmp_path):
    """`captionbus serve STAGE --replicas 2`: two more worker processes of the stage in its env,
    both registered for discovery; Ctrl-C stops them all and the command exits cleanly."""
    import signal

    def subtitle_gen_pids() -> set[str]:
        listed = json.loads(cli(stack, tmp_path, "workers", "--json").stdout or "[]")
        return {w["metadata"]["pid"] for w in listed if w["metadata"]["stage"] == "subtitle_gen"}

    before = subtitle_gen_pids()
    env = {**os.environ, "NATS_URL": stack.url, "CAPTIONBUS_HOME": str(tmp_path / "serve-home")}
    serving = subprocess.Popen([sys.executable, "-m", "captionbus", "serve", "subtitle_gen", "--replicas", "2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(subtitle_gen_pids() - before) == 2, 120, "two more subtitle_gen workers")
        workers = json.loads(cli(stack, tmp_path, "workers", "--json").stdout)
        added = [w["metadata"] for w in workers if w["metadata"]["pid"] in subtitle_gen_pids() - before]
        assert {m["env"] for m in added} == {"common"} and len({m["worker_id"] for m in added}) == 2
    finally:
        serving.send_signal(signal.SIGINT)
        out, err = serving.communicate(timeout=60)
    assert serving.returncode == 130, err[-2000:]  # Ctrl-C
    assert "2 replicas of subtitle_gen (env common)" in out + err
    # Each replica stopped on its SIGTERM, not by the SIGKILL after the grace (they inherited
    # serve's blocked SIGINT/SIGTERM and sat out the 15 s: captionbus/stack.py _die_with_parent).
    for replica in (0, 1):
        log = (tmp_path / "serve-home" / "logs" / f"subtitle_gen-{replica}.log").read_text()
        assert "signal received; finishing running requests" in log and "stage service stopped" in log, log[-2000:]
    wait_until(lambda: subtitle_gen_pids() == before, 30, "the replicas to leave")


def test_events_follow_streams_a_job_live_until_ctrl_c(stack, tmp_path):
    """An integration's view: `events --follow` started before the job prints its events as
    they happen (JSON lines, schema captionbus/contracts/schema/job_event.json), keeps going, and ends on
    Ctrl-C with exit 130."""
    import queue
    import signal
    import threading

    env = {**os.environ, "NATS_URL": stack.url, "CAPTIONBUS_HOME": str(tmp_path)}
    follower = subprocess.Popen([sys.executable, "-m", "captionbus", "events", "--follow"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()
    try:
        time.sleep(2)  # subscribed before the job exists
        video, _ = speech_video(tmp_path / "live.mp4", ENGLISH_SENTENCE)
        done = cli(stack, tmp_path, "submit", str(video), "-s", "en")
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.strip()
        kinds: list[str] = []
        deadline = time.monotonic() + 300
        while "completed" not in kinds and time.monotonic() < deadline:
            try:
                event = json.loads(lines.get(timeout=5))
            except queue.Empty:
                continue
            if event["job_id"] == job_id:
                kinds.append(event["kind"])
        assert kinds[0] == "submitted" and kinds[-1] == "completed", kinds
        assert kinds.count("stage_completed") == 7 and "stage_progress" in kinds  # demux vad chunk asr-0 transcript_join subtitle_gen mux
        assert follower.poll() is None  # still following after the job ended
        follower.send_signal(signal.SIGINT)
        follower.wait(30)
        assert follower.returncode == 130  # captionbus.exitcodes.INTERRUPTED
    finally:
        if follower.poll() is None:  # never leave a follower running after the test's server
            follower.kill()
            follower.wait(10)
