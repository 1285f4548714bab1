"""Small pieces: grapheme counting, rule loading, line breaking, timing."""
from __future__ import annotations

from pathlib import Path

import pytest

from captionbus.core.subtitles import display_len, load_rules
from captionbus.core.subtitles.linebreak import break_text
from captionbus.core.subtitles.timing import place_cues

RULES = load_rules()


@pytest.mark.parametrize("text,n", [("hello", 5), ("नमस्ते", 3), ("क्षत्रिय", 3), ("e\u0301", 1),
                                    ("👍🏽", 1), ("ab\ncd", 4), ("தமிழ்", 3)])
def test_display_len_counts_what_the_eye_sees(text, n):
    assert display_len(text) == n


def test_rules_defaults_profiles_and_languages():
    assert (RULES.max_chars_per_line, RULES.max_lines, RULES.max_cps) == (42, 2, 17.0)
    assert (RULES.min_duration, RULES.max_duration, RULES.min_gap_frames, RULES.default_fps) == (0.833, 7.0, 2, 24.0)
    assert RULES.min_gap_ms() == 90 and RULES.min_gap_check_ms() == 83 and RULES.min_gap_ms(25) == 80
    assert load_rules("fast").max_cps == 20.0
    hi = load_rules("fast", language="hi-IN")
    assert hi.max_cps == 20.0 and "।" in hi.sentence_end and "में" in hi.no_break_before
    assert load_rules(max_cps=12).max_cps == 12
    with pytest.raises(ValueError, match="unknown subtitle profile"):
        load_rules("nope")
    with pytest.raises(ValueError, match="unknown subtitle rule"):
        load_rules(max_cpz=3)


def test_rules_come_from_config_dir(tmp_path: Path, monkeypatch):
    (tmp_path / "subtitles.yaml").write_text("defaults: {max_cps: 11}\nprofiles: {default: {}}\n")
    from captionbus.core import settings
    monkeypatch.setattr(settings, "USER_CONFIG_DIR", tmp_path)
    assert load_rules().max_cps == 11


def test_line_break_prefers_punctuation_and_keeps_articles_with_nouns():
    words = "So we went down to the river that morning, and nobody said a word.".split()
    assert break_text(words, RULES) == ["So we went down to the river that morning,", "and nobody said a word."]
    words = "He was looking for the keys he had dropped in the garden yesterday".split()
    lines = break_text(words, RULES)
    assert len(lines) == 2 and not lines[0].endswith(" the")


def test_line_break_hindi_keeps_postpositions_with_their_noun():
    hi = load_rules(language="hi")
    words = "समिति गुरुवार को बजट नई इमारत और वसंत सत्र की समय-सारणी पर चर्चा करने के लिए मिलेगी".split()
    lines = break_text(words, hi)
    assert len(lines) == 2
    assert lines[1].split()[0] not in hi.no_break_before


def test_short_text_stays_on_one_line():
    assert break_text(["Yes."], RULES) == ["Yes."]


def test_timing_extends_for_reading_speed_and_keeps_the_gap():
    # 40 chars spoken in 1 s need 2.36 s at 17 cps; the next cue starts 3 s later.
    (s1, e1), (s2, e2) = place_cues([(1000, 2000), (5000, 5300)], [40, 4], RULES)
    assert s1 >= 500 and e1 - s1 >= 2360 and e1 <= s2 - 90
    assert e2 - s2 >= 840
    # Back-to-back speakers: the first cue is cut two frames before the second starts.
    (s1, e1), (s2, _) = place_cues([(0, 2000), (2000, 3000)], [10, 10], RULES)
    assert s2 == 2000 and e1 == 1910


def test_timing_never_overlaps_even_when_impossible():
    spans = [(1000, 1000)] * 5  # five one-word cues at the same instant
    times = place_cues(spans, [5] * 5, RULES)
    for (s, e), (s2, _) in zip(times, times[1:]):
        assert e - s >= 840 and s2 - e >= 90
