"""`subs check` on something that is not a subtitle file says so in one line."""
from click.testing import CliRunner

from captionbus.subs_cli import subs


def test_binary_file_is_one_line_error(tmp_path):
    path = tmp_path / "video.srt"
    path.write_bytes(b"\xff\xfe\x00\x01binary")
    result = CliRunner().invoke(subs, ["check", str(path)])
    assert result.exit_code == 1
    assert "not a text subtitle file" in result.output and "Traceback" not in result.output


def test_prose_is_not_a_clean_subtitle_file(tmp_path):
    path = tmp_path / "notes.srt"
    path.write_text("these are notes, not subtitles\n")
    result = CliRunner().invoke(subs, ["check", str(path)])
    assert result.exit_code == 1
    assert "has no subtitle cues" in result.output
