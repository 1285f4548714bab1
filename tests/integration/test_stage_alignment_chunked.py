"""Alignment per chunk (the `chunked_aligned` workflow) against alignment of the whole film, on
the real alignment stage: the whisperx env runs setup() once, then handle() once on the whole
transcript and once per chunk transcript (param `item`, as the coordinator sends it), with a tiny
random wav2vec2 model from tests/model_factory/wav2vec2.py. The film is espeak-ng speech glued
with exact pauses (tests.media.speech_film); sentences are found at those pauses, and the chunks
are cut at them, as the chunk stage cuts. The chunk outputs go through transcript_join's join().

What it shows: the joined per-chunk word times equal the unchunked ones within 20 ms (the stage
aligns every segment in its own window of the WAV, so they are expected to be identical), each
chunk's request reads WAV samples only inside its own chunk, and every segment is aligned once.
Random weights mean the times are valid CTC paths, not accurate ones: the comparison is between
the two paths, which is what chunking could break. No ASR runs (transcripts are written here)."""
from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from captionbus.contracts.transcript import Segment, Transcript
from captionbus.services.transcript_join.stage import join
from tests import envtools
from tests import media as test_media
from tests.model_factory.wav2vec2 import ensure_wav2vec2

RUNNER = r"""
import json, sys, time
from pathlib import Path
import structlog
import captionbus.services.alignment.stage as alignment
from captionbus.services.runtime import SetupContext
from captionbus.services.runtime.testing import make_fake_context

reads = []  # (start_s, end_s) of every WAV window the stage read, per run
original_read_wav = alignment.read_wav
def recording_read_wav(path, start_s=0.0, end_s=None, **kw):
    reads[-1].append((start_s, end_s))
    return original_read_wav(path, start_s=start_s, end_s=end_s, **kw)
alignment.read_wav = recording_read_wav

options, work, audio, *jobs = sys.argv[1:]
resources = alignment.STAGE.setup(SetupContext(stage="alignment", env="whisperx", models_dir=Path(work),
                                               log=structlog.get_logger(), options=json.loads(options)))
runs = []
for n, job in enumerate(jobs):
    transcript, params = job.split("|", 1)
    reads.append([])
    ctx = make_fake_context(Path(work) / f"run{n}", "alignment", inputs={"audio": Path(audio), "transcript": Path(transcript)},
                            params=json.loads(params), resources=resources)
    out = alignment.STAGE.handle(ctx.request, ctx)
    runs.append({"transcript": json.loads(out["transcript"].read_text()), "metrics": ctx.metrics,
                 "warnings": ctx.warnings, "reads": reads[-1]})
print("RESULT " + json.dumps({"runs": runs}))
"""

PAUSE_S = 0.3  # espeak's own silences inside a sentence are shorter; the film's pauses are 0.4-1.2 s


def sentence_spans(wav: Path) -> list[tuple[float, float]]:
    """(start, end) of each run of sound between exact-zero pauses of at least PAUSE_S."""
    with wave.open(str(wav)) as w:
        rate = w.getframerate()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    loud = np.flatnonzero(np.abs(samples) > 0)
    gaps = np.flatnonzero(np.diff(loud) > PAUSE_S * rate)
    starts = [loud[0], *loud[gaps + 1]]
    ends = [*loud[gaps], loud[-1]]
    return [(s / rate, e / rate) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def aligned_both_ways(tmp_path_factory):
    if not test_media.tools_available():
        pytest.skip(test_media.MISSING)
    tmp = tmp_path_factory.mktemp("alignment_chunked")
    model = ensure_wav2vec2(envtools.test_models_root(), "en")
    sentences = test_media.FILM_SENTENCES[:6]
    wav, _ = test_media.speech_film(tmp / "film.wav", sentences=sentences, video=False)
    spans = sentence_spans(wav)
    assert len(spans) == len(sentences), spans
    with wave.open(str(wav)) as w:
        duration = w.getnframes() / w.getframerate()
    # as asr writes them: a little slack around each sentence, no word times
    segments = [Segment(start=round(max(0.0, s - 0.1), 3), end=round(min(duration, e + 0.1), 3), text=text)
                for (s, e), text in zip(spans, sentences)]
    whole = Transcript(language="en", duration=duration, model="test", segments=segments)
    # chunks cut at pauses (mid-pause between sentences), as the chunk stage cuts
    groups = [segments[0:2], segments[2:5], segments[5:6]]
    cuts = [0.0] + [round((a[-1].end + b[0].start) / 2, 3) for a, b in zip(groups, groups[1:])] + [duration]
    chunks = [Transcript(language="en", duration=duration, model="test", segments=g) for g in groups]
    paths = []
    for name, transcript in [("whole", whole)] + [(f"chunk{i}", c) for i, c in enumerate(chunks)]:
        paths.append(tmp / f"{name}.json")
        paths[-1].write_text(transcript.model_dump_json())
    params = [{}] + [{"item": i} for i in range(len(chunks))]
    options = {"model_en": str(model), "threads": "2", "device": "cpu"}
    results = envtools.run_in_env(
        "whisperx", RUNNER, json.dumps(options), str(tmp / "work"), str(wav),
        *(f"{p}|{json.dumps(q)}" for p, q in zip(paths, params)),
        timeout=600, extra_env={"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"},
    )
    runs = results["runs"]
    return {"whole": runs[0], "chunks": runs[1:], "cuts": cuts, "groups": groups, "segments": segments}


def test_chunked_then_joined_word_times_equal_the_unchunked_within_20_ms(aligned_both_ways):
    whole = Transcript.model_validate(aligned_both_ways["whole"]["transcript"])
    joined = join([Transcript.model_validate(r["transcript"]) for r in aligned_both_ways["chunks"]], None)
    assert whole.aligned and joined.aligned
    assert [s.text for s in joined.segments] == [s.text for s in whole.segments]
    pairs = [(a, b) for sa, sb in zip(whole.segments, joined.segments) for a, b in zip(sa.words, sb.words)]
    assert len(pairs) == sum(len(s.text.split()) for s in aligned_both_ways["segments"]) > 40
    worst = max(max(abs(a.start - b.start), abs(a.end - b.end)) for a, b in pairs)
    print(f"{len(pairs)} words; largest chunked vs unchunked difference {worst * 1000:.1f} ms")
    assert all(a.text == b.text for a, b in pairs)
    assert worst <= 0.020


def test_each_chunk_reads_only_its_own_window_and_aligns_each_segment_once(aligned_both_ways):
    cuts = aligned_both_ways["cuts"]
    for i, (run, group) in enumerate(zip(aligned_both_ways["chunks"], aligned_both_ways["groups"])):
        assert run["reads"], f"chunk {i} read no audio"
        for start, end in run["reads"]:
            assert cuts[i] <= start and end <= cuts[i + 1], (i, start, end, cuts)
        assert run["metrics"]["segments"] == len(group) and run["metrics"]["fallback"] == 0.0
        assert run["warnings"] == []
    assert sum(r["metrics"]["segments"] for r in aligned_both_ways["chunks"]) == len(aligned_both_ways["segments"])
    assert len(aligned_both_ways["whole"]["reads"]) == len(aligned_both_ways["segments"])  # one window per segment
