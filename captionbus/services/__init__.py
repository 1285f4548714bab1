"""Stage services. Each stage folder (`captionbus/services/<folder>/`) holds the stage's declaration
(`declaration.py`: a StageSpec per stage, its params and service options models; pure, see
captionbus.contracts.stage_declaration) and its module (`stage.py`, or the spec's `module`) with the
StageDefinition named STAGE; the bus plumbing around it (captionbus.services.runtime) is written once.
ML libraries are imported here only, and only inside the stage that needs them (in setup())."""
from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path

from captionbus.contracts.stage_declaration import StageSpec


@cache
def declarations() -> dict[str, tuple[str, StageSpec]]:
    """stage name -> (its folder, its StageSpec), from every captionbus/services/<folder>/declaration.py.
    Only the declarations are imported (pydantic and contracts): an env needs only the libraries
    of the stages it serves."""
    found: dict[str, tuple[str, StageSpec]] = {}
    for path in sorted(Path(__file__).parent.glob("*/declaration.py")):
        folder = path.parent.name
        for spec in importlib.import_module(f"captionbus.services.{folder}.declaration").SPECS:
            found[spec.name] = (folder, spec)
    return found


def stage_module(stage: str) -> str:
    """The module holding `stage`'s StageDefinition (STAGE); KeyError for an unknown stage."""
    folder, spec = declarations()[stage]
    return f"captionbus.services.{folder}.{spec.module}"
