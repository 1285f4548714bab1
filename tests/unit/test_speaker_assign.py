"""Words to speakers (captionbus/core/speakers.py) and transcript_join's `turns` input (issue 21): each word
takes the turn covering most of it, ties go to the earlier turn, words without times or far from
every turn get none, segments take their words' majority speaker."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns
from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.core.speakers import assign_speakers, speaker_of
from captionbus.services.runtime.testing import make_fake_context
from captionbus.services.transcript_join.stage import STAGE as JOIN

TURNS = [SpeakerTurn(start=0.0, end=2.0, speaker="SPEAKER_00"), SpeakerTurn(start=2.0, end=4.0, speaker="SPEAKER_01"),
         SpeakerTurn(start=6.0, end=7.0, speaker="SPEAKER_02")]


@pytest.mark.parametrize("start, end, expected", [
    (0.5, 0.9, "SPEAKER_00"),  # inside one turn
    (1.8, 2.5, "SPEAKER_01"),  # 0.2 s in the first, 0.5 s in the second: most of it
    (1.9, 2.05, "SPEAKER_00"),  # 0.1 s against 0.05 s
    (1.9, 2.1, "SPEAKER_00"),  # a tie (0.1 s each): the earlier turn, who was speaking as it began
    (4.2, 4.4, "SPEAKER_01"),  # no turn touches it: the nearest within 0.5 s
    (5.0, 5.2, None),  # 0.8 s from every turn: unknown, not a guess
    (6.5, 6.5, "SPEAKER_02"),  # zero length inside a turn
    (None, None, None),  # the recogniser gave no times
    (3.0, None, None),
])
def test_a_word_takes_the_turn_covering_most_of_it(start, end, expected):
    assert speaker_of(start, end, TURNS) == expected


def test_no_turns_no_speakers():
    assert speaker_of(0.0, 1.0, []) is None


def transcript() -> Transcript:
    return Transcript(language="nl", segments=[
        Segment(start=0.2, end=2.6, text="een twee drie", words=[
            Word(text="een", start=0.2, end=0.6), Word(text="twee", start=0.7, end=1.5),
            Word(text="drie", start=2.1, end=2.6)]),
        Segment(start=6.1, end=6.9, text="vier", words=[Word(text="vier")]),  # a word without times
        Segment(start=2.5, end=3.5, text="vijf"),  # no words at all
    ])


def test_segments_take_their_words_majority_speaker():
    out = assign_speakers(transcript(), list(reversed(TURNS)))  # any order in: sorted by time
    first, untimed, wordless = out.segments
    assert [w.speaker for w in first.words] == ["SPEAKER_00", "SPEAKER_00", "SPEAKER_01"]
    assert first.speaker == "SPEAKER_00"  # 1.2 s of SPEAKER_00 against 0.5 s
    assert untimed.words[0].speaker is None and untimed.speaker == "SPEAKER_02"  # from the segment's own span
    assert wordless.speaker == "SPEAKER_01"
    assert [s.text for s in out.segments] == [s.text for s in transcript().segments]


def test_transcript_join_puts_the_turns_on_the_words(tmp_path: Path):
    part = tmp_path / "asr.json"
    part.write_text(transcript().model_dump_json())
    turns = tmp_path / "turns.json"
    turns.write_text(SpeakerTurns(duration=8.0, speakers=["SPEAKER_00", "SPEAKER_01", "SPEAKER_02"],
                                  turns=TURNS).model_dump_json())
    ctx = make_fake_context(tmp_path / "work", "transcript_join", inputs={"turns": turns},
                            input_lists={"transcripts": [part]})
    out = JOIN.handle(ctx.request, ctx)
    joined = json.loads(out["transcript"].read_text())
    assert [s["speaker"] for s in joined["segments"]] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_02"]  # time order
    assert [w["speaker"] for w in joined["segments"][0]["words"]] == ["SPEAKER_00", "SPEAKER_00", "SPEAKER_01"]
    assert ctx.metrics["speakers"] == 3 and ctx.metrics["words_without_speaker"] == 1


def test_turns_that_are_not_turns_are_bad_input(tmp_path: Path):
    from captionbus.services.runtime import BadInput

    part = tmp_path / "asr.json"
    part.write_text(transcript().model_dump_json())
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps({"duration": 1.0, "turns": [{"start": 2.0, "end": 1.0, "speaker": "A"}]}))
    ctx = make_fake_context(tmp_path / "work", "transcript_join", inputs={"turns": turns},
                            input_lists={"transcripts": [part]})
    with pytest.raises(BadInput, match="turns"):
        JOIN.handle(ctx.request, ctx)


def test_diarized_json_splits_a_segment_at_a_change_of_speaker():
    """The door's diarized_json (OpenAI's shape, checked with the official client's model): one
    segment per run of one speaker's words, speakers as letters, a segment without timed words
    as it is."""
    from openai.types.audio import TranscriptionDiarized

    from captionbus.gateway.openai_format import as_diarized_json

    body = as_diarized_json(assign_speakers(transcript().model_copy(update={"duration": 8.0}), TURNS))
    parsed = TranscriptionDiarized.model_validate(body)
    assert [(s.id, s.speaker, s.text, s.start, s.end) for s in parsed.segments] == [
        ("seg_0", "A", "een twee", 0.2, 1.5), ("seg_1", "B", "drie", 2.1, 2.6),
        ("seg_2", "C", "vier", 6.1, 6.9), ("seg_3", "B", "vijf", 2.5, 3.5)]
    assert parsed.task == "transcribe" and parsed.duration == 8.0 and parsed.text == "een twee drie vier vijf"
    assert all(s.type == "transcript.text.segment" for s in parsed.segments)
    assert parsed.usage.type == "duration" and parsed.usage.seconds == 8.0
