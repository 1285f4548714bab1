"""source_separation: the audio -> its vocals only (demucs).

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_options import DEVICE, THREADS, Device, ServiceOptions
from captionbus.contracts.stage_params import NOT_BOOL, StageParams

# source_separation: a window's separated stems are held in memory (~4 stems x 2 ch x 44.1 kHz).
MIN_CHUNK_S = 1.0

MAX_CHUNK_S = 600.0

DEFAULT_CHUNK_S = 60.0

DEFAULT_OVERLAP_S = 3.0


class SourceSeparationParams(StageParams):
    chunk_s: Annotated[float, Field(ge=MIN_CHUNK_S, le=MAX_CHUNK_S), NOT_BOOL] = Field(
        DEFAULT_CHUNK_S,
        description="longest window separated at once, seconds (memory grows with it)")
    overlap_s: Annotated[float, Field(ge=0, allow_inf_nan=False), NOT_BOOL] | None = Field(
        None, description=f"overlap of neighbouring windows, seconds; at most chunk_s / 3; "
                                f"unset: {DEFAULT_OVERLAP_S:g} (or chunk_s / 3 when smaller)")

    @model_validator(mode="after")
    def _overlap_fits(self) -> "SourceSeparationParams":
        if self.overlap_s is not None and self.overlap_s > self.chunk_s / 3:
            raise ValueError(f"overlap_s must be at most a third of chunk_s ({self.chunk_s / 3:g} s), "
                             f"not {self.overlap_s:g}")
        return self

    @property
    def window_overlap_s(self) -> float:
        return self.overlap_s if self.overlap_s is not None else min(DEFAULT_OVERLAP_S, self.chunk_s / 3)


class SourceSeparationOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_DEMUCS_"

    model: str = Field("htdemucs", min_length=1, description="demucs model name or signature")
    repo: str | None = Field(None, description="local demucs model folder (as `demucs --repo` takes); unset: "
                                               "demucs fetches its pretrained weights the usual way")
    device: Device | None = Field(None, description=DEVICE)
    threads: int | None = Field(None, ge=1, description=THREADS)
    shifts: int = Field(0, ge=0, le=20, description="random-shift passes (each one a full extra pass for ~0.2 dB)")


SOURCE_SEPARATION = StageSpec(
    name="source_separation",
    summary="the audio -> its vocals only (demucs htdemucs)",
    env="demucs",
    params=SourceSeparationParams,
    inputs=("audio",),
    outputs=("vocals",),
    options=SourceSeparationOptions,
)

SPECS = (SOURCE_SEPARATION,)
