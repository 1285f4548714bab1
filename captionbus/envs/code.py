"""How a stage environment gets captionbus's own code: the launcher lends it, at start.

A stage venv holds its pinned libraries plus the core library's few dependencies
(`captionbus/core/requirements.txt`: pydantic, nats-py, structlog, PyYAML, pysubs2, regex) and nothing of the
launcher's (click, rich, uv, the nats-server binary: `captionbus/requirements.txt`). The code of the
three packages a stage process imports -- `captionbus.contracts`, `captionbus.core`,
`captionbus.services` -- is not installed there at all: the launcher that starts the process
(`run`, `up`, `serve`) points PYTHONPATH at a folder holding a `captionbus` package made of links
to its own `__init__.py` and exactly those three packages (`code_dir`). So

- a venv built from a checkout serves a wheel-installed launcher and the other way round: the code
  always comes from the launcher that starts the process, never from a stale copy in the venv;
- code edits in a checkout reach every env without a rebuild (what `-e .` gave before);
- `import captionbus.cli` (or the gateway, the coordinator, ...) or `import click` fails in a stage
  process, which is the layering held at run time (import-linter holds it in the tree).

Measured: the `common` venv was 214 MB when it installed the whole project with its dependencies
(uv 37 MB, nats-server 18 MB, rich + pygments 6.5 MB, click ...); see README for after.
"""
from __future__ import annotations

import hashlib
import os
import re
from importlib import resources
from pathlib import Path

import captionbus
from captionbus import contracts
from captionbus import core
from captionbus import services
from captionbus.core import settings

# What a stage process imports from this project, in the order they layer.
STAGE_PACKAGES = {"contracts": contracts, "core": core, "services": services}


def core_requirements() -> list[str]:
    """The core library's dependencies (captionbus/core/requirements.txt, also package data): what every
    stage env installs besides its own pins."""
    text = resources.files("captionbus.core").joinpath("requirements.txt").read_text()
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def package_dirs() -> dict[str, Path]:
    """Where this launcher's copies of the stage packages live (a checkout or site-packages)."""
    return {name: Path(module.__file__).resolve().parent for name, module in STAGE_PACKAGES.items()}


def code_dir() -> Path:
    """A folder holding links to exactly the stage packages, for a stage process's PYTHONPATH.

    One per set of source folders (a checkout and an installed wheel get different ones), under
    the envs dir; made once, atomically (a rename), so parallel launchers agree.
    """
    dirs = package_dirs()
    digest = hashlib.sha256("\0".join(str(p) for p in dirs.values()).encode()).hexdigest()[:16]
    target = settings.load().envs_dir / ".code" / digest
    init = Path(captionbus.__file__).resolve()
    if all((target / "captionbus" / name).resolve() == path for name, path in dirs.items()) and \
            (target / "captionbus" / "__init__.py").resolve() == init:
        return target
    building = target.with_name(f"{digest}.{os.getpid()}.tmp")
    package = building / "captionbus"
    package.mkdir(parents=True, exist_ok=True)
    links = {**{name: path for name, path in dirs.items()}, "__init__.py": init}
    for name, path in links.items():
        link = package / name
        if not link.is_symlink():
            link.symlink_to(path, target_is_directory=path.is_dir())
    try:
        building.rename(target)
    except OSError:  # another launcher made it first; theirs points at the same folders
        for link in package.iterdir():
            link.unlink()
        package.rmdir()
        building.rmdir()
    return target


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def requirement_names(requirements: list[str]) -> list[str]:
    """Distribution names of requirement lines (`pydantic>=2.7,<3` -> `pydantic`)."""
    return [m.group(0) for r in requirements if (m := _NAME.match(r))]
