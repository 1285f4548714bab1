"""Really build the small `common` env with uv in a private data dir, then check it.

(whisperx is gigabytes: .ci/run builds it once; it is not built here.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from captionbus import envs
from captionbus.envs import manager
from captionbus.envs import spec as spec_mod
from captionbus.envs.cli import envs as envs_cli
from captionbus.envs.cli import models as models_cli
from captionbus.models import WHISPER_BASE_SIZE, ensure_whisper_base


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("CAPTIONBUS_HOME", str(home))
    monkeypatch.setenv("CAPTIONBUS_ENVS", str(home / "envs"))  # conftest shares the real ones
    return home


def test_create_and_check_common(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    runner = CliRunner()
    result = runner.invoke(envs_cli, ["create", "common"])
    assert result.exit_code == 0, result.output
    assert "common: ready" in result.output

    python = envs.interpreter_for_stage("demux", "cpu")
    assert python == home / "envs" / "common" / "bin" / "python"
    # A different interpreter from the test's, with the project and the spec's pins in it.
    out = subprocess.run(
        [str(python), "-c", "import sys, captionbus.contracts, pysubs2, av, imageio_ffmpeg; print(sys.executable); print(sys.prefix)"],
        capture_output=True, text=True, check=True).stdout.split()
    assert out[0] != sys.executable and Path(out[1]) == home / "envs" / "common"
    torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert torch.returncode != 0, "common must stay free of torch"

    # The env knows who it is (workers report this).
    who = subprocess.run([str(python), "-c", "from captionbus.envs import current_env; print(current_env())"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert who == "common"

    result = runner.invoke(envs_cli, ["check", "common", "--json"])
    assert result.exit_code == 0, result.output
    (status,) = json.loads(result.stdout)["envs"]
    assert status["state"] == "ok" and status["versions"]["pysubs2"] == "1.8.1"

    # Second create is a no-op.
    result = runner.invoke(envs_cli, ["create", "common"])
    assert result.exit_code == 0 and "up to date" in result.output

    # Submit-time gate: common is there, whisperx is not.
    assert envs.missing_envs_for_workflow(["demux", "subtitle_gen", "mux"], "cpu") == []
    with pytest.raises(envs.EnvsMissing, match="^captionbus envs create whisperx$"):
        envs.require_envs(["demux", "asr"], "cpu")

    # Change the spec's pins: the built env turns stale, with the fixing command.
    spec_dir = tmp_path / "envs-specs"
    spec_dir.mkdir()
    for p in spec_mod.SPEC_DIR.glob("*.toml"):
        (spec_dir / p.name).write_text(p.read_text().replace('"pysubs2==1.8.1",', '"pysubs2==1.8.1", "six==1.17.0",'))
    monkeypatch.setattr(spec_mod, "SPEC_DIR", spec_dir)
    result = runner.invoke(envs_cli, ["check", "common"])
    assert result.exit_code == 1
    assert "stale" in result.output and "fix: captionbus envs create common" in result.output

    # A build that never finished (no manifest) is broken, and missing at submit time.
    (home / "envs" / "common" / manager.MANIFEST).unlink()
    assert envs.check(envs.get_spec("common")).state == envs.BROKEN
    assert envs.missing_envs_for_workflow(["mux"], "cpu") == ["common"]


def test_fetch_test_model(tmp_path: Path):
    dest = tmp_path / "whisper-base"
    args = ["fetch-test", "--dest", str(dest)]
    result = CliRunner().invoke(models_cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(dest)
    assert (dest / "model.bin").stat().st_size == WHISPER_BASE_SIZE
    assert json.loads((dest / "config.json").read_text())
    assert (dest / "tokenizer.json").is_file() and (dest / "vocabulary.txt").is_file()
    mtime = (dest / "model.bin").stat().st_mtime_ns
    assert ensure_whisper_base(dest) == dest  # idempotent: no download, nothing rewritten
    assert (dest / "model.bin").stat().st_mtime_ns == mtime
