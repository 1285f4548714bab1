"""One declaration per stage (captionbus/contracts/declarations/<folder>.py): every file derived from the
declarations is fresh (`python -m captionbus.stagegen --check`), each stage module's
StageDefinition takes its spec, the generator refuses a declaration that breaks the rules, stage
modules import no ML library until setup() runs, and the service options load from the command
line and the environment with their types and allowed values."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from captionbus import stagegen
from captionbus.contracts.declarations.alignment import AlignmentOptions
from captionbus.contracts.declarations.asr import AsrOptions
from captionbus.contracts.declarations.subtitle_gen import SUBTITLE_FORMATS
from captionbus.contracts.declarations.translation import IndicTrans2Options
from captionbus.contracts.declarations.vad import VadPyannoteOptions
from captionbus.contracts.stage_options import NoOptions
from captionbus.contracts.stage_specs import STAGES, explain
from captionbus.core.service_options import load_options
from captionbus.services import declarations, stage_module
from captionbus.services.runtime.definition import SetupContext

pytest.importorskip("numpy")  # stage modules use numpy at import; everything heavier loads in setup()

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchaudio", "whisperx", "faster_whisper", "ctranslate2", "transformers", "demucs", "pyannote",
         "mlx", "mlx_whisper", "onnxruntime", "IndicTransToolkit", "sentencepiece", "nltk", "julius")


def test_every_generated_file_is_fresh():
    """config/stages.yaml, the envs' stage lists and the linter's stage folders are what the
    declarations give (the JSON Schemas: test_contracts)."""
    assert stagegen.stale() == [], f"run {stagegen.COMMAND}"


def test_every_stage_module_takes_its_declaration_and_the_coordinator_sees_the_same():
    assert list(declarations()) == list(STAGES)
    for stage, (folder, spec) in declarations().items():
        definition = importlib.import_module(stage_module(stage)).STAGE
        assert definition.spec is spec and definition.name == stage, stage
        assert (definition.params, definition.outputs, definition.options) == (spec.params, spec.outputs, spec.options)
        assert STAGES[stage] is spec, stage  # the coordinator's: the same module, not a copy
        assert (ROOT / "captionbus" / "services" / folder / f"{spec.module}.py").is_file()


def test_no_declaration_is_left_in_a_stage_folder():
    """captionbus/contracts/declarations/ is the only place: a stray declaration.py beside a stage's code
    would be a second, silently ignored one."""
    assert sorted((ROOT / "captionbus" / "services").glob("*/declaration.py")) == []


def test_a_stage_folder_imports_its_own_declaration_only():
    """Stages never import each other (import-linter's 'stages' contract); a declaration lives in
    contracts, where that contract does not reach, so this holds the same line for them."""
    import ast

    seen = {}
    for path in sorted((ROOT / "captionbus" / "services").glob("*/**/*.py")):
        folder = path.relative_to(ROOT / "captionbus" / "services").parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "captionbus.contracts.declarations":
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            else:
                continue
            for name in names:
                if name.startswith("captionbus.contracts.declarations."):
                    seen.setdefault(folder, set()).add(name.split(".")[3])
    assert seen and all(found == {folder} for folder, found in seen.items()), seen


def _tree(tmp_path: Path) -> Path:
    """A copy of the checkout's stage-related files to break on purpose."""
    root = tmp_path / "tree"
    for name in ("captionbus", "envs", "config"):
        # symlinks=True: captionbus/core/_data/config and captionbus/_data/envs point into the copy
        shutil.copytree(ROOT / name, root / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


def _generate(root: Path, *args: str) -> subprocess.CompletedProcess:
    # The copy first on sys.path: the generator imports the copy's declarations.
    script = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); from captionbus import stagegen; "
              "sys.exit(stagegen.main(sys.argv[2:], pathlib.Path(sys.argv[1])))")
    return subprocess.run([sys.executable, "-c", script, str(root), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("edit, error", [
    ("import numpy\n", "imports numpy; a declaration may import pydantic, contracts and the standard library only"),
    ("from captionbus.services.runtime import BadInput\n", "imports captionbus.services.runtime"),
    ("from captionbus.contracts.declarations.asr import AsrParams\n", "imports captionbus.contracts.declarations.asr"),
    ("from .plan import plan_chunks\n", "relative import"),
])
def test_a_declaration_that_imports_beyond_contracts_is_refused(tmp_path, edit, error):
    root = _tree(tmp_path)
    path = root / "captionbus" / "contracts" / "declarations" / "chunk.py"
    path.write_text(path.read_text().replace("from __future__ import annotations\n",
                                             "from __future__ import annotations\n" + edit, 1))
    with pytest.raises(stagegen.DeclarationError, match=error.replace("(", r"\(").replace(")", r"\)")):
        stagegen.check_imports(path)


def test_a_changed_declaration_makes_its_generated_files_stale_until_regenerated(tmp_path):
    root = _tree(tmp_path)
    path = root / "captionbus" / "contracts" / "declarations" / "chunk.py"
    path.write_text(path.read_text().replace('env="common"', 'env="whisperx"'))
    done = _generate(root, "--check")
    assert done.returncode == 1
    assert done.stdout.strip() == ("stale (generated from the stage declarations): "
                                   "config/stages.yaml, envs/common.toml, envs/whisperx.toml; "
                                   "run python -m captionbus.stagegen")
    assert _generate(root).returncode == 0
    assert _generate(root, "--check").returncode == 0
    assert 'stages = ["alignment", "asr", "chunk"]' in (root / "envs" / "whisperx.toml").read_text()
    assert "chunk" not in (root / "envs" / "common.toml").read_text().split("stages = ")[1].split("]")[0]


@pytest.mark.parametrize("rename, error", [
    (None, "stage 'chunk' is declared twice: captionbus/contracts/declarations/chunk.py and extra.py"),
    ("chunk_two", "stage 'chunk_two' names module 'stage', but captionbus/services/extra/stage.py does not exist"),
])
def test_a_declaration_without_its_stage_code_or_declaring_a_known_stage_is_refused(tmp_path, rename, error):
    root = _tree(tmp_path)
    text = (root / "captionbus" / "contracts" / "declarations" / "chunk.py").read_text()
    if rename:
        text = text.replace('name="chunk"', f'name="{rename}"')
    (root / "captionbus" / "contracts" / "declarations" / "extra.py").write_text(text)
    done = _generate(root, "--check")
    assert done.returncode == 2 and error in done.stderr, done.stdout + done.stderr


def test_stage_modules_import_no_ml_library_until_setup():
    """In a fresh interpreter (this session's tests may have imported some already)."""
    code = ("import importlib, sys; from captionbus.services import declarations, stage_module; "
            "[importlib.import_module(stage_module(s)) for s in declarations()]; "
            f"print(sorted(n for n in {HEAVY!r} if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", "a stage module imports an ML library at import time"


def test_subtitle_formats_are_one_list():
    from captionbus.core.subtitles import FORMATS

    assert tuple(FORMATS) == SUBTITLE_FORMATS


def test_service_options_command_line_beats_environment_and_empty_is_unset():
    """pydantic-settings' precedence on the stage's model (captionbus/services/runtime/options.py)."""
    env = {"CAPTIONBUS_ASR_MODEL": "/models/env", "CAPTIONBUS_ASR_BATCH_SIZE": "8", "CAPTIONBUS_ASR_DEVICE": "",
           "CAPTIONBUS_MLX_OPENBLAS": "false"}
    options = load_options(AsrOptions, {"model": "/models/cli"}, env)
    assert (options.model, options.batch_size, options.device, options.backend) == ("/models/cli", 8, None, None)
    assert isinstance(options, AsrOptions) and options.mlx_openblas is False  # a field's own variable
    assert load_options(AsrOptions, {"mlx_openblas": True}, env).mlx_openblas is True  # by name, over its variable
    assert AsrOptions.env_var("compute_type") == "CAPTIONBUS_ASR_COMPUTE_TYPE"
    assert VadPyannoteOptions.env_var("model") == "CAPTIONBUS_PYANNOTE_SEGMENTATION"
    assert load_options(VadPyannoteOptions, {}, {"CAPTIONBUS_PYANNOTE_SEGMENTATION": "/x.bin"}).model == "/x.bin"
    assert "mlx_openblas" in AsrOptions.model_json_schema()["properties"]  # what --option takes


def test_a_model_without_a_prefix_reads_no_environment(monkeypatch):
    """An open model (noop's) or one without env_prefix takes only what it is given: with an
    empty prefix every variable (PATH, THREADS) would otherwise be a candidate."""
    from captionbus.contracts.declarations.noop import NoopOptions

    monkeypatch.setenv("THREADS", "7")
    assert load_options(NoopOptions, {"x": 1}).model_dump() == {"x": 1}
    assert load_options(NoOptions, {}, {"THREADS": "7"}).model_dump() == {}


def test_a_bad_enum_value_is_refused_with_the_allowed_values():
    with pytest.raises(ValidationError) as refused:
        load_options(AsrOptions, {}, {"CAPTIONBUS_ASR_BACKEND": "whisper"})
    assert explain(refused.value, "option") == "backend='whisper': Input should be 'whisperx' or 'mlx'"
    with pytest.raises(ValidationError) as refused:
        load_options(AsrOptions, {"devise": "cpu"}, {})
    assert explain(refused.value, "option") == "unknown option 'devise'"
    with pytest.raises(ValidationError, match="indic-indic"):
        load_options(IndicTrans2Options, {}, {"CAPTIONBUS_INDICTRANS2_PRELOAD": "en-indic,indic-hindi"})
    assert load_options(IndicTrans2Options, {}, {"CAPTIONBUS_INDICTRANS2_PRELOAD": "en-indic, indic-en"}).preload == [
        "en-indic", "indic-en"]
    with pytest.raises(ValidationError):
        load_options(NoOptions, {"threads": 2}, {})


def test_alignment_model_overrides_gather_per_language():
    options = load_options(AlignmentOptions, {"model_hi": "/w2v-hi", "model_ta": "", "cache_size": "3"},
                                    {"CAPTIONBUS_ALIGN_MODEL_EN": "/w2v-en", "CAPTIONBUS_ALIGN_MODEL_HI": "/env-hi"})
    assert options.models == {"en": "/w2v-en", "hi": "/w2v-hi", "ta": None} and options.cache_size == 3


def test_setup_context_parses_a_dict_with_the_stage_s_model(monkeypatch):
    monkeypatch.setenv("CAPTIONBUS_VAD_THREADS", "2")
    ctx = SetupContext(stage="vad", env="t", models_dir=None, log=None, options={"model": "/m.onnx"})
    assert (ctx.options.model, ctx.options.threads) == ("/m.onnx", 2)
    with pytest.raises(ValidationError):
        SetupContext(stage="vad", env="t", models_dir=None, log=None, options={"device": "cuda"})
    assert SetupContext(stage="adhoc", env="t", models_dir=None, log=None, options={"x": 1}).options.x == 1


@pytest.mark.parametrize("change, problem", [
    ({"name": "Shout"}, "name 'Shout' must match"),
    ({"env": "Common Env"}, "env 'Common Env' must match"),
    ({"backends": {"gpu": "cuda"}}, "backend 'gpu' is not a hardware kind"),
    ({"item_outputs": ("chunks",)}, "item output 'chunks' is not an output"),
    ({"note": "two\nlines"}, "one line each"),
    ({"params": dict}, "params must be a captionbus.contracts.stage_params.StageParams subclass"),
])
def test_a_stage_spec_refuses_what_the_generated_files_could_not_hold(change, problem):
    from captionbus.contracts.stage_declaration import StageSpec
    from captionbus.contracts.stage_params import StageParams

    base = dict(name="shout", summary="s", env="common", params=StageParams, outputs=("text",))
    with pytest.raises(ValueError, match=problem):
        StageSpec(**{**base, **change})
