"""Every stage's declaration, as the coordinator and the CLI see them: `STAGES` is what the
coordinator checks workflow files and job options against and what `captionbus stages` prints.

Each entry is the StageSpec of a stage's one declaration (`captionbus/contracts/declarations/<folder>.py`):
the declarations live in contracts so that nothing here imports a stage
(captionbus.contracts.stage_declaration says what is derived from them and how it is checked).
"""
from __future__ import annotations

from pydantic import BaseModel

from captionbus.contracts.stage_declaration import StageSpec, explain
from captionbus.contracts.declarations import SPECS

__all__ = ["STAGES", "StageSpec", "UnknownStage", "describe_model", "explain", "stage_spec"]

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in SPECS}


class UnknownStage(ValueError):
    pass


def stage_spec(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        raise UnknownStage(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def describe_model(model: type[BaseModel]) -> list[dict[str, str]]:
    """name, type, default, description of each field (for `captionbus stages`)."""
    rows = []
    properties = model.model_json_schema()["properties"]
    for name, field in model.model_fields.items():
        schema = properties.get(name, {})
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = "" if field.default is None else repr(field.default)
        rows.append({
            "name": str(extra.get("option", name)),  # what a person types (alignment: model_<lang>)
            "field": name,
            "type": _type_text(schema),
            "default": default,
            "description": field.description or "",
            "set_by": str(extra.get("set_by", "")),
        })
    return rows


def _type_text(schema: dict) -> str:
    if "enum" in schema:
        return " | ".join(str(v) for v in schema["enum"])
    if "const" in schema:
        return str(schema["const"])
    if "anyOf" in schema:
        kinds = [_type_text(s) for s in schema["anyOf"] if s.get("type") != "null"]
        return " | ".join(dict.fromkeys(kinds)) or "null"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list[{_type_text(schema.get('items', {}))}]"
    if kind == "object":
        return "mapping"
    bounds = [f"{sym}{schema[key]:g}" for key, sym in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                       ("maximum", "<="), ("exclusiveMaximum", "<"))
              if key in schema]
    names = {"number": "number", "integer": "int", "string": "text", "boolean": "bool"}
    return names.get(kind, kind) + (f" ({', '.join(bounds)})" if bounds else "")
