"""subtitle_gen: transcript JSON -> SRT + VTT that pysubs2 reads back, within the simple line rules."""
from __future__ import annotations

from pathlib import Path

import pysubs2
import pytest

from contracts.transcript import Segment, Transcript, Word
from services.runtime import BadInput
from services.subtitle_gen.stage import MAX_CUE_SECONDS, MAX_LINE_CHARS, STAGE, simple_cues, wrap_lines


def _words(text: str, start: float, per_word: float) -> list[Word]:
    return [Word(text=t, start=start + i * per_word, end=start + (i + 1) * per_word - 0.05) for i, t in enumerate(text.split())]


def _transcript(tmp_path: Path, segments: list[Segment], language: str = "en") -> Path:
    path = tmp_path / "transcript.json"
    path.write_text(Transcript(language=language, segments=segments).model_dump_json())
    return path


LONG = (
    "The quick brown fox jumps over the lazy dog while seven friendly sailors watch the golden "
    "sunset from the quiet harbour and the gulls circle slowly above the old stone lighthouse"
)


def test_srt_and_vtt_parse_back_with_the_words_and_times(tmp_path, make_context):
    segments = [
        Segment(start=0.5, end=2.0, text="Hello there.", words=_words("Hello there.", 0.5, 0.7)),
        Segment(start=3.0, end=3.0 + 0.4 * len(LONG.split()), text=LONG, words=_words(LONG, 3.0, 0.4)),
    ]
    ctx = make_context("subtitle_gen", inputs={"transcript": _transcript(tmp_path, segments)}, params={"language": "en"})
    outputs = STAGE.handle(ctx.request, ctx)
    assert outputs["srt"].name == "subtitles.en.srt" and outputs["vtt"].name == "subtitles.en.vtt"

    srt, vtt = pysubs2.load(str(outputs["srt"])), pysubs2.load(str(outputs["vtt"]))
    assert [(e.start, e.end, e.text) for e in srt] == [(e.start, e.end, e.text) for e in vtt]
    assert srt[0].start == 500 and srt[0].plaintext == "Hello there."
    heard = " ".join(e.plaintext.replace("\n", " ") for e in srt)
    assert heard.split() == ("Hello there. " + LONG).split()
    for event in srt:
        lines = event.plaintext.split("\n")
        assert len(lines) <= 2 and all(len(line) <= MAX_LINE_CHARS for line in lines), lines
        assert (event.end - event.start) / 1000 <= MAX_CUE_SECONDS + 0.001
    assert all(a.end <= b.start for a, b in zip(srt, srt[1:]))
    # The long segment had to be split on its word times: the second cue starts where its first word does.
    second_cue_first_word = srt[2].plaintext.split()[0]
    index = LONG.split().index(second_cue_first_word)
    assert srt[2].start == round((3.0 + 0.4 * index) * 1000)


def test_segments_without_word_times_are_spread_over_the_segment():
    transcript = Transcript(language="en", segments=[Segment(start=10.0, end=20.0, text=LONG)])
    cues = simple_cues(transcript)
    assert len(cues) >= 2
    assert cues[0].start == pytest.approx(10.0) and cues[-1].end == pytest.approx(20.0, abs=0.01)


def test_wrap_lines_balances_two_lines():
    assert wrap_lines("short") == ["short"]
    top, bottom = wrap_lines("one two three four five six seven eight nine ten eleven twelve")
    assert abs(len(top) - len(bottom)) <= 6
    assert wrap_lines("x" * 100) is None


def test_empty_transcript_gives_empty_files_and_a_warning(tmp_path, make_context):
    ctx = make_context("subtitle_gen", inputs={"transcript": _transcript(tmp_path, [])})
    outputs = STAGE.handle(ctx.request, ctx)
    assert len(pysubs2.load(str(outputs["srt"]), format_="srt")) == 0
    assert outputs["vtt"].read_text().startswith("WEBVTT")
    assert ctx.warnings


def test_not_a_transcript_is_bad_input(tmp_path, make_context):
    bad = tmp_path / "transcript.json"
    bad.write_text('{"segments": "nope"}')
    ctx = make_context("subtitle_gen", inputs={"transcript": bad})
    with pytest.raises(BadInput, match="not valid transcript JSON"):
        STAGE.handle(ctx.request, ctx)


def test_unknown_language_is_bad_input(tmp_path, make_context):
    ctx = make_context("subtitle_gen", inputs={"transcript": _transcript(tmp_path, [])}, params={"language": "xx"})
    with pytest.raises(BadInput, match="unknown language code 'xx'"):
        STAGE.handle(ctx.request, ctx)
