"""The translate workflow through the long-running stack: `captionbus up` serves every stage whose
environment is built, and `captionbus submit -w translate --separate-sources --vad pyannote
--wait` runs a job through the optional stages: htdemucs source separation (env demucs, a tiny
random model built locally) feeding pyannote VAD (env pyannote), ASR and alignment (env
whisperx) and an English -> Hindi translation (env indictrans2)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.e2e.conftest import wait_until
from tests.envtools import built_env, test_models_root
from tests.media import ENGLISH_SENTENCE, speech_video

STAGES = {"demux", "source_separation", "vad_pyannote", "asr", "alignment", "translation_indictrans2"}


def test_translate_with_separation_and_pyannote_vad_through_up_and_submit(tmp_path, model_env):
    from captionbus.models import ensure_pyannote_segmentation
    from tests.model_factory.demucs import demucs_service_env, ensure_demucs

    for env_name in ("demucs", "pyannote"):
        built_env(env_name)
    ensure_pyannote_segmentation()
    home = tmp_path / "home"
    env = {**os.environ, **model_env, **demucs_service_env(ensure_demucs(test_models_root())),
           "CAPTIONBUS_HOME": str(home)}
    env.pop("NATS_URL", None)
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, "-m", "captionbus", "up", "-w", "translate",
                           # optional stages start only when named (up --with, envs.workflow_stages)
                           "--with", "source_separation", "--with", "vad_pyannote"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until((home / "nats" / "url").exists, 60, "the embedded server's url file")

        def served() -> set[str]:
            done = subprocess.run([sys.executable, "-m", "captionbus", "workers", "--json"], env=env,
                                  capture_output=True, text=True, timeout=60)
            return {w["metadata"]["stage"] for w in json.loads(done.stdout or "[]")} if done.returncode == 0 else set()

        wait_until(lambda: STAGES <= served(), 300, f"stages {sorted(STAGES)}")
        video, _ = speech_video(tmp_path / "talk.mp4", ENGLISH_SENTENCE)
        out = tmp_path / "out"
        done = subprocess.run(
            [sys.executable, "-m", "captionbus", "submit", str(video), "-w", "translate", "-s", "en", "-t", "hi",
             "--separate-sources", "--vad", "pyannote", "--wait", "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-4000:]
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(90)
        log.close()
    assert code == 130, (tmp_path / "up.log").read_text()[-3000:]  # Ctrl-C: README's exit code 130

    record = json.loads((out / "talk.job.json").read_text())
    nodes = record["nodes"]
    assert record["status"] == "completed"
    assert nodes["vad"]["status"] == "skipped" and nodes["vad_pyannote"]["status"] == "completed"
    envs = {node_id: n["worker"].get("env") for node_id, n in nodes.items() if n["status"] == "completed"}
    assert envs["source_separation"] == "demucs" and envs["vad_pyannote"] == "pyannote"
    assert envs["translation-hi"] == "indictrans2"
    assert nodes["source_separation"]["metrics"]["audio_duration_s"] > 5
    # Separation made new audio (the graph hands it to vad_pyannote, asr and alignment).
    vocals = nodes["source_separation"]["outputs"]["vocals"]["key"]
    assert vocals != nodes["demux"]["outputs"]["audio"]["key"]
    translation = json.loads((out / "talk.translation.hi.json").read_text())
    transcript = json.loads((out / "talk.transcript.json").read_text())
    assert translation["language"] == "hi" and translation["translated_from"] == "en"
    assert [(s["start"], s["end"]) for s in translation["segments"]] == [
        (s["start"], s["end"]) for s in transcript["segments"]]
