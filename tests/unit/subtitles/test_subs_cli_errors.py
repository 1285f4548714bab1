"""`subs check` / `subs fix` on something that is not a subtitle file say so in one line, exit 2."""
from click.testing import CliRunner

from captionbus.subs_cli import subs


def test_binary_file_is_one_line_error(tmp_path):
    path = tmp_path / "video.srt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR binary")  # NUL bytes, no UTF-16 mark
    result = CliRunner().invoke(subs, ["check", str(path)])
    assert result.exit_code == 2
    assert "not a text subtitle file" in result.output and "Traceback" not in result.output


def test_prose_is_not_a_clean_subtitle_file(tmp_path):
    path = tmp_path / "notes.srt"
    path.write_text("these are notes, not subtitles\n")
    result = CliRunner().invoke(subs, ["check", str(path)])
    assert result.exit_code == 2
    assert "has no subtitle cues" in result.output
