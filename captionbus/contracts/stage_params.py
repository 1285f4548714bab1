"""What every stage's `StageRequest.params` model builds on; each stage's own model is in its
declaration (`captionbus/contracts/declarations/<folder>.py`).

The models are the stage boundary: the coordinator checks workflow files (node `params`) and job
options (`-o STAGE.KEY=VALUE`) against them before a job runs, `submit`/`run` refuse a bad
option before anything starts, and the stage runtime validates every request again and hands
the handler the parsed model (`ctx.params`).

Every model forbids unknown keys. Numbers refuse booleans, NaN and infinities; bounds are the
stage's own limits (what its memory or its model can take). Three params are set by the
coordinator on every request (`source_language`, `target_languages`; `target_language` on a
fan-out branch) and `cache` switches the stage cache off for one job (`-o asr.cache=false`);
they are in `StageParams` / `BranchParams`, so a stage that a workflow fans out by target
language must take `BranchParams`.
"""
from __future__ import annotations

import unicodedata
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from captionbus.contracts.languages import LANGUAGES

COORDINATOR = {"set_by": "coordinator"}  # json_schema_extra of the params the coordinator fills in


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number is needed, not true/false")
    return value


def _language(value: str) -> str:
    code = value.strip().lower()
    if code not in LANGUAGES:
        raise ValueError(f"unknown language code {value!r}; use an ISO 639-1 code such as en, hi, ta")
    return code


def one_as_list(value: Any) -> Any:
    """A BeforeValidator for list params: one string is a list of one (`-o mux.languages=en`)."""
    return [value] if isinstance(value, str) else value


def _auto_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() in ("", "auto") else value


# Unicode categories a name shown on screen may not hold: Cc (C0, DEL and the C1 controls
# U+0080-U+009F), Cf (format controls: the bidi marks, embeddings, overrides and isolates
# U+200E/F, U+061C, U+202A-202E, U+2066-2069 reorder the text around them -- a name can make the
# rest of a subtitle line read backwards; U+200B-200D and U+FEFF are invisible, so two names that
# look alike differ), Cs (lone surrogates) and Zl / Zp (U+2028 / U+2029 break the line).
INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def visible_text(value: str) -> str:
    """An AfterValidator for names shown on screen (speaker names, known speakers' names):
    refuses the characters of the INVISIBLE categories, naming the first."""
    for char in value:
        if unicodedata.category(char) in INVISIBLE:
            raise ValueError(f"U+{ord(char):04X} ({unicodedata.category(char)}) is a control or invisible "
                             "formatting character; a name holds visible characters only")
    return value


# Bounds go inside the Annotated, before NOT_BOOL, so they reach the JSON Schema.
NOT_BOOL = BeforeValidator(_not_bool)
LanguageCode = Annotated[str, AfterValidator(_language)]
# A language to use, or unset / "auto" to take the transcript's or detect it.
LanguageOrAuto = Annotated[LanguageCode | None, BeforeValidator(_auto_is_none)]


class StageParams(BaseModel):
    """Params every stage takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache: bool = Field(True, description="false: run the stage even when the stage cache holds this result")
    # What the coordinator sets comes from the job spec, whose languages are checked at submit;
    # a stage checks a code where it uses one (its messages say what the model can do).
    source_language: str | None = Field(
        None, description="the job's spoken language (-s); unset: detect", json_schema_extra=COORDINATOR)
    target_languages: list[str] = Field(
        default_factory=list, description="the job's target languages (-t)", json_schema_extra=COORDINATOR)

    @classmethod
    def own_fields(cls) -> list[str]:
        """The params a person sets: the stage's own, then `cache` (not the coordinator's)."""
        common = [n for n in StageParams.model_fields if n != "cache"] + ["target_language", "item"]
        own = [n for n in cls.model_fields if n not in common and n != "cache"]
        return own + ["cache"]


class BranchParams(StageParams):
    """Params of a stage a workflow may fan out by target language (`for_each: target_languages`)."""

    target_language: str | None = Field(
        None, description="this branch's language (fan-out nodes)", json_schema_extra=COORDINATOR)


class ItemParams(StageParams):
    """Params of a stage a workflow may run once per item of another stage's list output
    (`for_each: chunk.chunks`: one asr request per chunk)."""

    item: Annotated[int, Field(ge=0), NOT_BOOL] | None = Field(
        None, description="this node's item of the list it fans out over (0-based)", json_schema_extra=COORDINATOR)
