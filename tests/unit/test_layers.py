"""The code layers are held by import-linter (contracts in pyproject.toml), run here so a wrong
import fails CI: contracts <- core <- {coordinator, stage runtime} <- stages <- launcher, no ML
library outside captionbus/services/, stages independent of each other."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # The tree under `root` goes first on sys.path, so grimp analyses that copy.
    script = "import sys; sys.path.insert(0, sys.argv[1]); from importlinter.cli import lint_imports_command; " \
             "sys.argv = ['lint-imports', '--config', sys.argv[1] + '/pyproject.toml', '--no-cache']; " \
             "lint_imports_command()"
    return subprocess.run([sys.executable, "-c", script, str(root)], cwd=root, capture_output=True,
                          text=True, timeout=300)


def test_the_tree_keeps_every_import_contract():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
    for contract in ("contracts <- core", "stages sit on the stage runtime", "no ML", "never import each other"):
        assert contract in done.stdout


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    shutil.copy(REPO / "pyproject.toml", root)
    # Every layer lives under the one package name (the _data links stay links).
    shutil.copytree(REPO / "captionbus", root / "captionbus", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize(
    "module, bad_import, contract",
    [
        # the library reaching up into the launcher
        ("captionbus/core/settings.py", "import captionbus.cli", "contracts <- core"),
        # the coordinator importing a stage
        ("captionbus/coordinator/decide.py", "import captionbus.services.asr.stage", "contracts <- core"),
        # a stage importing another stage
        ("captionbus/services/mux/stage.py", "import captionbus.services.asr.stage", "stages sit on the stage runtime"),
        # the stage runtime importing a stage
        ("captionbus/services/runtime/serve.py", "import captionbus.services.vad.regions", "stages sit on the stage runtime"),
        # an ML library in the control plane
        ("captionbus/coordinator/graph.py", "import torch", "no ML"),
        # contracts needing more than pydantic
        ("captionbus/contracts/jobs.py", "import nats", "contracts depend on pydantic only"),
    ],
)
def test_a_wrong_import_breaks_its_contract(tmp_path, module, bad_import, contract):
    root = _copy_tree(tmp_path)
    path = root / module
    text = path.read_text()
    # after `from __future__` (which must stay first), before everything else
    marker = "from __future__ import annotations\n"
    assert marker in text, module
    path.write_text(text.replace(marker, marker + bad_import + "\n", 1))
    done = lint_imports(root)
    assert done.returncode != 0, done.stdout[-3000:]
    broken = [ln for ln in done.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), done.stdout[-3000:]
