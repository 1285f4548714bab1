"""Every stage's declaration: its params model, the artifacts it reads and writes, its service
options. `STAGES` is what the coordinator checks workflow files and job options against and
what `captionbus stages` prints; each stage module's `StageDefinition` carries the same params
model, outputs and options (a unit test holds the two together).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from contracts.stage_options import (
    AlignmentOptions,
    AsrOptions,
    IndicTrans2Options,
    NllbOptions,
    NoopOptions,
    NoOptions,
    ServiceOptions,
    SourceSeparationOptions,
    VadOptions,
    VadPyannoteOptions,
)
from contracts.stage_params import (
    SUBTITLE_FORMATS,
    AlignmentParams,
    AsrParams,
    BranchParams,
    ChunkParams,
    ItemParams,
    DemuxParams,
    MuxParams,
    NoopParams,
    SourceSeparationParams,
    StageParams,
    SubtitleGenParams,
    TranscriptJoinParams,
    TranslationParams,
    VadParams,
)


@dataclass(frozen=True)
class StageSpec:
    name: str
    summary: str
    params: type[StageParams]
    outputs: tuple[str, ...]  # every output the stage may produce (passthrough: not declared)
    inputs: tuple[str, ...] = ()  # required
    optional_inputs: tuple[str, ...] = ()
    input_lists: tuple[str, ...] = ()
    options: type[ServiceOptions] = NoOptions
    passthrough: bool = False  # takes any inputs and returns them under their own names, else `out` (noop)
    item_outputs: tuple[str, ...] = ()  # outputs that are lists a workflow may fan out over (for_each: node.output)

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


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("demux", "any media file -> 16 kHz mono WAV and its probed facts", DemuxParams,
              outputs=("audio", "probe"), inputs=("media",)),
    StageSpec("source_separation", "the audio -> its vocals only (demucs htdemucs)", SourceSeparationParams,
              outputs=("vocals",), inputs=("audio",), options=SourceSeparationOptions),
    StageSpec("vad", "where someone speaks (Silero VAD, onnxruntime)", VadParams,
              outputs=("regions",), inputs=("audio",), options=VadOptions),
    StageSpec("vad_pyannote", "where someone speaks (pyannote segmentation)", VadParams,
              outputs=("regions",), inputs=("audio",), options=VadPyannoteOptions),
    StageSpec("chunk", "speech regions -> chunks cut at silences, one asr request each", ChunkParams,
              outputs=("chunks", "language"), inputs=("regions",), item_outputs=("chunks",)),
    StageSpec("asr", "speech -> transcript with word times (whisperx, or mlx-whisper)", AsrParams,
              outputs=("transcript", "language"), inputs=("audio",),
              optional_inputs=("regions", "chunks", "language"), options=AsrOptions),
    StageSpec("transcript_join", "chunk transcripts -> one transcript, in chunk order", TranscriptJoinParams,
              outputs=("transcript",), optional_inputs=("language",), input_lists=("transcripts",)),
    StageSpec("alignment", "re-times a transcript's words with a wav2vec2 CTC model", AlignmentParams,
              outputs=("transcript",), inputs=("audio", "transcript"), options=AlignmentOptions),
    StageSpec("translation_indictrans2", "transcript -> translated transcript (IndicTrans2)", TranslationParams,
              outputs=("transcript",), inputs=("transcript",), options=IndicTrans2Options),
    StageSpec("translation_nllb", "transcript -> translated transcript (NLLB-200)", TranslationParams,
              outputs=("transcript",), inputs=("transcript",), options=NllbOptions),
    StageSpec("subtitle_gen", "transcript -> subtitle files laid out by the subtitle rules", SubtitleGenParams,
              outputs=SUBTITLE_FORMATS, inputs=("transcript",), optional_inputs=("probe",)),
    StageSpec("mux", "the media + subtitle tracks -> soft-subtitled mp4 and mkv", MuxParams,
              outputs=("mp4", "mkv"), inputs=("media",), input_lists=("subtitles",)),
    StageSpec("noop", "does nothing on purpose (runtime tests, benchmarks)", NoopParams,
              outputs=(), options=NoopOptions, passthrough=True),
)}


class UnknownStage(ValueError):
    pass


def stage_spec(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        raise UnknownStage(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


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
