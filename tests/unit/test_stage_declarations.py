"""Each stage module's StageDefinition declares what contracts.stage_specs.STAGES says (the
coordinator and the CLI check against the registry without importing a stage), stage modules
import no ML library until setup() runs, and the service options load from the command line
and the environment with their types and allowed values."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from contracts.stage_options import AlignmentOptions, AsrOptions, IndicTrans2Options, NoOptions, VadPyannoteOptions
from contracts.stage_params import SUBTITLE_FORMATS
from contracts.stage_specs import STAGES, explain
from services import STAGE_MODULES
from services.runtime.definition import SetupContext

pytest.importorskip("numpy")  # stage modules use numpy at import; everything heavier loads in setup()

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchaudio", "whisperx", "faster_whisper", "ctranslate2", "transformers", "demucs", "pyannote",
         "mlx", "mlx_whisper", "onnxruntime", "IndicTransToolkit", "sentencepiece", "nltk", "julius")


def test_every_stage_module_declares_what_the_registry_says():
    assert set(STAGE_MODULES) == set(STAGES)
    for stage, module in STAGE_MODULES.items():
        definition = importlib.import_module(module).STAGE
        spec = STAGES[stage]
        assert definition.name == stage
        assert (definition.params, definition.outputs, definition.options) == (spec.params, spec.outputs, spec.options), stage


def test_stage_modules_import_no_ml_library_until_setup():
    """In a fresh interpreter (this session's tests may have imported some already)."""
    code = ("import importlib, sys; from services import STAGE_MODULES; "
            "[importlib.import_module(m) for m in STAGE_MODULES.values()]; "
            f"print(sorted(n for n in {HEAVY!r} if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", "a stage module imports an ML library at import time"


def test_subtitle_formats_are_one_list():
    from core.subtitles import FORMATS

    assert tuple(FORMATS) == SUBTITLE_FORMATS


def test_service_options_command_line_beats_environment_and_empty_is_unset():
    env = {"CAPTIONBUS_ASR_MODEL": "/models/env", "CAPTIONBUS_ASR_BATCH_SIZE": "8", "CAPTIONBUS_ASR_DEVICE": ""}
    options = AsrOptions.load({"model": "/models/cli"}, env)
    assert (options.model, options.batch_size, options.device, options.backend) == ("/models/cli", 8, None, None)
    assert AsrOptions.env_var("compute_type") == "CAPTIONBUS_ASR_COMPUTE_TYPE"
    assert VadPyannoteOptions.env_var("model") == "CAPTIONBUS_PYANNOTE_SEGMENTATION"
    assert VadPyannoteOptions.load({}, {"CAPTIONBUS_PYANNOTE_SEGMENTATION": "/x.bin"}).model == "/x.bin"


def test_a_bad_enum_value_is_refused_with_the_allowed_values():
    with pytest.raises(ValidationError) as refused:
        AsrOptions.load({}, {"CAPTIONBUS_ASR_BACKEND": "whisper"})
    assert explain(refused.value, "option") == "backend='whisper': Input should be 'whisperx' or 'mlx'"
    with pytest.raises(ValidationError) as refused:
        AsrOptions.load({"devise": "cpu"}, {})
    assert explain(refused.value, "option") == "unknown option 'devise'"
    with pytest.raises(ValidationError, match="indic-indic"):
        IndicTrans2Options.load({}, {"CAPTIONBUS_INDICTRANS2_PRELOAD": "en-indic,indic-hindi"})
    assert IndicTrans2Options.load({}, {"CAPTIONBUS_INDICTRANS2_PRELOAD": "en-indic, indic-en"}).preload == [
        "en-indic", "indic-en"]
    with pytest.raises(ValidationError):
        NoOptions.load({"threads": 2}, {})


def test_alignment_model_overrides_gather_per_language():
    options = AlignmentOptions.load({"model_hi": "/w2v-hi", "model_ta": "", "cache_size": "3"},
                                    {"CAPTIONBUS_ALIGN_MODEL_EN": "/w2v-en", "CAPTIONBUS_ALIGN_MODEL_HI": "/env-hi"})
    assert options.models == {"en": "/w2v-en", "hi": "/w2v-hi", "ta": None} and options.cache_size == 3


def test_setup_context_parses_a_dict_with_the_stage_s_model(monkeypatch):
    monkeypatch.setenv("CAPTIONBUS_VAD_THREADS", "2")
    ctx = SetupContext(stage="vad", env="t", models_dir=None, log=None, options={"model": "/m.onnx"})
    assert (ctx.options.model, ctx.options.threads) == ("/m.onnx", 2)
    with pytest.raises(ValidationError):
        SetupContext(stage="vad", env="t", models_dir=None, log=None, options={"device": "cuda"})
    assert SetupContext(stage="adhoc", env="t", models_dir=None, log=None, options={"x": 1}).options.x == 1
