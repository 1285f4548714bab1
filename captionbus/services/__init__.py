"""Stage services. Each stage folder (`captionbus/services/<folder>/`) holds the stage's module
(`stage.py`, or the spec's `module`) with the StageDefinition named STAGE; its one declaration (a
StageSpec per stage, its params and service options models; pure) is
`captionbus/contracts/declarations/<folder>.py`, which the coordinator reads too. The bus plumbing
around a handler (captionbus.services.runtime) is written once. ML libraries are imported here
only, and only inside the stage that needs them (in setup())."""
from __future__ import annotations

from functools import cache

from captionbus.contracts.declarations import FOLDERS, SPECS
from captionbus.contracts.stage_declaration import StageSpec


@cache
def declarations() -> dict[str, tuple[str, StageSpec]]:
    """stage name -> (its folder, its StageSpec), from captionbus/contracts/declarations/. Only the
    declarations are imported (pydantic and contracts): an env needs only the libraries of the
    stages it serves."""
    return {spec.name: (FOLDERS[spec.name], spec) for spec in SPECS}


def stage_module(stage: str) -> str:
    """The module holding `stage`'s StageDefinition (STAGE); KeyError for an unknown stage."""
    folder, spec = declarations()[stage]
    return f"captionbus.services.{folder}.{spec.module}"
