"""docs/adding-a-stage.md, done as it says: in a copy of the project, write the page's `# file:`
blocks (the stage's folder, a workflow, its declaration, a unit test), run the generator, and run the new stage
end to end with `captionbus run` (embedded nats-server, the coordinator, the stage's own process in
the `common` env with the copy's code lent to it). The page's claim that a stage touches its folder,
a workflow YAML and one more file (its declaration in captionbus/contracts/declarations/) is checked on
the files it writes, and that the generator then changes only derived files (no list of stages, no
copy of the declaration)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_layers import lint_imports

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "adding-a-stage.md"
BLOCK = re.compile(r"```(?:python|yaml)\n# file: (\S+)\n(.*?)```", re.DOTALL)
GENERATED = {"captionbus/contracts/schema/params_shout.json", "config/stages.yaml", "envs/common.toml", "pyproject.toml"}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the checkout with the doc's stage added and the generator run."""
    root = tmp_path_factory.mktemp("added") / "project"
    root.mkdir()
    for name in ("captionbus", "config", "envs", "tests"):
        # symlinks=True: captionbus/core/_data/config and captionbus/_data/envs keep pointing into the copy
        shutil.copytree(REPO / name, root / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    before = _snapshot(root)

    written = {}
    for path, text in BLOCK.findall(DOC.read_text()):
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written[path] = text
    (root / "captionbus" / "services" / "shout" / "__init__.py").write_text("")  # the page's table: an empty one
    # The folder, a workflow YAML and one more file (the declaration), as the page says; and its unit test.
    assert sorted(written) == ["captionbus/contracts/declarations/shout.py", "captionbus/services/shout/stage.py",
                               "config/workflows/shout.yaml", "tests/unit/stages/test_shout.py"]
    outside = {p for p in written if not p.startswith(("captionbus/services/shout/", "config/workflows/", "tests/"))}
    assert outside == {"captionbus/contracts/declarations/shout.py"}

    done = subprocess.run([sys.executable, "-m", "captionbus.stagegen"], cwd=root, env=_env(root),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    after = _snapshot(root)
    changed = {p for p in after if before.get(p) != after[p]} - set(written) - {"captionbus/services/shout/__init__.py"}
    assert changed == GENERATED, sorted(changed)
    return root


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(root), **extra}
    env.pop("NATS_URL", None)
    return env


def test_the_generated_files_declare_the_stage_everywhere_it_must_be_known(project):
    assert "  shout:\n    env: common\n" in (project / "config" / "stages.yaml").read_text()
    assert '"shout"' in re.search(r"^stages = .*$", (project / "envs" / "common.toml").read_text(), re.M).group(0)
    assert "| shout |" in (project / "pyproject.toml").read_text()
    check = subprocess.run([sys.executable, "-m", "captionbus.stagegen", "--check"], cwd=project,
                           env=_env(project), capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout
    schemas = subprocess.run([sys.executable, "-m", "captionbus.contracts.schema_export", "--check"], cwd=project,
                             env=_env(project), capture_output=True, text=True, timeout=300)
    assert schemas.returncode == 0, schemas.stdout


def test_the_copy_keeps_every_import_contract_with_the_new_stage_folder(project):
    """The 'stages' contract is exhaustive: a folder missing from its generated list breaks it."""
    done = lint_imports(project)
    assert done.returncode == 0 and "0 broken" in done.stdout, done.stdout[-3000:]


def test_the_page_s_unit_test_passes(project):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/unit/stages/test_shout.py"], cwd=project, env=_env(project),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:]


def test_the_new_stage_runs_end_to_end_on_a_real_bus(project, tmp_path, common_env):
    env = _env(project, CAPTIONBUS_HOME=str(tmp_path / "home"))

    def captionbus(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "captionbus", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    described = captionbus("stages", "shout")
    assert described.returncode == 0 and "exclaim" in described.stdout, described.stdout + described.stderr
    refused = captionbus("run", str(REPO / "README.md"), "-w", "shout", "-o", "shout.exclaim=11")
    assert refused.returncode == 2 and "exclaim=11: Input should be less than or equal to 10" in refused.stderr

    note = tmp_path / "note.txt"
    note.write_text("a stage in one folder\n")
    done = captionbus("run", str(note), "-w", "shout", "-o", "shout.exclaim=3", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "out" / "note.text.txt").read_text() == "A STAGE IN ONE FOLDER!!!\n"
    assert str(tmp_path / "out" / "note.text.txt") in done.stdout.splitlines()
    # who ran it: the stage's own process, in the env its declaration names
    record = (tmp_path / "out" / "note.job.json").read_text()
    assert '"stage": "shout"' in record and '"env": "common"' in record, record[:3000]
