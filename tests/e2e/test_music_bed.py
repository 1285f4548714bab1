"""No phantom words in music: `transcribe` decodes only inside Silero's speech regions, so six
seconds of music before and after a sentence get no cue.

The report: the default graph once (no vad stage; whisperx's own pyannote VAD chose what to
decode) wrote "The speed" over a music bed. The `organ` bed (tests/media.py) reproduces that with
the local Whisper base: the same graph without the vad stage, run here as the workflow
`novad` (a copy of today's `transcribe` minus vad, from CAPTIONBUS_CONFIG), puts a word seconds
before the speech, over music alone. The default graph on the same file must not."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pysubs2

from tests.media import music_bed_video

# transcribe as it was before the vad stage: asr hears the whole film.
NO_VAD_WORKFLOW = """\
name: novad
description: transcribe without the vad stage (the graph of the music-bed report)
nodes:
  demux:
    inputs:
      media: job.input
    outputs: [audio, probe]
  asr:
    inputs:
      audio: demux.audio
    outputs: [transcript]
  subtitle_gen:
    inputs:
      transcript: asr.transcript
      probe: demux.probe
    outputs: [srt, vtt]
    params:
      formats: [srt, vtt]
outputs:
  srt: subtitle_gen.srt
"""

# A cue may appear max_lead (0.5 s) early and linger max_lag (1.5 s) to be read; the padding on
# top covers VAD's margins. Outside these the music is alone.
EARLY_S, LATE_S = 1.0, 2.5


def _run(video, out, tmp_path, *args) -> list:
    config = tmp_path / "config"
    (config / "workflows").mkdir(parents=True, exist_ok=True)
    (config / "workflows" / "novad.yaml").write_text(NO_VAD_WORKFLOW)
    env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / f"home-{out.name}"), "CAPTIONBUS_CONFIG": str(config)}
    env.pop("NATS_URL", None)
    done = subprocess.run([sys.executable, "-m", "captionbus", "run", str(video), "-s", "en", "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return list(pysubs2.load(str(out / f"{video.stem}.srt")))


def _in_music(cues, speech_start: float, speech_end: float) -> list[str]:
    return [f"{c.plaintext!r} {c.start / 1000:.2f}-{c.end / 1000:.2f} s" for c in cues
            if c.start / 1000 < speech_start - EARLY_S or c.end / 1000 > speech_end + LATE_S]


def test_speech_over_a_music_bed_gets_no_words_in_the_music(tmp_path, stage_envs, whisper_model):
    video, spoken, (speech_start, speech_end) = music_bed_video(tmp_path / "scene.mp4", bed="organ")

    # The bug, reproduced: without the vad stage a word lands over music alone.
    old = _run(video, tmp_path / "novad", tmp_path, "-w", "novad")
    assert _in_music(old, speech_start, speech_end), (
        "the fixture no longer shows the bug: the graph without VAD wrote nothing over the music "
        f"({[(c.plaintext, c.start) for c in old]})")

    out = tmp_path / "default"
    cues = _run(video, out, tmp_path)
    record = json.loads((out / "scene.job.json").read_text())
    assert record["nodes"]["vad"]["status"] == "completed"  # the default graph has VAD
    assert cues, "no cues at all: the speech was lost under the music"
    assert _in_music(cues, speech_start, speech_end) == []
    heard = " ".join(c.plaintext for c in cues).lower()
    assert sum(w.strip(".,") in heard for w in spoken.lower().split()) >= len(spoken.split()) // 2, heard
