"""alignment: re-times a transcript's words with a wav2vec2 CTC model.

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

from pydantic import Field

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_options import DEVICE, THREADS, Device, ServiceOptions
from captionbus.contracts.stage_params import ItemParams, LanguageOrAuto

class AlignmentParams(ItemParams):
    """An ItemParams stage: a chunked workflow may align once per chunk (`for_each: chunk.chunks`,
    `alignment-3` <- `asr-3`); each segment is aligned in its own window of the WAV, so one
    chunk's request reads only that chunk's audio."""

    language: LanguageOrAuto = Field(
        None, description="the transcript's language, checked against it; unset: the job's -s")


MODEL_ENV = "CAPTIONBUS_ALIGN_MODEL_"  # + the language: that language's model


class AlignmentOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_ALIGN_"

    config: str | None = Field(None, description="language -> model file; unset: config/alignment.yaml")
    models: dict[str, str | None] = Field(
        default_factory=dict, validation_alias=MODEL_ENV + "<LANG>", json_schema_extra={"option": "model_<lang>"},
        description="model_<lang>=folder|id overrides one language (empty: no alignment for it)")
    device: Device | None = Field(None, description=DEVICE)
    threads: int | None = Field(None, ge=1, description=THREADS)
    cache_size: int = Field(2, ge=1, description="languages kept loaded (least recently used goes)")
    cache_dir: str | None = Field(None, description="download folder for hub models; unset: the libraries' own")

    @classmethod
    def prepare(cls, options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
        """model_<lang> keys and CAPTIONBUS_ALIGN_MODEL_<LANG> variables (one per language, which no
        single variable name can cover) gather into `models`, the option winning; an empty
        value switches alignment off for that language."""
        models: dict[str, str | None] = {key[len(MODEL_ENV):].lower(): value or None for key, value in environ.items()
                                         if key.startswith(MODEL_ENV) and len(key) > len(MODEL_ENV)}
        rest = {}
        for key, value in options.items():
            if key.lower().startswith("model_") and len(key) > len("model_"):
                models[key[len("model_"):].lower()] = str(value) if value else None
            else:
                rest[key] = value
        values = super().prepare(rest, environ)
        return {**values, "models": {**models, **(values.get("models") or {})}}


ALIGNMENT = StageSpec(
    name="alignment",
    summary="re-times a transcript's words with a wav2vec2 CTC model",
    env="whisperx",
    params=AlignmentParams,
    inputs=("audio", "transcript"),
    outputs=("transcript",),
    options=AlignmentOptions,
    note="whisperx.align with a wav2vec2 CTC model per language",
)

SPECS = (ALIGNMENT,)
