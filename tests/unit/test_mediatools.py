"""captionbus.core.mediatools: which ffmpeg / ffprobe a process runs (setting, then PATH, then the wheel)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from captionbus.core import mediatools
from captionbus.core.settings import Settings


def _program(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_setting_wins_over_path(tmp_path, monkeypatch):
    on_path = _program(tmp_path / "bin", "ffmpeg")
    chosen = _program(tmp_path / "mine", "my-ffmpeg")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert mediatools.ffmpeg_path(Settings(home=tmp_path)) == str(on_path)
    assert mediatools.ffmpeg_path(Settings(home=tmp_path, ffmpeg=chosen)) == str(chosen)


def test_a_setting_that_is_not_a_program_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_program(tmp_path / "bin", "ffmpeg").parent))
    not_a_program = tmp_path / "notes.txt"
    not_a_program.write_text("x")
    with pytest.raises(mediatools.MediaToolMissing, match="CAPTIONBUS_FFMPEG=.*notes.txt"):
        mediatools.ffmpeg_path(Settings(home=tmp_path, ffmpeg=not_a_program))
    with pytest.raises(mediatools.MediaToolMissing, match="CAPTIONBUS_FFPROBE"):
        mediatools.ffprobe_path(Settings(home=tmp_path, ffprobe=tmp_path / "missing"))


def test_blank_settings_mean_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONBUS_FFMPEG", "")
    monkeypatch.setenv("CAPTIONBUS_FFPROBE", " ")
    settings = Settings(home=tmp_path)
    assert settings.ffmpeg is None and settings.ffprobe is None


def test_without_system_ffmpeg_the_wheel_binary_is_used_and_ffprobe_is_none(tmp_path, monkeypatch):
    wheel_binary = _program(tmp_path / "wheel", "ffmpeg-linux64-v9")
    fake = type(sys)("imageio_ffmpeg")
    fake.get_ffmpeg_exe = lambda: str(wheel_binary)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", fake)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    settings = Settings(home=tmp_path)
    assert mediatools.ffmpeg_path(settings) == str(wheel_binary)
    assert mediatools.ffprobe_path(settings) is None


def test_no_ffmpeg_anywhere_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(mediatools.MediaToolMissing) as caught:
        mediatools.ffmpeg_path(Settings(home=tmp_path))
    assert "pip install imageio-ffmpeg" in str(caught.value) and "\n" not in str(caught.value)



def test_probe_without_ffprobe_or_pyav_names_what_is_missing_not_the_file(tmp_path, monkeypatch):
    import importlib.util

    from captionbus.services import media

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(mediatools.MediaToolMissing, match="ffprobe not found and PyAV is not installed"):
        media.probe(clip)
