"""subtitle_gen: transcript JSON -> SRT + VTT that pysubs2 reads back, laid out by the rule
engine (captionbus.core.subtitles) and passing its checker."""
from __future__ import annotations

import json
from pathlib import Path

import pysubs2
import pytest

from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.core.subtitles import check_file, load_rules
from captionbus.services.runtime import BadInput
from captionbus.services.subtitle_gen.stage import STAGE

LONG = (
    "The quick brown fox jumps over the lazy dog while seven friendly sailors watch the golden "
    "sunset from the quiet harbour and the gulls circle slowly above the old stone lighthouse"
)


def _words(text: str, start: float, per_word: float) -> list[Word]:
    return [Word(text=t, start=start + i * per_word, end=start + (i + 1) * per_word - 0.05) for i, t in enumerate(text.split())]


def _transcript(tmp_path: Path, segments: list[Segment], language: str = "en") -> Path:
    path = tmp_path / "transcript.json"
    path.write_text(Transcript(language=language, segments=segments).model_dump_json())
    return path


def _segments() -> list[Segment]:
    return [
        Segment(start=0.5, end=2.0, text="Hello there.", words=_words("Hello there.", 0.5, 0.7)),
        Segment(start=3.0, end=3.0 + 0.4 * len(LONG.split()), text=LONG, words=_words(LONG, 3.0, 0.4)),
    ]


def test_srt_and_vtt_parse_back_with_the_words_and_times(tmp_path, make_context):
    ctx = make_context("subtitle_gen", inputs={"transcript": _transcript(tmp_path, _segments())}, params={"language": "en"})
    outputs = STAGE.handle(ctx.request, ctx)
    assert outputs["srt"].name == "subtitles.en.srt" and outputs["vtt"].name == "subtitles.en.vtt"

    srt, vtt = pysubs2.load(str(outputs["srt"])), pysubs2.load(str(outputs["vtt"]))
    assert [(e.start, e.end, e.text) for e in srt] == [(e.start, e.end, e.text) for e in vtt]
    assert abs(srt[0].start - 500) <= 10 and srt[0].plaintext == "Hello there."
    heard = " ".join(e.plaintext.replace("\n", " ") for e in srt)
    assert heard.split() == ("Hello there. " + LONG).split()
    assert len(srt) >= 3  # the long segment was split on its word times
    assert all(a.end <= b.start for a, b in zip(srt, srt[1:]))
    report = check_file(outputs["srt"], load_rules(language="en"))
    assert report.ok, report.render()
    assert ctx.metrics["cues"] == len(srt)


def test_probe_fps_is_used_for_frame_gaps(tmp_path, make_context):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"fps": 25.0, "duration": 30.0}))
    ctx = make_context("subtitle_gen", inputs={"transcript": _transcript(tmp_path, _segments()), "probe": probe})
    outputs = STAGE.handle(ctx.request, ctx)
    srt = pysubs2.load(str(outputs["srt"]))
    assert len(srt) >= 2 and all(b.start - a.end >= 80 for a, b in zip(srt, srt[1:]))  # two frames at 25 fps


def test_empty_transcript_gives_empty_files_and_a_warning(tmp_path, make_context):
    ctx = make_context("subtitle_gen", inputs={"transcript": _transcript(tmp_path, [])})
    outputs = STAGE.handle(ctx.request, ctx)
    assert len(pysubs2.load(str(outputs["srt"]), format_="srt")) == 0
    assert outputs["vtt"].read_text().startswith("WEBVTT")
    assert ctx.warnings


@pytest.mark.parametrize(
    "params, content, expected",
    [
        ({}, '{"segments": "nope"}', "input 'transcript' is not valid Transcript JSON: field 'language' is missing; "
                                    "segments='nope': Input should be a valid array"),
        ({"language": "xx"}, None, "unknown language code 'xx'"),
        ({"profile": "nosuch"}, None, "unknown subtitle profile 'nosuch'"),
        ({"formats": ["srt", "docx"]}, None, "formats.1='docx': Input should be 'srt', 'vtt', 'ass', 'json' or 'txt'"),
        ({"speaker_names": "A=Anna,Ben"}, None, "use either LABEL=Name pairs or a plain list of names, not both"),
        ({"speaker_names": {"A": "<b>Anna</b>"}}, None, "speaker_names.A='<b>Anna</b>': String should match pattern"),
        ({"dialogue_dash": "*"}, None, "dialogue_dash='*': Input should be"),
    ],
)
def test_bad_requests_are_bad_input(params, content, expected, tmp_path, make_context):
    path = _transcript(tmp_path, [])
    if content is not None:
        path.write_text(content)
    ctx = make_context("subtitle_gen", inputs={"transcript": path}, params=params)
    with pytest.raises(BadInput) as caught:
        STAGE.handle(ctx.request, ctx)
    assert expected in str(caught.value)


def test_formats_param_picks_the_outputs(tmp_path, make_context):
    ctx = make_context("subtitle_gen", inputs={"transcript": _transcript(tmp_path, _segments())}, params={"formats": ["srt", "ass"]})
    outputs = STAGE.handle(ctx.request, ctx)
    assert sorted(outputs) == ["ass", "srt"] and outputs["ass"].name == "subtitles.en.ass"
    assert len(pysubs2.load(str(outputs["ass"]))) == len(pysubs2.load(str(outputs["srt"])))


EXCHANGE = [("Are you coming?", 1.0, "SPEAKER_00"), ("In a minute.", 1.95, "SPEAKER_01"),
            ("Hurry up.", 2.9, "SPEAKER_00"), ("Okay.", 3.55, "SPEAKER_01"),
            ("Then we walked down to the river together.", 7.0, "SPEAKER_00")]


def _exchange() -> list[Segment]:
    return [Segment(start=start, end=start + 0.3 * len(text.split()), text=text, speaker=speaker,
                    words=[Word(**w.model_dump(exclude={"speaker"}), speaker=speaker) for w in _words(text, start, 0.3)])
            for text, start, speaker in EXCHANGE]


def test_speakers_give_dialogue_cues_names_and_voices(tmp_path, make_context):
    ctx = make_context("subtitle_gen", inputs={"transcript": _transcript(tmp_path, _exchange())},
                       params={"speaker_names": "A=Anna,B=Ben", "formats": ["srt", "vtt"]})
    outputs = STAGE.handle(ctx.request, ctx)
    srt = outputs["srt"].read_text(encoding="utf-8")
    assert "-[Anna] Hurry up.\n-[Ben] Okay.\n" in srt and "<v" not in srt
    assert "\n[Anna] Then we walked" in srt  # a name where its speaker starts talking again
    vtt = outputs["vtt"].read_text(encoding="utf-8")
    assert "<v Anna>-[Anna] Hurry up.</v>\n<v Ben>-[Ben] Okay.</v>" in vtt
    report = check_file(outputs["srt"], load_rules(language="en"))
    assert report.ok, report.render()
    assert ctx.metrics["dialogue_cues"] >= 1


def test_dash_style_param_and_no_names_by_default(tmp_path, make_context):
    ctx = make_context("subtitle_gen", inputs={"transcript": _transcript(tmp_path, _exchange())},
                       params={"dialogue_dash": "- "})
    srt = STAGE.handle(ctx.request, ctx)["srt"].read_text(encoding="utf-8")
    assert "- Hurry up.\n- Okay.\n" in srt and "[" not in srt and "SPEAKER" not in srt


def test_without_speakers_the_files_are_what_they_were(tmp_path, make_context):
    golden = Path(__file__).parents[1] / "subtitles" / "golden"
    transcript = Transcript.model_validate_json((golden / "en_transcript.json").read_text(encoding="utf-8"))
    for seg in transcript.segments:
        seg.speaker = None
    path = tmp_path / "plain.json"
    path.write_text(transcript.model_dump_json())
    ctx = make_context("subtitle_gen", inputs={"transcript": path})
    outputs = STAGE.handle(ctx.request, ctx)
    for fmt in ("srt", "vtt"):
        assert outputs[fmt].read_bytes() == (golden / "nospeakers" / f"en.{fmt}").read_bytes()
    assert ctx.metrics["dialogue_cues"] == 0
