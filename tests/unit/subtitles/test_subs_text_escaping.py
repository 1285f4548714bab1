"""Cue text is written as the words are: characters that mean markup in a format are escaped, never
dropped (pysubs2 keeps text as ASS markup, so `{…}` was an override block and vanished from SRT/VTT)."""
from __future__ import annotations

import pytest

from captionbus.core.subtitles.cues import Cue
from captionbus.core.subtitles.formats import parse_subtitles, render

CUES = [Cue(0, 1000, ["x < y & AT&T", "{laughs} a --> b"]),
        Cue(1000, 2000, ["-Hi <3", "-Bye"], voices=["A&B", "C"])]


def test_webvtt_escapes_markup_and_reads_it_back():
    text = render(CUES, "vtt")
    assert "x &lt; y &amp; AT&amp;T\n{laughs} a --&gt; b\n" in text
    assert "<v A&amp;B>-Hi &lt;3</v>\n<v C>-Bye</v>" in text
    # no cue line may hold a timing arrow: a WebVTT parser would take it for the next cue's times
    body = text.split("\n\n", 1)[1]
    assert sum("-->" in line for line in body.splitlines()) == len(CUES)
    back = parse_subtitles(text, "vtt")
    assert back[1].lines == ["-Hi <3", "-Bye"]
    assert back[0].lines[0] == "x < y & AT&T"


@pytest.mark.parametrize("fmt", ["srt", "vtt", "ass"])
def test_braces_are_text_not_override_blocks(fmt):
    text = render(CUES, fmt)
    assert "{laughs} a" in text


def test_srt_keeps_characters_literal():
    text = render(CUES, "srt")
    assert "x < y & AT&T\n" in text and "-Hi <3\n-Bye" in text
