"""The translate workflow through the long-running stack: `captionbus up` serves every stage whose
environment is built, and `captionbus submit -w translate --separate-sources --vad pyannote
--wait` runs a job through the optional stages: htdemucs source separation (env demucs, a tiny
random model built locally) feeding pyannote VAD (env pyannote), ASR and alignment (env
whisperx) and an English -> Hindi translation (env indictrans2).

The `up` is the session's translate_up (tests/e2e/conftest.py: `up -w subtitle -w translate
--with source_separation --with vad_pyannote`), which test_translate_subtitle.py's `run`s join
too; it is stopped by Ctrl-C after the last test that uses it, where its exit code 130 is
checked (UpStack.close)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e.conftest import UpStack
from tests.media import ENGLISH_SENTENCE, speech_video

STAGES = {"demux", "source_separation", "vad_pyannote", "asr", "alignment", "translation_indictrans2"}


def test_translate_with_separation_and_pyannote_vad_through_up_and_submit(tmp_path, translate_up: UpStack):
    assert STAGES <= translate_up.served()
    out = tmp_path / "out"
    video, _ = speech_video(tmp_path / "talk.mp4", ENGLISH_SENTENCE)
    done = subprocess.run(
        [sys.executable, "-m", "captionbus", "submit", str(video), "-w", "translate", "-s", "en", "-t", "hi",
         "--separate-sources", "--vad", "pyannote", "--wait", "--out", str(out)],
        env=translate_up.env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]

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
