"""What each stage accepts in `StageRequest.params`: one pydantic model per stage.

The models are the stage boundary: the coordinator checks workflow files (node `params`) and job
options (`-o STAGE.KEY=VALUE`) against them before a job runs, `submit`/`run` refuse a bad
option before anything starts, and the stage runtime validates every request again and hands
the handler the parsed model (`ctx.params`). They live here, not beside the stages, because
the coordinator and the CLI must read them without importing a stage (or its ML libraries).

Every model forbids unknown keys. Numbers refuse booleans, NaN and infinities; bounds are the
stage's own limits (what its memory or its model can take). Three params are set by the
coordinator on every request (`source_language`, `target_languages`; `target_language` on a
fan-out branch) and `cache` switches the stage cache off for one job (`-o asr.cache=false`);
they are in `StageParams` / `BranchParams`, so a stage that a workflow fans out by target
language must take `BranchParams`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from contracts.languages import LANGUAGES

COORDINATOR = {"set_by": "coordinator"}  # json_schema_extra of the params the coordinator fills in

# source_separation: a window's separated stems are held in memory (~4 stems x 2 ch x 44.1 kHz).
MIN_CHUNK_S = 1.0
MAX_CHUNK_S = 600.0
DEFAULT_CHUNK_S = 60.0
DEFAULT_OVERLAP_S = 3.0
# translation: units per generate() call (beams x batch x length is what memory holds).
MAX_TRANSLATION_BATCH = 64
MAX_CONTEXT_SEGMENTS = 100
# A job's glossary travels in its request: bounded so it cannot make every unit slow.
MAX_GLOSSARY_TERMS = 5000
MAX_TERM_CHARS = 200
MAX_GLOSSARY_CHARS = MAX_GLOSSARY_TERMS * (2 * MAX_TERM_CHARS + 40)  # TSV: source, target, languages
# subtitle_gen: the file formats it writes (core.subtitles.formats reads this too).
SUBTITLE_FORMATS = ("srt", "vtt", "ass", "json", "txt")
SubtitleFormat = Literal["srt", "vtt", "ass", "json", "txt"]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number is needed, not true/false")
    return value


def _language(value: str) -> str:
    code = value.strip().lower()
    if code not in LANGUAGES:
        raise ValueError(f"unknown language code {value!r}; use an ISO 639-1 code such as en, hi, ta")
    return code


def _one_as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _auto_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() in ("", "auto") else value


# Bounds go inside the Annotated, before NOT_BOOL, so they reach the JSON Schema.
NOT_BOOL = BeforeValidator(_not_bool)
LanguageCode = Annotated[str, AfterValidator(_language)]
# A language to use, or unset / "auto" to take the transcript's or detect it.
LanguageOrAuto = Annotated[LanguageCode | None, BeforeValidator(_auto_is_none)]
GlossaryText = Annotated[str, Field(max_length=MAX_TERM_CHARS)]
GlossaryEntry = GlossaryText | Annotated[list[GlossaryText | None], Field(min_length=1, max_length=2)]
Glossary = (
    Annotated[str, Field(max_length=MAX_GLOSSARY_CHARS)]
    | Annotated[list[GlossaryEntry], Field(max_length=MAX_GLOSSARY_TERMS)]
    | Annotated[dict[GlossaryText, GlossaryText | None], Field(max_length=MAX_GLOSSARY_TERMS)]
)


class StageParams(BaseModel):
    """Params every stage takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache: bool = Field(True, description="false: run the stage even when the stage cache holds this result")
    # What the coordinator sets comes from the job spec, whose languages are checked at submit;
    # a stage checks a code where it uses one (its messages say what the model can do).
    source_language: str | None = Field(
        None, description="the job's spoken language (-s); unset: detect", json_schema_extra=COORDINATOR)
    target_languages: list[str] = Field(
        default_factory=list, description="the job's target languages (-t)", json_schema_extra=COORDINATOR)

    @classmethod
    def own_fields(cls) -> list[str]:
        """The params a person sets: the stage's own, then `cache` (not the coordinator's)."""
        common = [n for n in StageParams.model_fields if n != "cache"] + ["target_language", "item"]
        own = [n for n in cls.model_fields if n not in common and n != "cache"]
        return own + ["cache"]


class BranchParams(StageParams):
    """Params of a stage a workflow may fan out by target language (`for_each: target_languages`)."""

    target_language: str | None = Field(
        None, description="this branch's language (fan-out nodes)", json_schema_extra=COORDINATOR)


class ItemParams(StageParams):
    """Params of a stage a workflow may run once per item of another stage's list output
    (`for_each: chunk.chunks`: one asr request per chunk)."""

    item: Annotated[int, Field(ge=0), NOT_BOOL] | None = Field(
        None, description="this node's item of the list it fans out over (0-based)", json_schema_extra=COORDINATOR)


class DemuxParams(StageParams):
    audio_track: Annotated[int, Field(ge=0), NOT_BOOL] | None = Field(
        None, description="0-based index among the audio streams; unset: the default stream, else the first")


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
# a node of the job's state (services/chunk/stage.py MAX_CHUNKS): the unset default stretches for
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


class TranscriptJoinParams(StageParams):
    """transcript_join: the chunk transcripts, in chunk order, as one transcript."""


class AlignmentParams(ItemParams):
    """An ItemParams stage: a chunked workflow may align once per chunk (`for_each: chunk.chunks`,
    `alignment-3` <- `asr-3`); each segment is aligned in its own window of the WAV, so one
    chunk's request reads only that chunk's audio."""

    language: LanguageOrAuto = Field(
        None, description="the transcript's language, checked against it; unset: the job's -s")


class TranslationParams(BranchParams):
    """Every translation backend (translation_indictrans2, translation_nllb) takes these."""

    glossary: Glossary | None = Field(
        None, description="terms to keep or map: TSV text (source<TAB>target[<TAB>languages]), "
                          "a list of [source, target] pairs or terms, or a {source: target} mapping")
    batch_size: Annotated[int, Field(ge=1, le=MAX_TRANSLATION_BATCH), NOT_BOOL] | None = Field(
        None, description="sentence units per model call; unset: the service's")
    context: bool | Annotated[int, Field(ge=1, le=MAX_CONTEXT_SEGMENTS), NOT_BOOL] = Field(
        True, description="true: join segments into sentence units; false: each segment alone; "
                          "a number: at most that many segments per unit")


class SubtitleGenParams(BranchParams):
    language: LanguageCode | None = Field(
        None, description="picks the language's rules and names the files; unset: the transcript's")
    profile: str = Field("default", min_length=1, description="a profile of config/subtitles.yaml")
    formats: Annotated[list[SubtitleFormat], BeforeValidator(_one_as_list)] = Field(
        default_factory=lambda: ["srt", "vtt"], min_length=1, description="files to write (one output each)")


class MuxParams(StageParams):
    languages: Annotated[list[LanguageCode], BeforeValidator(_one_as_list)] | None = Field(
        None, description="one per subtitle file, in order; unset: from each file's name (subtitles.<lang>.srt)")


class NoopParams(StageParams):
    """The runtime tests' stage: it fails, sleeps and warns on request."""

    sleep_s: Annotated[float, Field(ge=0, le=3600), NOT_BOOL] = Field(0.0, description="work this long, reporting progress")
    fail: Literal["bad_input", "retryable", "crash"] | None = Field(None, description="raise that kind of error ...")
    fail_times: Annotated[int, Field(ge=0), NOT_BOOL] | None = Field(None, description="... on the first N deliveries only; unset: every one")
    warn: str | None = Field(None, description="publish this StageWarning first")
    write_bytes: Annotated[int, Field(ge=0, le=1 << 34), NOT_BOOL] = Field(
        0, description="write this many random bytes as output `out` instead of passing the inputs through")
