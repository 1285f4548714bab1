"""Compounds break after their hyphen, never before it: "an Inter-" / "Asterisk exchange",
not "an Inter" / "-Asterisk exchange" (Whisper hands the hyphen to the word after it)."""
from __future__ import annotations

import pytest

from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.core.subtitles import build_cues
from captionbus.core.subtitles.linebreak import break_text, hyphen_pieces, is_hyphen_continuation
from captionbus.core.subtitles.rules import load_rules

RULES = load_rules()


def test_pieces_move_a_leading_hyphen_up_and_split_compounds_after_their_hyphens():
    assert hyphen_pieces(["an", "Inter", "-Asterisk", "exchange"]) == (
        ["an", "Inter-", "Asterisk", "exchange"], [0, 1, 2, 3], [False, False, True, False])
    assert hyphen_pieces(["state-of-the-art"])[0] == ["state-", "of-", "the-", "art"]
    # dashes and dialogue hyphens are not compounds
    assert hyphen_pieces(["Wait", "–", "no"])[0] == ["Wait", "–", "no"]
    assert hyphen_pieces(["Yes.", "-No."])[0] == ["Yes.", "-No."]
    assert hyphen_pieces(["-", "x-"])[0] == ["-", "x-"]
    assert not is_hyphen_continuation("Inter", "-") and not is_hyphen_continuation("Inter", "--x")


@pytest.mark.parametrize("width", [18, 20])
def test_a_compound_that_must_break_breaks_after_its_hyphen(width):
    rules = RULES.replace(max_chars_per_line=width)
    for words in (["uses", "an", "Inter", "-Asterisk", "exchange"], ["uses", "an", "Inter-Asterisk", "exchange"]):
        lines = break_text(words, rules)
        assert all(len(line) <= width for line in lines), lines
        assert not any(line.startswith("-") for line in lines), lines
        assert " ".join(lines).replace("- ", "-") == "uses an Inter-Asterisk exchange", lines
        assert len(lines) == 2 and lines[0].endswith("Inter-"), lines  # the one break that fits


def test_engine_cues_from_whisper_words_keep_the_hyphen_on_the_upper_line():
    text = "The call went through an Inter -Asterisk exchange before it reached the other side of town"
    words, t = [], 0.0
    for w in text.split():
        words.append(Word(text=w, start=t, end=t + 0.3))
        t += 0.35
    transcript = Transcript(language="en", segments=[Segment(start=0.0, end=t, text=text, words=words)])
    for width in (24, 30, 36, 42):
        cues = build_cues(transcript, RULES.replace(max_chars_per_line=width)).cues
        lines = [line for cue in cues for line in cue.lines]
        assert not any(line.startswith("-") for line in lines), lines
        assert not any(line.endswith(" Inter") or line == "Inter" for line in lines), lines
        joined = " ".join(lines).replace("- ", "-")
        assert "Inter-Asterisk" in joined and "Inter -Asterisk" not in joined, lines
