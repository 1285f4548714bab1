"""Golden tests: realistic English and Hindi transcripts -> the SRT we expect, byte for byte.

After a deliberate engine change, look at the diff, then regenerate with
    CAPTIONBUS_UPDATE_GOLDEN=1 pytest tests/unit/subtitles/test_subs_golden.py
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from subtitle_invariants import assert_valid

from captionbus.contracts.transcript import Transcript
from captionbus.core.subtitles import build_cues, check_cues, load_rules
from captionbus.core.subtitles.formats import render

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("language", ["en", "hi"])
def test_golden_srt(language):
    tr = Transcript.model_validate_json((GOLDEN / f"{language}_transcript.json").read_text(encoding="utf-8"))
    rules = load_rules(language=language)
    result = build_cues(tr, rules)
    assert_valid(result, [w for s in tr.segments for w in s.words], rules)
    # Ordinary speech: no rule broken at all.
    assert check_cues(result.cues, rules) == []
    assert result.problems == []
    srt = render(result.cues, "srt")
    expected = GOLDEN / f"{language}.srt"
    if os.environ.get("CAPTIONBUS_UPDATE_GOLDEN"):
        expected.write_text(srt, encoding="utf-8")
    assert srt == expected.read_text(encoding="utf-8")


def test_golden_breaks_are_natural():
    """Spot checks a reader would make on the English golden output."""
    text = (GOLDEN / "en.srt").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line[0].isdigit()]
    glue = ("the", "a", "an", "my", "your", "this")
    assert not [line for line in lines if line.rsplit(" ", 1)[-1].lower() in glue], "line ends on an article"
    assert "So we went down to the river that morning,\nand nobody said a word." in text


def test_golden_hindi_lines_never_start_with_a_postposition():
    rules = load_rules(language="hi")
    text = (GOLDEN / "hi.srt").read_text(encoding="utf-8")
    firsts = [line.split()[0] for line in text.splitlines() if line and not line[0].isdigit()]
    assert not [w for w in firsts if w in rules.no_break_before]
