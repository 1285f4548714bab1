"""`python -m captionbus.stagegen [--check]`: everything the project derives from the stages'
declarations, written (or, with --check, compared) in one go.

A stage is declared once: `captionbus/contracts/declarations/<folder>.py` (a StageSpec per stage, its
params and service options models; captionbus.contracts.stage_declaration), for the code in
`captionbus/services/<folder>/`. The coordinator, the CLI, the runtime and the stage code all import
that one module. What must know about the stages without importing Python is generated from it:

  config/stages.yaml               stage -> env (and hardware backends) map
  envs/<env>.toml                  the `stages = [...]` line of each env spec
  pyproject.toml                   import-linter's list of stage folders
  captionbus/contracts/schema/params_*.json   each stage's params JSON Schema (captionbus.contracts.schema_export)

Why in contracts: the coordinator may import captionbus.contracts only (import-linter holds it), and
a params model is code (validators, cross-field checks), so its JSON Schema cannot stand in for it
at submit. A declaration therefore imports pydantic, contracts and the standard library only
(checked here; import-linter's contracts-pure and no-ml contracts hold it too).

tests/unit/test_stage_declarations.py runs `--check`, so a stale file fails the unit tests with
this command as the fix. docs/adding-a-stage.md is the walk-through.
"""
from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import yaml

from captionbus.contracts.stage_declaration import StageSpec

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m captionbus.stagegen"
# What a declaration may import: it is part of contracts (pydantic only).
ALLOWED_ROOTS = {"__future__", "pydantic"}  # and captionbus.contracts
STAGES_LINE = re.compile(r"^stages = \[.*\]$", re.MULTILINE)
# The first layer of pyproject.toml's "stages" contract: the stage folders, siblings.
LINTER_LINE = re.compile(r'^(layers = \[\n  )"[a-z0-9_ |]+",$', re.MULTILINE)


class DeclarationError(ValueError):
    """A declaration breaks a rule; the message names the file and the fix."""


def declaration_dir(root: Path = ROOT) -> Path:
    return root / "captionbus" / "contracts" / "declarations"


def folders(root: Path = ROOT) -> list[str]:
    """The stage folders, sorted: one per captionbus/contracts/declarations/<folder>.py."""
    return sorted(p.stem for p in declaration_dir(root).glob("*.py") if p.stem != "__init__")


def check_imports(path: Path) -> None:
    """A declaration imports pydantic, contracts (not another stage's declaration) and the standard
    library only, and nothing relative."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise DeclarationError(f"{path}: relative import; a declaration imports by absolute name")
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            top = name.split(".")[0]
            allowed = top in ALLOWED_ROOTS or name == "captionbus.contracts" or name.startswith("captionbus.contracts.")
            if name.startswith("captionbus.contracts.declarations") or (
                    not allowed and top not in sys.stdlib_module_names):
                raise DeclarationError(
                    f"{path}: imports {name}; a declaration may import pydantic, contracts and the standard "
                    "library only (it is part of contracts, which the coordinator reads)")


def load_specs(root: Path = ROOT) -> dict[str, list[StageSpec]]:
    """folder -> the StageSpecs its declaration lists in SPECS, checked (captionbus.contracts.declarations
    refuses a missing SPECS and a stage declared twice when it imports them)."""
    for folder in folders(root):
        check_imports(declaration_dir(root) / f"{folder}.py")
    try:
        index = importlib.import_module("captionbus.contracts.declarations")
    except TypeError as e:
        raise DeclarationError(str(e)) from None
    if Path(index.__file__).resolve().parent != declaration_dir(root).resolve():
        raise DeclarationError(f"this interpreter imports {index.__file__}, not {root}'s declarations: "
                               f"put {root} first on sys.path")
    out: dict[str, list[StageSpec]] = {folder: [] for folder in folders(root)}
    for spec in index.SPECS:
        folder = index.FOLDERS[spec.name]
        if not (root / "captionbus" / "services" / folder / f"{spec.module}.py").is_file():
            raise DeclarationError(f"{declaration_dir(root) / folder}.py: stage {spec.name!r} names module "
                                   f"{spec.module!r}, but captionbus/services/{folder}/{spec.module}.py does not exist")
        out[folder].append(spec)
    return out


def render_stage_map(declared: dict[str, list[StageSpec]]) -> str:
    lines = [
        f"# GENERATED by `{COMMAND}` from each stage's declaration (captionbus/contracts/declarations/<folder>.py:",
        "# env, backends, note). Which environment (envs/<env>.toml) runs each stage.",
        "#",
        "#   env:       used on any hardware.",
        "#   backends:  hardware kind -> env, tried in the host's preference order (cuda, mlx, mps, cpu;",
        "#              see captionbus/core/hardware.py). A backend only counts once envs/<that env>.toml exists,",
        "#              so later backends can be listed here before their spec lands.",
        "stages:",
    ]
    for spec in (s for specs in declared.values() for s in specs if s.env is not None):
        lines.append(f"  {spec.name}:")
        lines.append(f"    env: {spec.env}" + (f"  # {spec.note}" if spec.note else ""))
        if spec.backends:
            lines.append("    backends:")
            lines += [f"      {kind}: {env}" for kind, env in spec.backends.items()]
    text = "\n".join(lines) + "\n"
    yaml.safe_load(text)  # what load_stage_map reads must parse
    return text


def env_stage_lists(declared: dict[str, list[StageSpec]]) -> dict[str, list[str]]:
    """env -> the stages it serves (as its default env or a hardware backend), in folder order."""
    out: dict[str, list[str]] = {}
    for spec in (s for specs in declared.values() for s in specs):
        for env in dict.fromkeys(e for e in (spec.env, *spec.backends.values()) if e is not None):
            out.setdefault(env, []).append(spec.name)
    return out


def render_env_specs(declared: dict[str, list[StageSpec]], root: Path = ROOT) -> dict[Path, str]:
    lists = env_stage_lists(declared)
    out = {}
    for path in sorted((root / "envs").glob("*.toml")):
        text = path.read_text()
        stages = lists.get(path.stem, [])
        line = "stages = [" + ", ".join(f'"{s}"' for s in stages) + "]"
        if len(STAGES_LINE.findall(text)) != 1:
            raise DeclarationError(f"{path}: needs exactly one `stages = [...]` line (generated by {COMMAND})")
        out[path] = STAGES_LINE.sub(line, text)
    defaults = {s.env: s.name for specs in declared.values() for s in specs if s.env is not None}
    missing = sorted(set(defaults) - {p.stem for p in out})  # a backend env may come later
    if missing:
        raise DeclarationError(f"stage {defaults[missing[0]]!r} runs in env {missing[0]!r}, which has no "
                               f"envs/{missing[0]}.toml")
    return out


def render_linter(declared: dict[str, list[StageSpec]], root: Path = ROOT) -> str:
    path = root / "pyproject.toml"
    text = path.read_text()
    if len(LINTER_LINE.findall(text)) != 1:
        raise DeclarationError(f"{path}: the 'stages' import-linter contract must open its layers with "
                               "one line of stage folders")
    return LINTER_LINE.sub(lambda m: m.group(1) + '"' + " | ".join(declared) + '",', text)


def render(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file except the JSON Schemas (captionbus.contracts.schema_export owns those), by path."""
    declared = load_specs(root)
    out: dict[Path, str] = {root / "config" / "stages.yaml": render_stage_map(declared)}
    out.update(render_env_specs(declared, root))
    out[root / "pyproject.toml"] = render_linter(declared, root)
    return out


def stale(root: Path = ROOT) -> list[str]:
    """Generated files that differ from what the declarations give."""
    wanted = render(root)
    return sorted(str(p.relative_to(root)) for p, text in wanted.items() if not p.is_file() or p.read_text() != text)


def write(root: Path = ROOT) -> list[str]:
    wanted = render(root)
    changed = []
    for path, text in wanted.items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed.append(str(path.relative_to(root)))
    return changed


def main(argv: list[str], root: Path = ROOT) -> int:
    try:
        if "--check" in argv:
            old = stale(root)
            if old:
                print(f"stale (generated from the stage declarations): {', '.join(old)}; run {COMMAND}")
                return 1
            return 0
        changed = write(root)
    except DeclarationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The schemas come from root's declarations: a fresh interpreter there imports them.
    schemas = subprocess.run([sys.executable, "-m", "captionbus.contracts.schema_export"], cwd=root,
                             capture_output=True, text=True)
    if schemas.returncode != 0:
        print(schemas.stdout + schemas.stderr, file=sys.stderr)
        return 1
    print(f"wrote {', '.join(changed) or 'nothing (all fresh)'}; {schemas.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
