"""Fixtures for calling stage handlers directly with a fake StageContext (not the bus).

Helpers are imported inside the fixtures: a conftest that fails to import stops the whole
pytest session, a fixture that fails stops only its tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def make_context(tmp_path: Path):
    """make_context(stage, inputs={name: path}, input_lists={name: [paths]}, params={...})."""
    from captionbus.services.runtime.testing import make_fake_context

    counter = iter(range(1_000_000))

    def make(stage: str, **kwargs):
        return make_fake_context(tmp_path / f"work-{stage}-{next(counter)}", stage, **kwargs)

    return make


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def speech_clip(media_dir: Path) -> tuple[Path, str]:
    """An mp4 (h264 + AAC) with espeak-ng English speech, made once per test session."""
    from tests import media as test_media

    if not test_media.tools_available():
        pytest.skip(test_media.MISSING)
    return test_media.speech_video(media_dir / "speech.mp4")
