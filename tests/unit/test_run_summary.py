"""What a test run could not test is said at its end, with the command that installs what was
missing (tests/conftest.py: pytest_terminal_summary), and test speech needs no system package
(tests/espeak.py: the espeakng-loader wheel)."""
from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from tests import espeak
from tests.media import path_without

REPO = Path(__file__).resolve().parents[2]

SKIPPING = '''
import pytest

def test_needs_a_browser():
    pytest.skip("needs Chromium")

@pytest.mark.skipif(True, reason="test media need the dev extra's wheels")
def test_needs_media():
    pass

def test_runs():
    pass
'''


def test_a_run_ends_with_what_it_skipped_and_the_missing_system_packages(tmp_path):
    (tmp_path / "test_sample.py").write_text(SKIPPING)
    hidden = path_without(("ffmpeg", "chromium"), tmp_path / "shadow")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_sample.py")],
        cwd=REPO, env={**os.environ, "PATH": hidden, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout[done.stdout.index("not tested on this machine"):]
    assert "no ffmpeg:" in summary and "install: apt-get install ffmpeg" in summary, summary
    assert "no chromium:" in summary and "install: apt-get install chromium" in summary, summary
    assert "1 skipped (test_sample.py): needs Chromium\n    install: apt-get install chromium" in summary, summary
    assert "1 skipped (test_sample.py): test media need the dev extra's wheels\n" \
           "    install: pip install -e '.[dev]'" in summary, summary
    assert summary.index("not tested") < summary.index("1 passed, 2 skipped")


def test_speech_comes_from_the_wheel_without_the_espeak_ng_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", path_without(("espeak-ng", "espeak"), tmp_path / "shadow"))
    assert espeak.available()
    first = espeak.speak_wav(tmp_path / "a.wav", "Seven friendly sailors watch the golden sunset.")
    again = espeak.speak_wav(tmp_path / "b.wav", "Seven friendly sailors watch the golden sunset.")
    with wave.open(str(first)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
        assert 2.5 < w.getnframes() / w.getframerate() < 5.0
    # Deterministic: a fresh library per utterance (in one process the second came out different).
    assert first.read_bytes() == again.read_bytes()
    hindi = espeak.speak_wav(tmp_path / "hi.wav", "नमस्ते, आज मौसम बहुत अच्छा है", voice="hi")
    assert hindi.stat().st_size > 44 + 22050  # more than half a second of speech
    # A voice the data lacks is an error that names it, never an empty WAV.
    with pytest.raises(RuntimeError, match="no voice 'xx-nosuch'"):
        espeak.speak_wav(tmp_path / "none.wav", "hello", voice="xx-nosuch")
