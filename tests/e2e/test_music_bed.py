"""No phantom words in music: `transcribe` decodes only inside Silero's speech regions, so six
seconds of music before and after a sentence get no cue.

The report: the default graph once (no vad stage; whisperx's own pyannote VAD chose what to
decode) wrote "The speed" over a music bed. The `organ` bed (tests/media.py) reproduces that with
the local Whisper base: the same graph without the vad stage, run here as the workflow
`novad` (a copy of today's `transcribe` minus vad, from CAPTIONBUS_CONFIG), puts a word seconds
before the speech, over music alone. The default graph on the same file must not. Both jobs run
on one stack of transcribe's services (they were a `captionbus run` each): the session's warm
stack (tests/e2e/conftest.py), whose coordinator is restarted knowing `novad` (it was a stack
of its own, whose start with whisperx took 40 s in the whole-suite run)."""
from __future__ import annotations

import json

import pysubs2
import pytest

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


@pytest.fixture
def music_stack(stack):
    """The session's transcribe stack with a coordinator that also knows `novad` (CAPTIONBUS_CONFIG
    adds it; the coordinator reads workflows at start): both graphs run on one stack, where each
    was a `captionbus run` starting its own. The coordinator is restarted as it was afterwards."""
    config = stack.root / "config-novad"
    (config / "workflows").mkdir(parents=True, exist_ok=True)
    (config / "workflows" / "novad.yaml").write_text(NO_VAD_WORKFLOW)
    before = stack.env.get("CAPTIONBUS_CONFIG")
    stack.stop_coordinator()
    stack.env["CAPTIONBUS_CONFIG"] = str(config)
    stack.start_coordinator()
    try:
        yield stack
    finally:
        stack.stop_coordinator()
        if before is None:
            del stack.env["CAPTIONBUS_CONFIG"]
        else:
            stack.env["CAPTIONBUS_CONFIG"] = before
        stack.start_coordinator()


def _run(stack, video, out, workflow: str) -> tuple[list, dict]:
    """The job `captionbus run VIDEO -s en -w WORKFLOW` submits: its cues and its job record."""
    job_id = stack.submit(video, workflow=workflow, source_language="en")
    final = stack.wait_end(job_id, timeout=900)[-1]
    assert final.kind == "completed", getattr(final, "reason", "")
    srt = stack.fetch(final.outputs, out)["srt"]
    return list(pysubs2.load(str(srt))), json.loads(stack.job_state(job_id).model_dump_json())


def _in_music(cues, speech_start: float, speech_end: float) -> list[str]:
    return [f"{c.plaintext!r} {c.start / 1000:.2f}-{c.end / 1000:.2f} s" for c in cues
            if c.start / 1000 < speech_start - EARLY_S or c.end / 1000 > speech_end + LATE_S]


def test_speech_over_a_music_bed_gets_no_words_in_the_music(tmp_path, music_stack):
    video, spoken, (speech_start, speech_end) = music_bed_video(tmp_path / "scene.mp4", bed="organ")

    # The bug, reproduced: without the vad stage a word lands over music alone.
    old, _ = _run(music_stack, video, tmp_path / "novad", "novad")
    assert _in_music(old, speech_start, speech_end), (
        "the fixture no longer shows the bug: the graph without VAD wrote nothing over the music "
        f"({[(c.plaintext, c.start) for c in old]})")

    cues, record = _run(music_stack, video, tmp_path / "default", "transcribe")
    assert record["nodes"]["vad"]["status"] == "completed"  # the default graph has VAD
    assert cues, "no cues at all: the speech was lost under the music"
    assert _in_music(cues, speech_start, speech_end) == []
    heard = " ".join(c.plaintext for c in cues).lower()
    assert sum(w.strip(".,") in heard for w in spoken.lower().split()) >= len(spoken.split()) // 2, heard
