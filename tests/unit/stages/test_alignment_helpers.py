"""The alignment stage's pure helpers, in the plain interpreter (no torch, no whisperx): the
time guarantees (monotonic, inside the segment, interpolated gaps), mapping whisperx's words
back onto the transcript's words, and the model table (config, env var, service option)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from captionbus.contracts.transcript import Segment, Word
from captionbus.services.alignment.stage import (
    configured_models,
    enforce_word_times,
    regroup,
    resolve_source,
    target_words,
    tighten,
)


def times(words):
    return [(w.start, w.end) for w in words]


def assert_guarantees(words, start, end):
    flat = [t for w in words for t in (w.start, w.end)]
    assert all(t is not None for t in flat)
    assert flat == sorted(flat), flat
    assert all(start <= t <= end for t in flat), (flat, start, end)


def test_timed_words_inside_the_segment_are_kept():
    words = [Word(text="a", start=1.0, end=1.2, score=0.9), Word(text="b", start=1.3, end=1.5)]
    fixed = enforce_word_times(words, 0.5, 2.0)
    assert times(fixed) == [(1.0, 1.2), (1.3, 1.5)] and fixed[0].score == 0.9
    assert words[0].start == 1.0  # inputs are not modified


def test_words_are_clamped_into_the_segment_and_never_go_backwards():
    words = [
        Word(text="early", start=0.1, end=0.9),   # starts before the segment
        Word(text="overlap", start=0.8, end=1.4),  # starts before the previous word ends
        Word(text="reversed", start=1.6, end=1.5),  # end before start
        Word(text="late", start=2.5, end=3.0),     # after the segment
    ]
    fixed = enforce_word_times(words, 0.5, 2.0)
    assert_guarantees(fixed, 0.5, 2.0)
    assert times(fixed) == [(0.5, 0.9), (0.9, 1.4), (1.6, 1.6), (2.0, 2.0)]


def test_untimed_words_share_the_gap_between_neighbours_by_length():
    words = [
        Word(text="when", start=1.0, end=1.2),
        Word(text="1999", start=None, end=None),
        Word(text="12", start=1.5, end=None),  # half a time counts as none
        Word(text="came", start=1.8, end=2.0),
    ]
    fixed = enforce_word_times(words, 0.0, 3.0)
    assert_guarantees(fixed, 0.0, 3.0)
    # gap 1.2..1.8 split 4:2 between "1999" and "12"
    assert times(fixed) == [(1.0, 1.2), (1.2, 1.6), (1.6, 1.8), (1.8, 2.0)]


def test_untimed_words_at_the_edges_use_the_segment_bounds():
    words = [Word(text="ab"), Word(text="mid", start=2.0, end=2.5), Word(text="c"), Word(text="d")]
    fixed = enforce_word_times(words, 1.0, 4.0)
    assert_guarantees(fixed, 1.0, 4.0)
    assert times(fixed) == [(1.0, 2.0), (2.0, 2.5), (2.5, 3.25), (3.25, 4.0)]


def test_no_timed_word_at_all_spreads_over_the_segment():
    fixed = enforce_word_times([Word(text="x"), Word(text="y")], 2.0, 3.0)
    assert times(fixed) == [(2.0, 2.5), (2.5, 3.0)]


def test_nan_and_rounding_keep_the_guarantees():
    words = [Word(text="a", start=0.12345, end=0.2000004), Word(text="b", start=0.2000001, end=math.nan)]
    fixed = enforce_word_times(words, 0.1234, 0.30004)
    assert_guarantees(fixed, 0.1234, 0.30004)
    assert times(fixed) == [(0.1234, 0.2), (0.2, 0.3)]


def test_regroup_maps_whisperx_words_onto_transcript_words():
    units = [{"word": "Hello,", "start": 0.5, "end": 0.8, "score": 0.5},
             {"word": "world.", "start": 0.9, "end": 1.3, "score": 0.7}]
    words = regroup(units, ["Hello,", "world."])
    assert [(w.text, w.start, w.end, w.score) for w in words] == [("Hello,", 0.5, 0.8, 0.5), ("world.", 0.9, 1.3, 0.7)]


def test_regroup_joins_characters_into_words_and_splits_merged_units():
    # ja/zh: whisperx returns one unit per character; the transcript has words
    chars = [{"word": c, "start": i / 10, "end": round(i / 10 + 0.05, 3), "score": 1.0} for i, c in enumerate("今日は晴れ")]
    words = regroup(chars, ["今日", "は", "晴れ"])
    assert [(w.text, w.start, w.end) for w in words] == [("今日", 0.0, 0.15), ("は", 0.2, 0.25), ("晴れ", 0.3, 0.45)]
    # a unit spanning two target words (e.g. a newline whisperx did not split at) covers both
    words = regroup([{"word": "a\nb", "start": 1.0, "end": 2.0}], ["a", "b"])
    assert times(words) == [(1.0, 2.0), (1.0, 2.0)]


def test_regroup_skips_the_character_whisperx_repeats_between_abutting_sentences():
    # whisperx on "Really?! Yes." with Punkt splitting "Really?" | "! Yes.": the "!" twice
    units = [{"word": "Really?!", "start": 1.0, "end": 1.6}, {"word": "!", "start": 1.5, "end": 1.6},
             {"word": "Yes.", "start": 1.8, "end": 2.1}]
    words = regroup(units, ["Really?!", "Yes."])
    assert [(w.text, w.start, w.end) for w in words] == [("Really?!", 1.0, 1.6), ("Yes.", 1.8, 2.1)]


def test_regroup_refuses_different_text_and_keeps_missing_times_missing():
    assert regroup([{"word": "hello", "start": 0, "end": 1}], ["goodbye"]) is None
    assert regroup([{"word": "hel", "start": 0, "end": 1}], ["hello"]) is None  # characters missing
    words = regroup([{"word": "a", "start": 0.1, "end": 0.2}, {"word": "7"}], ["a", "7"])
    assert times(words) == [(0.1, 0.2), (None, None)]


def test_target_words_prefer_the_transcripts_words():
    asr = Segment(start=0, end=1, text="Hello world.", words=[Word(text="Hello"), Word(text="world.")])
    assert target_words(asr, "en") == ["Hello", "world."]
    edited = Segment(start=0, end=1, text="Hello there world.", words=[Word(text="Hello"), Word(text="world.")])
    assert target_words(edited, "en") == ["Hello", "there", "world."]
    assert target_words(Segment(start=0, end=1, text="今日 は"), "ja") == ["今", "日", "は"]


def test_tighten_moves_segment_edges_in_to_its_words_never_out():
    segment = Segment(start=1.0, end=5.0, text="a b", words=[Word(text="a", start=1.5, end=2.0), Word(text="b", start=2.1, end=4.0)])
    assert (tighten(segment).start, tighten(segment).end) == (1.5, 4.0)
    wide = Segment(start=1.0, end=5.0, text="a", words=[Word(text="a", start=0.5, end=6.0)])
    assert (tighten(wide).start, tighten(wide).end) == (1.0, 5.0)


def test_model_table_config_then_env_var_then_option(tmp_path: Path):
    config = tmp_path / "alignment.yaml"
    config.write_text('models:\n  "en": WAV2VEC2_ASR_BASE_960H\n  "hi": org/hindi\n  "no": org/norsk\n  "ta": null\n')
    table = configured_models({}, {}, config)
    assert table == {"en": "WAV2VEC2_ASR_BASE_960H", "hi": "org/hindi", "no": "org/norsk", "ta": None}
    table = configured_models({"model_en": "/opt/w2v-en"}, {"CAPTIONBUS_ALIGN_MODEL_HI": "/opt/w2v-hi", "CAPTIONBUS_ALIGN_MODEL_EN": "/x"}, config)
    assert table["hi"] == "/opt/w2v-hi" and table["en"] == "/opt/w2v-en"


def test_unquoted_no_key_is_refused_with_a_hint(tmp_path: Path):
    config = tmp_path / "alignment.yaml"
    config.write_text("models:\n  no: org/norsk\n")
    with pytest.raises(RuntimeError, match="quote them"):
        configured_models({}, {}, config)


def test_the_shipped_config_has_whisperx_defaults_for_english_and_hindi():
    from captionbus.core.settings import config_path

    table = configured_models({}, {}, config_path("alignment.yaml"))
    assert table["en"] == "WAV2VEC2_ASR_BASE_960H" and table["hi"] == "theainerd/Wav2Vec2-large-xlsr-hindi"
    assert table["no"] and "ta" not in table


def test_resolve_source_tells_folders_from_hub_names(tmp_path: Path):
    (tmp_path / "w2v-hi").mkdir()
    assert resolve_source("w2v-hi", tmp_path) == (str(tmp_path / "w2v-hi"), True)
    assert resolve_source("/abs/missing", tmp_path) == ("/abs/missing", True)
    assert resolve_source("org/model", tmp_path) == ("org/model", False)
    assert resolve_source("WAV2VEC2_ASR_BASE_960H", tmp_path) == ("WAV2VEC2_ASR_BASE_960H", False)
