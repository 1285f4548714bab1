"""mux: the media + subtitle tracks -> soft-subtitled mp4 and mkv.

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_params import LanguageCode, StageParams, one_as_list

class MuxParams(StageParams):
    languages: Annotated[list[LanguageCode], BeforeValidator(one_as_list)] | None = Field(
        None, description="one per subtitle file, in order; unset: from each file's name (subtitles.<lang>.srt)")


MUX = StageSpec(
    name="mux",
    summary="the media + subtitle tracks -> soft-subtitled mp4 and mkv",
    env="common",
    params=MuxParams,
    inputs=("media",),
    input_lists=("subtitles",),
    outputs=("mp4", "mkv"),
)

SPECS = (MUX,)
