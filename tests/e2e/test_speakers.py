"""`captionbus run --speakers auto` as a user runs it (issue 21): a ~35 s dialogue of three
recorded human voices (tests/speakers_media.py: Dutch and Czech actors, turns with no gap and a
speaker coming back), muxed into an mp4, through the `chunked` workflow cut into ~10 s chunks:
one asr request per chunk, one diarization request for the whole film, transcript_join putting
the speakers on the words. On real parts: nats-server, ffmpeg, Silero VAD, Whisper base
(whisperx env), CAM++ (diarization env).

What is checked against the dialogue's ground truth: every timed word has a speaker; the words
inside each reference turn carry one label per true speaker, the same label wherever that voice
speaks again (also in another chunk), three labels in all, numbered in order of first appearance;
the speaker of each segment is one of its words'."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests import speakers_media
from tests.envtools import built_env

PLAN = [("nl-small", 2, 0.5), ("cs-big", 2, 0.3), ("nl-big", 2, 0.0), ("nl-small", 1, 0.6),
        ("cs-big", 1, 0.0), ("nl-big", 1, 0.4), ("nl-small", 1, 0.0)]


@pytest.fixture(scope="module")
def dialogue_film(tmp_path_factory) -> tuple[Path, list[speakers_media.Turn]]:
    root = tmp_path_factory.mktemp("speakers")
    wav = root / "dialogue.wav"
    truth = speakers_media.make(wav, PLAN, seed=3)
    film = root / "dialogue.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "color=black:s=160x90:r=25",
                    "-i", str(wav), "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
                    str(film)], check=True, timeout=300)
    return film, truth


def test_run_with_speakers_labels_every_word_consistently_across_chunks(tmp_path, dialogue_film, stage_envs,
                                                                         whisper_model):
    from captionbus import models

    built_env("diarization")
    models.ensure_campplus()
    film, truth = dialogue_film
    assert 25 <= truth[-1].end <= 60 and len({t.speaker for t in truth}) == 3
    out = tmp_path / "out"
    env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home")}
    env.pop("NATS_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "captionbus", "run", str(film), "-w", "chunked", "--chunk-s", "10", "-s", "nl",
         "--speakers", "auto", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "dialogue.job.json").read_text())
    asr_chunks = [n for n in record["nodes"] if n.startswith("asr-")]
    assert len(asr_chunks) >= 2, record["nodes"].keys()  # the film was really cut
    assert [n for n in record["nodes"] if n.startswith("diarization")] == ["diarization"]  # one per film
    assert record["nodes"]["diarization"]["status"] == "completed"

    transcript = json.loads((out / "dialogue.transcript.json").read_text())
    words = [w for s in transcript["segments"] for w in s["words"] if w["start"] is not None]
    assert len(words) >= 30, transcript
    assert all(w["speaker"] is not None for w in words), [w for w in words if w["speaker"] is None]
    for segment in transcript["segments"]:
        assert segment["speaker"] in {w["speaker"] for w in segment["words"]}

    # each reference turn's words -> their majority label
    heard = []
    for turn in truth:
        inside = [w["speaker"] for w in words if turn.start <= (w["start"] + w["end"]) / 2 <= turn.end]
        if inside:
            label, votes = Counter(inside).most_common(1)[0]
            heard.append((turn.speaker, label, votes / len(inside)))
    assert len(heard) >= len(truth) - 2, (heard, truth)
    assert all(share >= 0.6 for _, _, share in heard), heard
    mapping = {}
    for who, label, _ in heard:
        mapping.setdefault(who, label)
        assert mapping[who] == label, f"{who} is {mapping[who]} and {label}: {heard}"
    assert len(set(mapping.values())) == 3, mapping  # three voices, three labels
    first_seen = list(dict.fromkeys(who for who, _, _ in heard))
    assert [mapping[who] for who in first_seen] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_02"], mapping
    assert {w["speaker"] for w in words} == {"SPEAKER_00", "SPEAKER_01", "SPEAKER_02"}
