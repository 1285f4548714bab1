"""The transcript artifact passed from asr (and later alignment) to subtitle_gen: JSON of `Transcript`."""
from __future__ import annotations

from pydantic import BaseModel, Field

from captionbus.contracts.version import SCHEMA_VERSION


class Word(BaseModel):
    text: str
    start: float | None = Field(default=None, description="seconds; None when the recogniser gave none")
    end: float | None = None
    score: float | None = None
    speaker: str | None = Field(default=None, description="speaker label of the turn covering most of the word")


class Segment(BaseModel):
    start: float
    end: float
    text: str
    words: list[Word] = Field(default_factory=list)
    speaker: str | None = None
    # The decoder's own per-segment statistics (faster-whisper's Segment fields), None when the
    # recogniser did not report them -- never a made-up 0.0.
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    no_speech_prob: float | None = None
    tokens: list[int] | None = None
    flags: list[str] = Field(default_factory=list, description="e.g. 'lyrics', 'hallucination-suspect'")


class Transcript(BaseModel):
    schema_version: str = SCHEMA_VERSION
    language: str
    language_probability: float | None = None
    duration: float | None = None
    model: str | None = None
    translated_from: str | None = Field(default=None, description="source language when this is a translation")
    aligned: bool = Field(default=False, description="word times come from forced alignment (not ASR)")
    segments: list[Segment] = Field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments).strip()
