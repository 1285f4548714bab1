"""vad and vad_pyannote: where someone speaks (Silero VAD on onnxruntime; pyannote segmentation).

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_options import DEVICE, Device, ServiceOptions
from captionbus.contracts.stage_params import NOT_BOOL, StageParams

# Speech ends when the probability falls this far below the start threshold (hysteresis).
VAD_HYSTERESIS = 0.15


class VadParams(StageParams):
    """Both VAD backends (vad, vad_pyannote) turn per-frame speech scores into regions alike."""

    threshold: Annotated[float, Field(gt=0, lt=1), NOT_BOOL] = Field(0.5, description="speech probability a frame needs to start a region")
    min_speech_s: Annotated[float, Field(ge=0, le=60), NOT_BOOL] = Field(0.25, description="shorter regions are dropped")
    min_silence_s: Annotated[float, Field(ge=0, le=60), NOT_BOOL] = Field(0.3, description="shorter pauses do not end a region")
    pad_s: Annotated[float, Field(ge=0, le=5), NOT_BOOL] = Field(0.15, description="added before and after each region (clipped to the audio)")
    max_region_s: Annotated[float, Field(ge=1, le=3600), NOT_BOOL] = Field(30.0, description="longer regions are split at their quietest frame")

    @property
    def offset_threshold(self) -> float:
        """Speech ends below this (threshold minus the hysteresis)."""
        return max(self.threshold - VAD_HYSTERESIS, 0.01)


class VadOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_VAD_"

    model: str | None = Field(None, description="silero_vad.onnx; unset: <models>/silero-vad/silero_vad.onnx")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (a frame is tiny: more only add overhead)")


class VadPyannoteOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_VAD_PYANNOTE_"

    model: str | None = Field(
        None, validation_alias="CAPTIONBUS_PYANNOTE_SEGMENTATION",
        description="segmentation checkpoint (pytorch_model.bin); unset: <models>/pyannote-segmentation/pytorch_model.bin")
    device: Device | None = Field(None, description=DEVICE)
    threads: int = Field(1, ge=1, description="torch threads (the model is small; 2 threads on a busy "
                                                 "2-core host ran ~20x slower than 1)")
    step: float | None = Field(None, gt=0, description="seconds between model windows; unset: a tenth of the "
                                                       "window (0.5 s), as pyannote and whisperx do")
    batch_size: int = Field(32, ge=1, le=4096, description="windows per forward pass")


VAD = StageSpec(
    name="vad",
    summary="where someone speaks (Silero VAD, onnxruntime)",
    env="common",
    params=VadParams,
    inputs=("audio",),
    outputs=("regions",),
    options=VadOptions,
    note="Silero VAD (ONNX weights from the silero-vad wheel, onnxruntime)",
)


VAD_PYANNOTE = StageSpec(
    name="vad_pyannote",
    summary="where someone speaks (pyannote segmentation)",
    env="pyannote",
    params=VadParams,
    inputs=("audio",),
    outputs=("regions",),
    options=VadPyannoteOptions,
    module="pyannote_stage",
    note="pyannote segmentation (the model whisperx ships); job option vad: pyannote",
)

SPECS = (VAD, VAD_PYANNOTE)
