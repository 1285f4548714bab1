"""Environment specs: `envs/<name>.toml`, one per Python environment.

A spec says what to install (pinned requirements, a Python version), which stages the environment
serves, and what `captionbus envs check` imports and reports. Every environment also gets the core
library's dependencies; the project's own code (`contracts`, `core`, `services`) is lent by the
launcher when it starts a stage process (captionbus/envs/code.py).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from captionbus.envs.code import STAGE_PACKAGES, core_requirements

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_PYTHON_RE = re.compile(r"^3\.\d+$")
# A requirement counts as pinned when it names one exact version (`pkg==1.2.3`, extras allowed).
_PINNED_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+(\s*;.*)?$")
_KNOWN_KEYS = {
    "name", "description", "python", "stages", "optional",
    "requirements", "check_imports", "report_versions",
}
# How the project's code reaches an env; a change here makes every built env stale.
CODE_SCHEME = "lent-by-launcher-1"
# The env specs: package data of the launcher (captionbus/_data/envs links to the checkout's envs/).
SPEC_DIR = Path(str(resources.files("captionbus").joinpath("_data", "envs")))


class SpecError(ValueError):
    """An env spec file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class EnvSpec:
    name: str
    python: str
    requirements: tuple[str, ...]
    stages: tuple[str, ...] = ()
    description: str = ""
    optional: bool = False
    check_imports: tuple[str, ...] = ()
    report_versions: tuple[str, ...] = ()
    path: Path | None = field(default=None, compare=False)

    def install_requirements(self) -> list[str]:
        """What `uv pip install` gets: the spec's pins plus the core library's dependencies.
        The project's code is not installed: the launcher lends it (captionbus/envs/code.py)."""
        return [*self.requirements, *core_requirements()]

    def spec_hash(self) -> str:
        """Hash of everything that changes what gets installed.

        Description, stages and check lists are left out: editing them does not make a built
        environment stale. The core library's dependency list is in: a new dependency in
        core/requirements.txt must reach every environment.
        """
        payload = {
            "python": self.python,
            "requirements": sorted(self.requirements),
            "project": CODE_SCHEME,
            "core_dependencies": sorted(core_requirements()),
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def project_modules() -> list[str]:
    """The project's top-level packages a stage process must be able to import (lent to it by
    the launcher, see captionbus/envs/code.py)."""
    return list(STAGE_PACKAGES)


def _str_list(data: dict, key: str, where: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SpecError(f"{where}: `{key}` must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def parse_spec(data: dict, where: str = "<spec>", expected_name: str | None = None) -> EnvSpec:
    """Validate one spec's data (already parsed from TOML)."""
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KNOWN_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError(f"{where}: `name` must match {_NAME_RE.pattern}, got {name!r}")
    if expected_name is not None and name != expected_name:
        raise SpecError(f"{where}: `name` is {name!r} but the file is named {expected_name!r}.toml")
    python = data.get("python")
    if not isinstance(python, str) or not _PYTHON_RE.match(python):
        raise SpecError(f"{where}: `python` must be a version like \"3.11\", got {python!r}")
    requirements = _str_list(data, "requirements", where)
    unpinned = [r for r in requirements if not _PINNED_RE.match(r)]
    if unpinned:
        raise SpecError(f"{where}: requirements must be pinned with ==, not {unpinned}")
    optional = data.get("optional", False)
    if not isinstance(optional, bool):
        raise SpecError(f"{where}: `optional` must be true or false")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"{where}: `description` must be a string")
    return EnvSpec(
        name=name,
        python=python,
        requirements=requirements,
        stages=_str_list(data, "stages", where),
        description=description,
        optional=optional,
        check_imports=_str_list(data, "check_imports", where),
        report_versions=_str_list(data, "report_versions", where),
    )


def load_spec_file(path: Path) -> EnvSpec:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from e
    spec = parse_spec(data, where=str(path), expected_name=path.stem)
    return replace(spec, path=path)


def load_specs(spec_dir: Path | None = None) -> dict[str, EnvSpec]:
    """All specs in `envs/`, by name. Raises SpecError on the first bad file."""
    spec_dir = spec_dir or SPEC_DIR
    specs: dict[str, EnvSpec] = {}
    for path in sorted(spec_dir.glob("*.toml")):
        spec = load_spec_file(path)
        specs[spec.name] = spec
    return specs


def get_spec(name: str, spec_dir: Path | None = None) -> EnvSpec:
    specs = load_specs(spec_dir)
    if name not in specs:
        known = ", ".join(sorted(specs)) or "none"
        raise SpecError(f"no environment named {name!r} (known: {known}; specs live in envs/<name>.toml)")
    return specs[name]
