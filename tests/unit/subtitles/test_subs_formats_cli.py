"""Formats round-trip through pysubs2; `subs check` / `subs fix` on a user's broken file."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from captionbus.subs_cli import subs
from captionbus.core.subtitles import (
    build_cues,
    check_cues,
    check_file,
    fix_file,
    load_rules,
    read_subtitles,
    write_subtitles,
)
from captionbus.core.subtitles.samples import synthetic_transcript

RULES = load_rules()

# Every rule broken, yet fixable without showing any text before the cue it was written in (subs
# fix never does): cue 3 has room after its end for its 88 characters.
BROKEN_SRT = """1
00:00:01,000 --> 00:00:01,500
Hello there, this is a very long subtitle line that goes on well past the limit

2
00:00:01,520 --> 00:00:09,000
Short.

3
00:00:08,900 --> 00:00:13,500
<i>Then we walked home</i> and nobody said anything at all for the rest of the evening.
"""


@pytest.fixture(scope="module")
def cues():
    return build_cues(synthetic_transcript("hi", sentences=8), load_rules(language="hi")).cues


@pytest.mark.parametrize("fmt", ["srt", "vtt", "ass"])
def test_round_trip_keeps_times_and_lines(tmp_path: Path, cues, fmt):
    path = write_subtitles(cues, tmp_path / f"out.{fmt}")
    back = read_subtitles(path)
    assert [(c.start_ms, c.end_ms, c.lines) for c in back] == [(c.start_ms, c.end_ms, c.lines) for c in cues]
    # ASS stores centiseconds: the 10 ms grid keeps every gap and duration intact.
    assert check_cues(back, load_rules(language="hi")) == []


def test_ass_is_styled(tmp_path: Path, cues):
    text = write_subtitles(cues, tmp_path / "out.ass").read_text(encoding="utf-8")
    assert "PlayResY: 1080" in text and "Style: Default,Arial,54" in text
    assert "\\N" in text  # our line breaks, not the renderer's wrapping


def test_json_keeps_the_words(tmp_path: Path, cues):
    back = read_subtitles(write_subtitles(cues, tmp_path / "cues.json"))
    assert [[w.model_dump() for w in c.words] for c in back] == [[w.model_dump() for w in c.words] for c in cues]
    assert [c.speaker for c in back] == [c.speaker for c in cues]


def test_plain_text_is_one_cue_per_line(tmp_path: Path, cues):
    text = write_subtitles(cues, tmp_path / "out.txt").read_text(encoding="utf-8")
    assert text.splitlines() == [" ".join(c.lines) for c in cues]
    with pytest.raises(ValueError):
        read_subtitles(tmp_path / "out.txt")


def test_check_counts_each_rule(tmp_path: Path):
    path = tmp_path / "broken.srt"
    path.write_text(BROKEN_SRT, encoding="utf-8")
    report = check_file(path, RULES)
    assert report.cues == 3
    assert report.counts == {"line_length": 2, "line_count": 0, "min_duration": 1, "max_duration": 1,
                             "reading_speed": 2, "min_gap": 1, "overlap": 1, "order": 0,
                             "speaker_line": 0, "dialogue": 0}
    assert sum(n for _, n in report.cps_histogram()) == 3
    # Formatting tags are not characters a viewer reads.
    assert all("<i>" not in line for v in report.violations for line in [v.message])


def test_fix_makes_a_broken_file_pass(tmp_path: Path):
    path = tmp_path / "broken.srt"
    path.write_text(BROKEN_SRT, encoding="utf-8")
    result = fix_file(path, tmp_path / "fixed.vtt", RULES)
    assert result.problems == []
    assert check_file(tmp_path / "fixed.vtt", RULES).ok
    before = " ".join(" ".join(c.lines) for c in read_subtitles(path))
    after = " ".join(" ".join(c.lines) for c in read_subtitles(tmp_path / "fixed.vtt"))
    assert after.split() == before.split()


def test_cli_check_and_fix(tmp_path: Path):
    path = tmp_path / "broken.srt"
    path.write_text(BROKEN_SRT, encoding="utf-8")
    runner = CliRunner()
    bad = runner.invoke(subs, ["check", str(path)])
    assert bad.exit_code == 1 and "line_length" in bad.output and "reading speed" in bad.output
    fixed = runner.invoke(subs, ["fix", str(path), "-o", str(tmp_path / "fixed.srt"), "--profile", "fast"])
    assert fixed.exit_code == 0, fixed.output
    good = runner.invoke(subs, ["check", str(tmp_path / "fixed.srt"), "--profile", "fast"])
    assert good.exit_code == 0, good.output
    assert runner.invoke(subs, ["check", str(path), "--profile", "nope"]).exit_code != 0
