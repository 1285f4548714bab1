"""What one stage declares, in `captionbus/contracts/declarations/<folder>.py` (its code lives in
`captionbus/services/<folder>/`): a `StageSpec` naming the stage, the environment that runs it, its
params model, the artifacts it reads and writes and its service options model. That module is the
stage's only declaration; the rest reads it or is derived from it:

- the coordinator and the CLI read it (captionbus.contracts.stage_specs.STAGES) without importing a
  stage: it is part of contracts, which every layer and every stage env has;
- `python -m captionbus.stagegen` writes the stage -> env map (config/stages.yaml), each env's
  `stages = [...]` line (envs/<env>.toml), the import-linter list of stage folders (pyproject.toml) and the params'
  JSON Schema (captionbus/contracts/schema/params_<stage>.json); tests/unit/test_stage_declarations.py fails
  while any of them is stale;
- the stage module (`captionbus/services/<folder>/<module>.py`) hands the spec to its StageDefinition, which
  takes its name, params, outputs and options from it.

docs/adding-a-stage.md walks through it. A declaration imports pydantic, contracts and the
standard library only (the generator refuses anything else; contracts depend on pydantic only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from pydantic import ValidationError

from captionbus.contracts.stage_options import NoOptions, ServiceOptions
from captionbus.contracts.stage_params import BranchParams, ItemParams, StageParams

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ENV = re.compile(r"^[a-z][a-z0-9_-]*$")
HARDWARE_KINDS = ("cuda", "mlx", "mps", "cpu")  # captionbus/core/hardware.py's kinds, in its preference order


@dataclass(frozen=True)
class StageSpec:
    name: str
    summary: str
    # The environment (envs/<env>.toml) that runs it on any hardware; None: no env serves it
    # (noop: tests and benchmarks run it in their own process), so `up` never starts it.
    env: str | None
    params: type[StageParams]
    outputs: tuple[str, ...]  # every output the stage may produce (passthrough: not declared)
    inputs: tuple[str, ...] = ()  # required
    optional_inputs: tuple[str, ...] = ()
    input_lists: tuple[str, ...] = ()
    options: type[ServiceOptions] = NoOptions
    passthrough: bool = False  # takes any inputs and returns them under their own names, else `out` (noop)
    item_outputs: tuple[str, ...] = ()  # outputs that are lists a workflow may fan out over (for_each: node.output)
    # hardware kind -> env that runs it there instead (tried in the host's preference order; a
    # backend counts only once envs/<that env>.toml exists), e.g. {"mlx": "mlx"} for asr.
    backends: Mapping[str, str] = field(default_factory=dict)
    module: str = "stage"  # captionbus/services/<folder>/<module>.py holds its StageDefinition (`STAGE`)
    note: str = ""  # why it runs in that env (a comment in config/stages.yaml)

    def __post_init__(self) -> None:
        problems = [f"name {self.name!r} must match {_NAME.pattern}"] if not _NAME.match(self.name) else []
        problems += [f"env {env!r} must match {_ENV.pattern}" for env in (self.env, *self.backends.values())
                     if env is not None and not _ENV.match(env)]
        problems += ["backends need a default env"] if self.backends and self.env is None else []
        problems += [f"backend {kind!r} is not a hardware kind ({', '.join(HARDWARE_KINDS)})"
                     for kind in self.backends if kind not in HARDWARE_KINDS]
        problems += [f"module {self.module!r} must match {_NAME.pattern}"] if not _NAME.match(self.module) else []
        problems += [f"item output {o!r} is not an output" for o in self.item_outputs if o not in self.outputs]
        problems += ["summary and note must be one line each"] if "\n" in self.summary + self.note else []
        if not (isinstance(self.params, type) and issubclass(self.params, StageParams)):
            problems.append("params must be a captionbus.contracts.stage_params.StageParams subclass")
        if not (isinstance(self.options, type) and issubclass(self.options, ServiceOptions)):
            problems.append("options must be a captionbus.contracts.stage_options.ServiceOptions subclass")
        if problems:
            raise ValueError(f"stage {self.name!r}: " + "; ".join(problems))

    @property
    def fans_out(self) -> bool:
        """Whether a workflow may run it once per target language (it takes target_language)."""
        return issubclass(self.params, BranchParams)

    @property
    def fans_out_items(self) -> bool:
        """Whether a workflow may run it once per item of a list output (it takes `item`)."""
        return issubclass(self.params, ItemParams)

    def param_keys(self) -> str:
        return ", ".join(self.params.own_fields())

    def check_params(self, values: Mapping[str, Any]) -> str | None:
        """None when `values` are valid params of this stage, else one line saying why."""
        try:
            self.params.model_validate(values)
        except ValidationError as error:
            return f"{explain(error, 'param')} ({self.name} params: {self.param_keys()})"
        return None


def explain(error: ValidationError, what: str = "param", limit: int = 3) -> str:
    """A pydantic error as one line a person can act on: `key=value: why; ...`. The errors of one
    field's union members (e.g. `context`: a bool or a number) become one `should be a or b`."""
    grouped: dict[tuple, list[dict]] = {}
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if isinstance(p, int) or _FIELD.match(str(p)))
        grouped.setdefault(loc[:1] if len(loc) > 1 and _union(item) else loc, []).append(item)
    parts = []
    for loc, items in list(grouped.items())[:limit]:
        key = ".".join(str(p) for p in loc)
        first = items[0]
        if first["type"] == "extra_forbidden":
            parts.append(f"unknown {what} {key!r}")
            continue
        if first["type"] == "missing":
            parts.append(f"{what} {key!r} is missing")
            continue
        messages = list(dict.fromkeys(i["msg"].removeprefix("Value error, ") for i in items))
        if len(messages) > 1 and all(m.startswith("Input should be ") for m in messages):
            message = "should be " + " or ".join(m.removeprefix("Input should be ") for m in messages)
        else:
            message = " or ".join(messages)
        parts.append(f"{key}={_short(first.get('input'))}: {message}" if key else message)
    more = len(grouped) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNION_TAGS = {"bool", "int", "float", "str", "list", "dict", "none"}


def _union(item: dict) -> bool:
    return any(isinstance(p, str) and (p in _UNION_TAGS or not _FIELD.match(p)) for p in item["loc"][1:])


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
