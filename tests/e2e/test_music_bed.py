"""No phantom words in music: `transcribe` decodes only inside Silero's speech regions, so six
seconds of music before and after a sentence get no cue (the default graph once wrote "The speed"
over a music bed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pysubs2

from tests.media import music_bed_video


def test_speech_over_a_music_bed_gets_no_words_in_the_music(tmp_path, stage_envs, whisper_model):
    video, spoken, (speech_start, speech_end) = music_bed_video(tmp_path / "scene.mp4")
    out = tmp_path / "out"
    env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home")}
    env.pop("NATS_URL", None)
    done = subprocess.run([sys.executable, "-m", "captionbus", "run", str(video), "-s", "en", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "scene.job.json").read_text())
    assert record["nodes"]["vad"]["status"] == "completed"  # the default graph has VAD
    cues = list(pysubs2.load(str(out / "scene.srt")))
    assert cues, "no cues at all: the speech was lost under the music"
    # A cue may appear max_lead (0.5 s) early and linger max_lag (1.5 s) to be read; the
    # padding on top covers VAD's margins. Six seconds of music on each side stay empty.
    for cue in cues:
        assert cue.start / 1000 >= speech_start - 1.0, f"cue over the music before the speech: {cue.text!r} at {cue.start} ms"
        assert cue.end / 1000 <= speech_end + 2.5, f"cue over the music after the speech: {cue.text!r} until {cue.end} ms"
    heard = " ".join(c.plaintext for c in cues).lower()
    assert sum(w.strip(".,") in heard for w in spoken.lower().split()) >= len(spoken.split()) // 2, heard
