"""The vad stage's artifact: where in the audio someone speaks (JSON of `SpeechRegions`)."""
from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from contracts.version import SCHEMA_VERSION


class SpeechRegion(BaseModel):
    start: float = Field(ge=0, description="seconds from the start of the audio")
    end: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "SpeechRegion":
        if self.end < self.start:
            raise ValueError(f"region ends ({self.end}) before it starts ({self.start})")
        return self


class SpeechRegions(BaseModel):
    schema_version: str = SCHEMA_VERSION
    backend: str = Field(description="silero | pyannote | ...")
    duration: float = Field(ge=0, description="length of the audio, seconds")
    regions: list[SpeechRegion] = Field(default_factory=list, description="sorted, not overlapping")

    @property
    def speech_seconds(self) -> float:
        return sum(r.end - r.start for r in self.regions)
