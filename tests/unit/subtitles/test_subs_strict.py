"""`captionbus subs` as a strict tool: errors name the line, encodings are detected (or given),
check and fix accept and refuse the same files, `-o -` writes stdout, `-l` is a real language,
`fix` never shows a cue before its first word."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from captionbus.subs_cli import subs
from captionbus.core.subtitles import read_subtitles
from captionbus.core.subtitles.formats import SubtitleFileError, decode_subtitles

GOOD = """1
00:00:01,000 --> 00:00:03,000
Café au lait, s'il vous plaît.

2
00:00:04,000 --> 00:00:06,000
Très bien, merci.
"""


def runner() -> CliRunner:
    return CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("bad, line", [
    (GOOD.replace("00:00:04,000 -->", "00:00:2x,000 -->"), 6),
    (GOOD.replace("00:00:01,000 --> 00:00:03,000", "00:00:01,000 -> 00:00:03,000"), 2),
    (GOOD.replace("00:00:04,000 --> 00:00:06,000", "00:00:04,000 --> 00:00:06"), 6),
])
def test_a_malformed_cue_time_is_an_error_naming_its_line_for_check_and_fix(tmp_path, bad, line):
    path = write(tmp_path, "bad.srt", bad)
    with pytest.raises(SubtitleFileError, match=f"^line {line}: "):
        read_subtitles(path)
    for command in (["check", str(path)], ["fix", str(path), "-o", str(tmp_path / "out.srt")]):
        result = CliRunner().invoke(subs, command)
        assert result.exit_code == 2, result.output
        assert f"line {line}: " in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "out.srt").exists()


@pytest.mark.parametrize("encoding, detected", [("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("latin-1", "cp1252"),
                                                ("cp1252", "cp1252"), ("utf-16", "utf-16")])
def test_encodings_are_detected(tmp_path, encoding, detected):
    path = write(tmp_path, "fr.srt", GOOD, encoding)
    assert decode_subtitles(path.read_bytes())[1] == detected
    assert read_subtitles(path)[0].lines == ["Café au lait, s'il vous plaît."]
    fixed = CliRunner().invoke(subs, ["fix", str(path), "-o", str(tmp_path / "fixed.srt")])
    assert fixed.exit_code == 0, fixed.output
    assert "Très bien, merci." in (tmp_path / "fixed.srt").read_text(encoding="utf-8")  # written as UTF-8


def test_encoding_can_be_given_and_a_wrong_one_names_the_line(tmp_path):
    path = write(tmp_path, "ru.srt", "1\n00:00:01,000 --> 00:00:03,000\nПривет, мир.\n", "koi8_r")
    assert CliRunner().invoke(subs, ["check", str(path), "--encoding", "koi8_r"]).exit_code in (0, 1)
    assert read_subtitles(path, encoding="koi8_r")[0].lines == ["Привет, мир."]
    wrong = CliRunner().invoke(subs, ["check", str(path), "--encoding", "ascii"])
    assert wrong.exit_code == 2 and "not ascii: line 3 has bytes" in wrong.output
    unknown = CliRunner().invoke(subs, ["check", str(path), "--encoding", "klingon"])
    assert unknown.exit_code == 2 and "unknown encoding 'klingon'" in unknown.output


@pytest.mark.parametrize("text", ["", "\n\n", "WEBVTT\n\n"])
def test_check_and_fix_refuse_a_file_without_cues_alike(tmp_path, text):
    path = write(tmp_path, "empty.vtt" if text.startswith("WEBVTT") else "empty.srt", text)
    out = tmp_path / "out.srt"
    check = CliRunner().invoke(subs, ["check", str(path)])
    fix = CliRunner().invoke(subs, ["fix", str(path), "-o", str(out)])
    assert check.exit_code == fix.exit_code == 2
    assert "has no subtitle cues" in check.output and "has no subtitle cues" in fix.output
    assert not out.exists()


def test_fix_to_stdout_writes_only_subtitles_there(tmp_path):
    path = write(tmp_path, "fr.srt", GOOD)
    result = runner().invoke(subs, ["fix", str(path), "-o", "-"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "-").exists()
    out = result.stdout
    assert out.startswith("1\n00:00:01,000 --> ") and "Très bien, merci." in out and "wrote" not in out
    vtt = runner().invoke(subs, ["fix", str(path), "-o", "-", "--format", "vtt"])
    assert vtt.stdout.startswith("WEBVTT")


def test_language_is_validated(tmp_path):
    path = write(tmp_path, "fr.srt", GOOD)
    bad = CliRunner().invoke(subs, ["check", str(path), "-l", "french"])
    assert bad.exit_code == 2 and "unknown language code 'french'" in bad.output
    assert CliRunner().invoke(subs, ["check", str(path), "-l", "FR"]).exit_code in (0, 1)


def test_counts_are_singular_for_one():
    from captionbus.subs_cli import _plural

    assert [_plural(n, "problem") for n in (0, 1, 2)] == ["0 problems", "1 problem", "2 problems"]


def test_fix_summary_says_1_cue(tmp_path):
    path = write(tmp_path, "long.srt", "1\n00:00:01,000 --> 00:00:04,000\n" + "x" * 60 + "\n")
    result = CliRunner().invoke(subs, ["fix", str(path), "-o", str(tmp_path / "out.srt")])
    assert result.exit_code == 0, result.output
    assert ": 1 cue, 2 problems left" in result.output  # line_length and long_word: a word wider than a line


def test_fix_never_starts_a_cue_before_its_first_word(tmp_path):
    # Short, fast cues: the engine would like to show each one earlier to give reading time.
    cues, t = [], 1.0
    for k, text in enumerate(["Go now.", "Right away, everybody out of the building!", "Now!",
                              "Why are you all still standing here in the hall?", "Move!"]):
        start, end = t, t + 0.6 + 0.02 * len(text)
        cues.append(f"{k + 1}\n{_ts(start)} --> {_ts(end)}\n{text}\n")
        t = end + 0.3
    path = write(tmp_path, "fast.srt", "\n".join(cues))
    source = read_subtitles(path)
    out = tmp_path / "fixed.srt"
    assert CliRunner().invoke(subs, ["fix", str(path), "-o", str(out)]).exit_code == 0
    fixed = read_subtitles(out)
    assert fixed, "no cues written"
    # The first word of each fixed cue: where it sat in the source.
    words = [(w, cue.start_ms) for cue in source for w in " ".join(cue.lines).split()]
    pos = 0
    for cue in fixed:
        first_word_start = words[pos][1]
        assert cue.start_ms >= first_word_start, (cue, first_word_start)
        pos += len(" ".join(cue.lines).split())
    assert pos == len(words)


def _ts(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
