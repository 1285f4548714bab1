"""asr: speech -> transcript with word times (whisperx, or mlx-whisper on Apple silicon).

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_options import DEVICE, THREADS, Device, ServiceOptions
from captionbus.contracts.stage_params import ItemParams, LanguageOrAuto

class AsrParams(ItemParams):
    language: LanguageOrAuto = Field(
        None, description="spoken language (ISO 639-1); unset or auto: the job's -s, else detected")
    task: Literal["transcribe", "translate", "detect_language"] = Field(
        "transcribe", description="translate: Whisper decodes the speech straight into English (the transcript's "
                                  "language is en; what the gateway's /v1/audio/translations runs); "
                                  "detect_language: only find the spoken language (output `language`), "
                                  "once per job, for every chunk to decode with")
    model: str | None = Field(
        None, description="must name the model the asr service loaded (its path, folder name or id)")


class AsrOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_ASR_"

    backend: Literal["whisperx", "mlx"] | None = Field(
        None, description="unset: whisperx where it is installed, else mlx where mlx_whisper is (the mlx env)")
    model: str | None = Field(
        None, description="whisperx: CTranslate2 Whisper folder or Hugging Face id, default "
                          "<models>/whisper-base-ct2; mlx: MLX Whisper folder, default <models>/whisper-base-mlx")
    device: Device | None = Field(None, description=DEVICE + " (whisperx)")
    compute_type: str | None = Field(None, description="CTranslate2 compute type; unset: int8 on cpu, float16 on cuda")
    threads: int | None = Field(None, ge=1, description=THREADS)
    batch_size: int = Field(4, ge=1, le=256, description="speech chunks decoded together (whisperx)")
    workers: int = Field(
        1, ge=1, le=64, description="requests this process decodes at once, each on its own CTranslate2 worker "
                                    "of `threads` threads, all sharing one load of the model (whisperx; "
                                    "`run`/`serve asr --replicas N` on a CPU host set it to N)")
    mlx_openblas: bool = Field(True, validation_alias="CAPTIONBUS_MLX_OPENBLAS",
                               description="mlx on Linux: load a tuned BLAS (Intel MKL, else OpenBLAS) before mlx "
                                           "(its bundled BLAS is ~20x slower)")


ASR = StageSpec(
    name="asr",
    summary="speech -> transcript with word times (whisperx, or mlx-whisper)",
    env="whisperx",
    backends={"mlx": "mlx"},
    params=AsrParams,
    inputs=("audio",),
    optional_inputs=("regions", "chunks", "language"),
    outputs=("transcript", "language"),
    options=AsrOptions,
    note="whisperx; Apple silicon (hardware kind mlx): mlx-whisper",
)

SPECS = (ASR,)
