"""demux: any media file -> 16 kHz mono WAV and its probed facts.

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_params import NOT_BOOL, StageParams

class DemuxParams(StageParams):
    audio_track: Annotated[int, Field(ge=0), NOT_BOOL] | None = Field(
        None, description="0-based index among the audio streams; unset: the default stream, else the first")


DEMUX = StageSpec(
    name="demux",
    summary="any media file -> 16 kHz mono WAV and its probed facts",
    env="common",
    params=DemuxParams,
    inputs=("media",),
    outputs=("audio", "probe"),
)

SPECS = (DEMUX,)
