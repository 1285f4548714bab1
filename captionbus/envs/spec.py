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
from importlib import resources
from pathlib import Path
from typing import Annotated

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, ValidationError

from captionbus.envs.code import STAGE_PACKAGES, core_requirements
from captionbus.contracts.stage_declaration import explain

# A requirement counts as pinned when it names one exact version (`pkg==1.2.3`, extras allowed).
_PINNED = r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+(\s*;.*)?$"
# How the project's code reaches an env; a change here makes every built env stale.
CODE_SCHEME = "lent-by-launcher-1"
# The env specs: package data of the launcher (captionbus/_data/envs links to the checkout's envs/).
SPEC_DIR = Path(str(resources.files("captionbus").joinpath("_data", "envs")))


class SpecError(ValueError):
    """An env spec file is malformed; the message names the file and the field."""


def _pinned(requirements: tuple[str, ...]) -> tuple[str, ...]:
    unpinned = [r for r in requirements if not re.match(_PINNED, r)]
    if unpinned:
        raise ValueError(f"must be pinned with ==, not {unpinned}")
    return requirements


Texts = tuple[Annotated[str, Field(pattern=r"\S")], ...]  # non-empty strings (stripped: str_strip_whitespace)


class EnvSpec(BaseModel):
    """One envs/<name>.toml. Unknown keys and wrong types are refused with the key named (pydantic:
    no coercion of `optional = "yes"` or `python = 3.11`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$")]
    python: Annotated[str, Field(pattern=r"^3\.\d+$", description='a version like "3.11"')]
    requirements: Annotated[Texts, AfterValidator(_pinned)] = ()
    # Generated from the stages' declarations (python -m captionbus.stagegen): the stages whose
    # env (or hardware backend) this is.
    stages: Texts = ()
    description: str = ""
    optional: StrictBool = False
    check_imports: Texts = ()
    report_versions: Texts = ()
    _path: Path | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path | None:
        """The file it was read from (None when built from data)."""
        return self._path

    def install_requirements(self) -> list[str]:
        """What `uv pip install` gets: the spec's pins plus the core library's dependencies.
        The project's code is not installed: the launcher lends it (captionbus/envs/code.py)."""
        return [*self.requirements, *core_requirements()]

    def spec_hash(self) -> str:
        """Hash of everything that changes what gets installed.

        Description, stages and check lists are left out: editing them does not make a built
        environment stale. The core library's dependency list is in: a new dependency in
        captionbus/core/requirements.txt must reach every environment.
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
    return [f"captionbus.{name}" for name in STAGE_PACKAGES]


def parse_spec(data: dict, where: str = "<spec>", expected_name: str | None = None) -> EnvSpec:
    """Validate one spec's data (already parsed from TOML)."""
    try:
        spec = EnvSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{where}: {explain(error, 'key')} (keys: {', '.join(EnvSpec.model_fields)})") from None
    if expected_name is not None and spec.name != expected_name:
        raise SpecError(f"{where}: `name` is {spec.name!r} but the file is named {expected_name!r}.toml")
    return spec


def load_spec_file(path: Path) -> EnvSpec:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from e
    spec = parse_spec(data, where=str(path), expected_name=path.stem)
    spec._path = path
    return spec


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
