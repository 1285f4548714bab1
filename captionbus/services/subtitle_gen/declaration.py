"""subtitle_gen: transcript -> subtitle files laid out by the subtitle rules.

This stage's declaration (captionbus.contracts.stage_declaration): pydantic, contracts and the standard
library only. `python -m captionbus.stagegen` copies it to captionbus/contracts/declarations/subtitle_gen.py for the
coordinator and the CLI, and derives the env map, env stage lists and JSON Schema from it.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_params import BranchParams, LanguageCode, one_as_list

# subtitle_gen: the file formats it writes (captionbus.core.subtitles.formats reads this too).
SUBTITLE_FORMATS = ("srt", "vtt", "ass", "json", "txt")

SubtitleFormat = Literal["srt", "vtt", "ass", "json", "txt"]


class SubtitleGenParams(BranchParams):
    language: LanguageCode | None = Field(
        None, description="picks the language's rules and names the files; unset: the transcript's")
    profile: str = Field("default", min_length=1, description="a profile of config/subtitles.yaml")
    formats: Annotated[list[SubtitleFormat], BeforeValidator(one_as_list)] = Field(
        default_factory=lambda: ["srt", "vtt"], min_length=1, description="files to write (one output each)")


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
