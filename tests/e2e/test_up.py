"""`captionbus up` on the embedded default: other commands on this host find it without NATS_URL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.e2e.conftest import CLI_POLL_S, wait_until
from tests.media import ENGLISH_SENTENCE, speech_video


def test_up_serves_jobs_for_other_commands_and_stops_cleanly(tmp_path, stage_envs, whisper_model):
    home = tmp_path / "home"
    # A stage whose config is missing on this host must not take the others down (alignment:
    # built with asr's env, not in transcribe, so the job below still runs).
    env = {**os.environ, "CAPTIONBUS_HOME": str(home), "CAPTIONBUS_ALIGN_CONFIG": str(tmp_path / "no-such.yaml")}
    env.pop("NATS_URL", None)
    log = open(tmp_path / "up.log", "wb")
    # transcribe's stages plus alignment, whose config is missing on this host: it must not take the
    # others down (all ten stages' models loading at once overran 180 s on 2 shared cores).
    up = subprocess.Popen([sys.executable, "-m", "captionbus", "up", "-w", "transcribe", "--stages", "alignment"],
                          env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url_file = home / "nats" / "url"
        wait_until(url_file.exists, 30, "the embedded server's url file")

        def pids() -> dict[str, str]:
            done = subprocess.run([sys.executable, "-m", "captionbus", "workers", "--json"], env=env,
                                  capture_output=True, text=True, timeout=60)
            workers = json.loads(done.stdout or "[]") if done.returncode == 0 else []
            return {w["metadata"]["stage"]: w["metadata"]["pid"] for w in workers}

        wait_until(lambda: {"demux", "vad", "asr", "subtitle_gen", "mux"} <= set(pids()), 180, "all five stages",
                   CLI_POLL_S)
        # A crashed service is restarted by `up`.
        crashed = pids()["asr"]
        os.kill(int(crashed), signal.SIGKILL)
        wait_until(lambda: pids().get("asr", crashed) != crashed, 180, "asr restarted", CLI_POLL_S)
        video, _ = speech_video(tmp_path / "talk.mp4", ENGLISH_SENTENCE)
        done = subprocess.run([sys.executable, "-m", "captionbus", "submit", str(video), "-s", "en", "--wait",
                               "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "out" / "talk.srt").read_text().strip()
        wait_until(lambda: "alignment (env whisperx) cannot serve" in (tmp_path / "up.log").read_text(), 120,
                   "up to report the stage that cannot serve")
        assert "no-such.yaml" in (tmp_path / "up.log").read_text()
        # A job that needs the stage whose setup fails ends, with setup's reason, in under two
        # minutes (it used to stay `running` while `up` restarted the stage forever).
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "captionbus", "submit", str(video), "-w", "translate",
                               "-s", "en", "-t", "fr", "--wait", "--out", str(tmp_path / "out2")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert time.monotonic() - started < 120
        assert done.returncode == 1, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "alignment cannot be served on host" in errors[0], done.stderr[-2000:]
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(60)
        log.close()
    assert code == 130, (tmp_path / "up.log").read_text()[-3000:]  # Ctrl-C: README's exit code 130
    assert not (home / "nats" / "url").exists()
