"""captionbus.firstrun.plan: what `run` would build or fetch on this host before a job."""
from __future__ import annotations

import pytest

from captionbus import firstrun, models


@pytest.fixture
def bare_host(tmp_path, monkeypatch):
    """No envs, no models, no model settings."""
    monkeypatch.setenv("CAPTIONBUS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CAPTIONBUS_ENVS", str(tmp_path / "envs"))
    monkeypatch.setenv("CAPTIONBUS_MODELS", str(tmp_path / "models"))
    for name in ("CAPTIONBUS_ASR_MODEL", "CAPTIONBUS_VAD_MODEL", "CAPTIONBUS_PYANNOTE_SEGMENTATION",
                 "CAPTIONBUS_ASR_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


TRANSCRIBE = ["demux", "vad", "asr", "subtitle_gen", "mux"]


def test_a_bare_host_needs_the_envs_and_the_default_models(bare_host):
    todo = firstrun.plan(TRANSCRIBE)
    assert todo.envs == {"common": "missing", "whisperx": "missing"}
    assert [m.name for m in todo.models] == ["silero-vad", "whisper-base"]


def test_a_model_named_by_its_setting_is_not_fetched(bare_host, monkeypatch):
    local = bare_host / "my-whisper"
    local.mkdir()
    monkeypatch.setenv("CAPTIONBUS_ASR_MODEL", str(local))
    monkeypatch.setenv("CAPTIONBUS_VAD_MODEL", str(bare_host / "vad.onnx"))
    assert firstrun.plan(TRANSCRIBE).models == []


def test_stages_that_load_no_default_model_need_none(bare_host):
    todo = firstrun.plan(["demux", "subtitle_gen", "mux"])
    assert todo.envs == {"common": "missing"} and todo.models == []


def test_a_fetched_model_is_not_fetched_again(bare_host):
    target = models.default_silero_vad_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"onnx")
    assert [m.name for m in firstrun.plan(["vad"]).models] == []
