"""chunk: speech regions -> chunks cut at silences, one asr request each.

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_params import NOT_BOOL, StageParams

# chunk: cut speech into chunks at silences for one asr request each. A running chunk is never
# preempted: another job's asr request waits for the first worker to finish its chunk, so the
# target length is the fairness knob. Measured (benchmarks/fanout.py, 20-minute film, base model,
# 2 workers of 1 thread vs 1, a 20 s clip submitted at random moments mid-film vs on an idle
# stack; a cut waits for Whisper's next window, so chunks run longer than the target):
#   target 60 s (~80 s chunks): clip median 2.03x, worst 3.75x; film 2.01x one worker's speed
#   target 30 s (~55 s chunks): clip median 1.58x, worst 2.48x; film 1.86x
#   target 20 s (~27 s, one window): clip median 1.55x, worst 2.16x; film 1.70x (two workers
#     decoding one-window chunks at once slowed each other: 3.4-5.2 s a chunk vs 3.1-4.1 alone)
# (60 s on a quieter machine than 30 and 20, which ran back to back.) 30 s keeps the film's
# speed-up and the clip's median under 2x. Per-chunk overhead was 0.01-0.02 s. A GPU worker
# batches a chunk's windows, so there longer chunks (--chunk-s) keep batches full. Every chunk is
# a node of the job's state (captionbus/services/chunk/stage.py MAX_CHUNKS): the unset default stretches for
# films too long to fit.
DEFAULT_CHUNK_TARGET_S = 30.0

MIN_CHUNK_TARGET_S = 5.0

MAX_CHUNK_TARGET_S = 3600.0


class ChunkParams(StageParams):
    target_s: Annotated[float, Field(ge=0, le=MAX_CHUNK_TARGET_S), NOT_BOOL] = Field(
        DEFAULT_CHUNK_TARGET_S,
        description=f"cut a chunk at the first silence after this many seconds (0: the whole audio is one chunk; "
                    f"else at least {MIN_CHUNK_TARGET_S:g}; unset: {DEFAULT_CHUNK_TARGET_S:g}, longer for a film that "
                    f"would need more chunks than a job holds)")
    min_silence_s: Annotated[float, Field(ge=0, le=10), NOT_BOOL] = Field(
        0.3, description="a pause must be this long to cut there (when max_s forces a cut: the widest pause)")
    chunk_above_s: Annotated[float, Field(ge=0), NOT_BOOL] | None = Field(
        None, description="audio no longer than this is one chunk unless target_s is given (0: always cut; "
                          "unset: the chunk worker's CAPTIONBUS_CHUNK_ABOVE_S)")
    max_s: Annotated[float, Field(ge=MIN_CHUNK_TARGET_S, le=2 * MAX_CHUNK_TARGET_S), NOT_BOOL] | None = Field(
        None, description="no chunk is longer (a longer speech region is cut at it); unset: 2 x target_s")

    @model_validator(mode="after")
    def _lengths(self) -> "ChunkParams":
        if 0 < self.target_s < MIN_CHUNK_TARGET_S:
            raise ValueError(f"target_s must be 0 (no chunking) or at least {MIN_CHUNK_TARGET_S:g} s, not {self.target_s:g}")
        if self.max_s is not None and self.target_s and self.max_s < self.target_s:
            raise ValueError(f"max_s ({self.max_s:g}) must be at least target_s ({self.target_s:g})")
        return self

    @property
    def max_length_s(self) -> float | None:
        """The enforced chunk length limit; None when not chunking."""
        if not self.target_s:
            return None
        return self.max_s if self.max_s is not None else 2 * self.target_s


CHUNK = StageSpec(
    name="chunk",
    summary="speech regions -> chunks cut at silences, one asr request each",
    env="common",
    params=ChunkParams,
    inputs=("regions",),
    outputs=("chunks", "language"),
    item_outputs=("chunks",),
    note="cuts speech regions into chunks: JSON only",
)

SPECS = (CHUNK,)
