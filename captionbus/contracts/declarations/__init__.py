"""Every stage's one declaration: `<folder>.py` here declares the stages whose code lives in
`captionbus/services/<folder>/` (a StageSpec per stage in its `SPECS`, and the params and service
options models they name; captionbus.contracts.stage_declaration).

They live in contracts, not in the stage folders, because everyone reads them: the coordinator
and the CLI (which may import contracts only: import-linter holds the layers) check workflows and
job params against them, the runtime and the stage code build on them, and every stage env has
contracts (captionbus/envs/code.py lends it). A params model is code (bounds, validators,
cross-field checks), so a JSON Schema could not stand in for it; so a declaration imports
pydantic, contracts and the standard library only (`python -m captionbus.stagegen` refuses
anything else).

This index is not a list to keep up: it imports every module beside it, in folder order, so a new
declaration is found by being here.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import MappingProxyType

from captionbus.contracts.stage_declaration import StageSpec


def _load() -> tuple[dict[str, str], tuple[StageSpec, ...]]:
    folders: dict[str, str] = {}
    specs: list[StageSpec] = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg):
        declared = getattr(importlib.import_module(f"{__name__}.{module}"), "SPECS", None)
        if not isinstance(declared, tuple) or not declared or not all(isinstance(s, StageSpec) for s in declared):
            raise TypeError(f"captionbus/contracts/declarations/{module}.py needs SPECS, a non-empty tuple of "
                            "the StageSpecs it declares")
        for spec in declared:
            if spec.name in folders:
                raise TypeError(f"stage {spec.name!r} is declared twice: captionbus/contracts/declarations/"
                                f"{folders[spec.name]}.py and {module}.py")
            folders[spec.name] = module
            specs.append(spec)
    return folders, tuple(specs)


_FOLDERS, SPECS = _load()
# stage name -> the folder it is declared for (captionbus/services/<folder>/ holds its code)
FOLDERS = MappingProxyType(_FOLDERS)

__all__ = ["FOLDERS", "SPECS"]
