"""subtitle_gen: transcript -> subtitle files laid out by the subtitle rules.

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_params import BranchParams, LanguageCode, one_as_list, visible_text

# subtitle_gen: the file formats it writes (captionbus.core.subtitles.formats reads this too).
SUBTITLE_FORMATS = ("srt", "vtt", "ass", "json", "txt")

SubtitleFormat = Literal["srt", "vtt", "ass", "json", "txt"]

# Speaker names (SDH): at most this many, each this long. A name is shown on screen and is a
# WebVTT voice, so it holds no markup (< > &), brackets, control or invisible formatting characters
# (stage_params.visible_text: C1 controls, bidi overrides, zero-width characters).
MAX_SPEAKER_NAMES = 100

SpeakerKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x20=,\x7f]+$"),
                       AfterValidator(visible_text)]

SpeakerName = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[^\x00-\x1f\x7f<>&\[\]=,]+$"),
                        AfterValidator(visible_text)]


def speaker_names_text(value: Any) -> Any:
    """`A=Anna,B=Ben` (labels or places, see captionbus.core.subtitles.speakers) or `Anna,Ben` (places 1, 2 ...)
    as the mapping; a mapping passes as it is. Mixing the two forms is refused."""
    if not isinstance(value, str):
        return value
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ValueError("no speaker names (e.g. A=Anna,B=Ben or Anna,Ben)")
    pairs = ["=" in item for item in items]
    if all(pairs):
        out: dict[str, str] = {}
        for item in items:
            key, _, name = item.partition("=")
            if key.strip() in out:
                raise ValueError(f"speaker {key.strip()!r} is named twice")
            out[key.strip()] = name.strip()
        return out
    if any(pairs):
        raise ValueError("use either LABEL=Name pairs or a plain list of names, not both")
    return {str(k): name for k, name in enumerate(items, 1)}


class SubtitleGenParams(BranchParams):
    language: LanguageCode | None = Field(
        None, description="picks the language's rules and names the files; unset: the transcript's")
    profile: str = Field("default", min_length=1, description="a profile of config/subtitles.yaml")
    formats: Annotated[list[SubtitleFormat], BeforeValidator(one_as_list)] = Field(
        default_factory=lambda: ["srt", "vtt"], min_length=1, description="files to write (one output each)")
    speaker_names: Annotated[dict[SpeakerKey, SpeakerName] | None, BeforeValidator(speaker_names_text)] = Field(
        None, max_length=MAX_SPEAKER_NAMES,
        description="SDH speaker names, written where a speaker starts talking: {label or place: name}; a key "
                    "is a diarization label (SPEAKER_00) or a place in order of first appearance (1, 2 ... or "
                    "A, B ...); also the text A=Anna,B=Ben or Anna,Ben")
    name_style: Literal["brackets", "colon"] = Field(
        "brackets", description="how a name is shown: brackets '[Anna] Hi.' (Netflix SDH) or colon 'ANNA: Hi.'")
    dialogue_dash: Literal["-", "- ", "–", "– ", "—", "— "] | None = Field(
        None, description="starts each line of a two-speaker cue; unset: the profile's (English: '-', no space)")


SUBTITLE_GEN = StageSpec(
    name="subtitle_gen",
    summary="transcript -> subtitle files laid out by the subtitle rules",
    env="common",
    params=SubtitleGenParams,
    inputs=("transcript",),
    optional_inputs=("probe",),
    outputs=SUBTITLE_FORMATS,
)

SPECS = (SUBTITLE_GEN,)
