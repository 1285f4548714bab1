"""asr: 16 kHz mono WAV -> transcript JSON (captionbus.contracts.transcript.Transcript) with segment and
word timestamps, with one of two backends that offer the same four functions (load, describe,
supported_languages, transcribe): whisperx (faster-whisper / CTranslate2 + pyannote VAD,
captionbus/services/asr/whisperx_backend.py) or mlx-whisper on Apple silicon (captionbus/services/asr/mlx_backend.py).

Inputs: `audio` (the demux WAV); optional `regions` (captionbus.contracts.speech.SpeechRegions JSON from
the vad stage). With regions only they are decoded (audio outside them, beyond a
REGION_MARGIN_S margin, is silenced; whisperx's own pyannote VAD does not run), language
detection listens to them, and an empty region list means no speech: an empty transcript.
Params (declaration.AsrParams) and service options (declaration.AsrOptions):
`captionbus stages asr`.
Outputs: `transcript` (transcript.json), cleaned by captionbus/services/asr/hallucination.py (loops,
text outside speech, phantom phrases dropped; "lyrics" / "hallucination-suspect" flags).

One chunk of a film (the `chunked` workflow): with the param `item` and the input `chunks`
(captionbus.contracts.speech.SpeechChunks from the chunk stage) only that chunk's window of the WAV is read
(captionbus/services/audio.py seeks to it: memory follows the chunk, not the film), decoded inside its
regions, and its times shifted back to film times; the input `language` (SpokenLanguage) is the
language detected once for the job. `task: detect_language` writes that `language` output: the
given -s, or what Whisper hears in the first chunk's speech (whisperx: in the first window the
decode cuts from it, whisperx_backend.detect_on_regions). A job of one chunk makes no such
request: its one chunk request detects (handle_chunk), on the same samples; with whisperx inside
the decode, whose first window's encoder pass serves both.
"""
from __future__ import annotations

import importlib.util
import queue
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.asr import ASR, AsrOptions, AsrParams
from captionbus.contracts.speech import SpeechChunk, SpeechChunks, SpeechRegions, SpokenLanguage
from captionbus.contracts.transcript import Segment, Transcript
from captionbus.core.hardware import usable_cores
from captionbus.services.asr import hallucination, mlx_backend, whisperx_backend
from captionbus.services.audio import (
    DECODE_MARGIN_S,
    merge_regions,
    read_wav,
    sample_index,
    wav_duration,
    wav_window_digest,
)
from captionbus.services.runtime import BadInput, SetupContext, StageContext, StageDefinition
from captionbus.services.runtime.cache import model_identity
from captionbus.services.runtime.options import default_device

SAMPLE_RATE = 16000
# Audio kept on each side of a speech region when decoding: VAD edges clip soft word edges.
REGION_MARGIN_S = DECODE_MARGIN_S
# Regions made for another audio (a different length) are refused beyond this difference.
REGION_DURATION_TOLERANCE_S = 0.5

Regions = list[tuple[float, float]]

# backend name -> module with load / describe / supported_languages / transcribe
BACKENDS = {"whisperx": whisperx_backend, "mlx": mlx_backend}


@dataclass
class AsrModel:
    """What setup() loads once per process and every request reuses.

    `engines`: the decoders over that one load (whisperx_backend.decoders: the `workers`
    option, what `run --replicas N` sets on a CPU host), each used by one request at a time
    (decoder()); the stage's `workers` requests run at once (StageDefinition.slots_option), so
    a request never waits for a decoder."""

    backend: str  # "whisperx" | "mlx"
    engine: Any  # what BACKENDS[backend].load() returned
    source: str
    load_seconds: float
    engines: list[Any] = field(default_factory=list)
    _free: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)

    def __post_init__(self) -> None:
        self.engines = self.engines or [self.engine]
        for n, engine in enumerate(self.engines):
            self._free.put((n, engine))

    @contextmanager
    def decoder(self):
        """(its number, a decoder) for one request's calls, back in the pool after them: the
        backends keep per-call state on it (the pipeline's tokenizer, our swapped VAD)."""
        n, engine = self._free.get()
        try:
            yield n, engine
        finally:
            self._free.put((n, engine))

    @property
    def module(self):
        return BACKENDS[self.backend]

    def supported_languages(self) -> list[str]:
        return list(self.module.supported_languages(self.engine))

    def names(self) -> set[str]:
        source = Path(self.source)
        return {self.source, source.name, str(source.resolve()) if source.exists() else self.source}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def choose_backend(options: AsrOptions) -> str:
    """The `backend` option, else whichever library this env has (whisperx first)."""
    if options.backend:
        return options.backend
    if _installed("whisperx"):
        return "whisperx"
    if _installed("mlx_whisper"):
        return "mlx"
    raise RuntimeError("asr needs whisperx or mlx-whisper: run it in the whisperx or mlx env (captionbus envs create)")


def model_source(options: AsrOptions, models_dir: Path, backend: str = "whisperx") -> str:
    if options.model:
        return options.model
    if backend == "mlx":
        default = Path(models_dir) / "whisper-base-mlx"
        if default.is_dir():
            return str(default)
        raise RuntimeError(
            f"no MLX Whisper model: set CAPTIONBUS_ASR_MODEL to a folder with an MLX Whisper model "
            f"(config.json + weights.npz or weights.safetensors) or put one in {default}"
        )
    default = Path(models_dir) / "whisper-base-ct2"
    if (default / "model.bin").exists():
        return str(default)
    raise RuntimeError(
        f"no ASR model: set CAPTIONBUS_ASR_MODEL (a CTranslate2 dir or a Hugging Face id) "
        f"or run `captionbus models fetch-test` to put Whisper base in {default}"
    )


def setup(ctx: SetupContext) -> AsrModel:
    options: AsrOptions = ctx.options
    backend = choose_backend(options)
    source = model_source(options, ctx.models_dir, backend)
    if backend == "mlx":
        if options.workers > 1:
            raise RuntimeError(f"workers={options.workers}: mlx-whisper decodes one request at a time per process "
                               "(its model lives in module globals); unset CAPTIONBUS_ASR_WORKERS and run one "
                               "mlx asr worker per Mac")
        started = time.monotonic()
        engine = mlx_backend.load(source, ctx.log, fast_blas=options.mlx_openblas,
                                  threads=options.threads or usable_cores())
        load_seconds = time.monotonic() - started
        ctx.log.info("asr model loaded", backend="mlx", model=source, seconds=round(load_seconds, 2))
        return AsrModel("mlx", engine, source, load_seconds)
    device = options.device or default_device()
    engine = whisperx_backend.load(
        source, ctx.log, device=device,
        compute_type=options.compute_type or ("int8" if device == "cpu" else "float16"),
        threads=options.threads or usable_cores(), batch_size=options.batch_size, workers=options.workers,
    )
    return AsrModel("whisperx", engine, source, engine.load_seconds,
                    engines=whisperx_backend.decoders(engine, options.workers))


def declare_model(ctx: SetupContext) -> str:
    """The model setup() will load, before it loads (the stage cache answers hits meanwhile):
    backend, source and a stamp of the model's files. Raises when there is none (setup says why)."""
    backend = choose_backend(ctx.options)
    return model_identity(backend, model_source(ctx.options, ctx.models_dir, backend))


def describe_model(resources: AsrModel | None) -> str | None:
    if resources is None:
        return None
    return resources.module.describe(resources.engine)


def requested_language(params: AsrParams, model: AsrModel) -> str | None:
    # `source_language` is what the coordinator passes every stage (the job's -s option).
    language = params.language or params.source_language
    if language in (None, "", "auto"):
        return None
    language = language.strip().lower()
    supported = model.supported_languages()
    if language not in supported:
        if supported == ["en"]:
            raise BadInput(f"language {language!r}: the loaded model ({Path(model.source).name}) is English-only")
        raise BadInput(
            f"language {language!r} is not a Whisper language code; use one such as en, hi, ta, bn, "
            f"or leave it unset to detect"
        )
    return language


def check_model(params: AsrParams, model: AsrModel) -> None:
    if params.model and params.model not in model.names():
        raise BadInput(f"this asr service has {model.source} loaded, not {params.model!r}; send the job to a service with that model")


# ---------------------------------------------------------------- speech regions (vad stage)

def read_regions(request: StageRequest, ctx: StageContext, duration: float) -> Regions | None:
    """The `regions` input as sorted, non-overlapping (start, end) seconds inside the audio, or
    None when the job has no vad stage (the transcribe workflow)."""
    if "regions" not in request.inputs:
        return None
    parsed = ctx.input("regions", SpeechRegions)
    if abs(parsed.duration - duration) > REGION_DURATION_TOLERANCE_S + 0.01 * duration:
        raise BadInput(
            f"speech regions were found in {parsed.duration:.1f} s of audio but this audio is {duration:.1f} s long; "
            f"they belong to another file"
        )
    return merge_regions([(r.start, r.end) for r in parsed.regions], duration)


def speech_only(audio: np.ndarray, regions: Regions) -> np.ndarray:
    """A copy of the audio silent outside the regions, same length so times do not move."""
    kept = np.zeros_like(audio)
    for start, end in regions:  # at the samples the backend cuts its windows at (audio.sample_index)
        a, b = sample_index(start), sample_index(end)
        kept[a:b] = audio[a:b]
    return kept


def decode_input(audio: np.ndarray, regions: Regions) -> tuple[np.ndarray, Regions]:
    """What a backend decodes: the regions widened by REGION_MARGIN_S, the audio silent outside them."""
    regions = merge_regions(regions, len(audio) / SAMPLE_RATE, REGION_MARGIN_S)
    return speech_only(audio, regions), regions


def detects_on_first_window(model: AsrModel) -> bool:
    """Whether the backend hears the language in the decode's first window (whisperx_backend
    detect_on_regions), so a decode given no language detects inside transcribe() for free."""
    return bool(getattr(model.module, "DETECTS_ON_FIRST_WINDOW", False))


def transcribe(
    model: AsrModel, engine: Any, audio: np.ndarray, language: str | None, regions: Regions | None,
    ctx: StageContext, task: str = "transcribe",
) -> tuple[str, float | None, list[Segment]]:
    """The backend's transcribe() on the audio, silenced outside the regions (widened by
    REGION_MARGIN_S) when there are any; an empty region list is no speech. task translate:
    Whisper decodes into English; the returned language is then en (the text's language), the
    spoken one is logged."""
    if regions == []:
        return language or "en", None, []
    if regions is not None:
        audio, regions = decode_input(audio, regions)
    if model.backend == "mlx":
        def progress(fraction: float, message: str = "transcribing speech") -> None:
            ctx.progress(min(1.0, max(0.0, 0.02 + 0.96 * float(fraction))), message)
    else:
        progress = ctx.progress  # the whisperx backend reports the request's own fractions
    given = language
    language, probability, segments = model.module.transcribe(engine, audio, language, regions, progress, task=task)
    if given is None and probability is not None:
        ctx.log.info("language detected", language=language, probability=round(float(probability), 3))
    segments = [s if isinstance(s, Segment) else Segment.model_validate(s) for s in segments]
    if task == "translate":
        ctx.log.info("translated into English", spoken=language)
        return "en", None, segments
    return language, (None if probability is None else float(probability)), segments


def drop_hallucinations(segments: list[Segment], regions: Regions | None, duration: float, ctx: StageContext) -> list[Segment]:
    """captionbus/services/asr/hallucination.py on the decoded segments; every drop logged and counted,
    one warning per request when anything went."""
    cleaned, report = hallucination.clean_segments(segments, regions, duration)
    for dropped in report.dropped:
        ctx.log.info("hallucination dropped", reason=dropped.reason, start=dropped.start, end=dropped.end, text=dropped.text)
    ctx.metrics.update(report.metrics())
    if report.anything_dropped:
        ctx.warn(f"dropped likely hallucinated text: {report.summary()}")
    return cleaned


# ---------------------------------------------------------------- chunks (for_each: chunk.chunks)

def read_chunks(ctx: StageContext) -> SpeechChunks:
    """The `chunks` input, checked to belong to this audio (its length, from the WAV header)."""
    chunks = ctx.input("chunks", SpeechChunks)
    duration = wav_duration(ctx.input_path("audio"))
    if abs(chunks.duration - duration) > REGION_DURATION_TOLERANCE_S + 0.01 * duration:
        raise BadInput(f"chunks were cut from {chunks.duration:.1f} s of audio but this audio is {duration:.1f} s long; "
                       "they belong to another file")
    return chunks


def chunk_audio(ctx: StageContext, chunk: SpeechChunk) -> tuple[np.ndarray, Regions]:
    """The chunk's samples only, and its speech regions in chunk times."""
    audio = read_wav(ctx.input_path("audio"), start_s=chunk.start, end_s=chunk.end)
    regions = [(r.start - chunk.start, r.end - chunk.start) for r in chunk.regions]
    return audio, merge_regions(regions, len(audio) / SAMPLE_RATE)


def shifted(segments: list[Segment], offset: float) -> list[Segment]:
    """Chunk times -> film times."""
    def move(t: float | None) -> float | None:
        return None if t is None else round(t + offset, 3)

    return [s.model_copy(update={
        "start": move(s.start), "end": move(s.end),
        "words": [w.model_copy(update={"start": move(w.start), "end": move(w.end)}) for w in s.words],
    }) for s in segments]


def given_language(request: StageRequest, ctx: StageContext, params: AsrParams, model: AsrModel) -> str | None:
    """The job's language: the `language` input (detected once for the job) when it names one,
    else the asked one (asr.language, then -s). A job of one chunk gets a `language` input of
    null from the chunk stage (its `language` node is skipped): that null must not replace an
    asr.language option, or the request would detect what the caller named."""
    if "language" not in request.inputs:
        return requested_language(params, model)
    spoken = ctx.input("language", SpokenLanguage)
    if spoken.language is None:
        return requested_language(params, model)
    return requested_language(params.model_copy(update={"language": spoken.language}), model)


def detect(model: AsrModel, engine: Any, audio: np.ndarray, regions: Regions | None,
           ctx: StageContext) -> tuple[str, float | None]:
    """(language, probability) heard in `audio` (in its `regions` when given): what transcribe()
    would detect on the same samples, by `engine`, a decoder the caller holds (AsrModel.decoder)."""
    if regions and detects_on_first_window(model):  # on the window transcribe() decodes first
        audio, regions = decode_input(audio, regions)
    language, probability = model.module.detect(engine, audio, regions)
    ctx.log.info("language detected", language=language,
                 probability=None if probability is None else round(float(probability), 3))
    return language, probability


def handle_detect(request: StageRequest, ctx: StageContext, params: AsrParams, model: AsrModel) -> dict[str, Path]:
    """task detect_language: the given language, else the one heard in the first chunk's speech."""
    language, probability = requested_language(params, model), None
    if language is None:
        audio, regions = np.zeros(0, np.float32), None
        if "chunks" in request.inputs:
            chunks = read_chunks(ctx).chunks
            if chunks:
                audio, regions = chunk_audio(ctx, chunks[0])
        else:
            audio = read_wav(ctx.input_path("audio"), end_s=whisperx_backend.DETECT_WINDOW_S)
        if len(audio):
            with model.decoder() as (_n, engine):
                language, probability = detect(model, engine, audio, regions, ctx)
        else:
            language = "en"  # no speech: nothing will be decoded in it
            ctx.warn("no speech to detect the language in: the transcript will be empty")
    out = ctx.work_dir / "language.json"
    out.write_text(SpokenLanguage(language=language, probability=probability).model_dump_json())
    ctx.progress(1.0, f"language {language}")
    return {"language": out}


def handle_chunk(request: StageRequest, ctx: StageContext, params: AsrParams, model: AsrModel,
                 language: str | None) -> dict[str, Path]:
    """One chunk (param `item`) of the `chunks` input, in film times. Without a language (a job
    of one chunk: the workflows' `language` node runs only for several, captionbus.coordinator.graph
    ItemCondition) it is detected here, on the same samples the `detect_language` request hears
    for chunk 0 (handle_detect), so the words are the ones that request's language gave, for one
    asr request less per clip (a queue trip and a WAV read). whisperx detects inside transcribe()
    on the decode's first window and the decode reuses that encoder pass (no pass of its own for
    the detection); mlx detects first. The transcript then carries the detected probability."""
    if "chunks" not in request.inputs:
        raise BadInput("param item needs the chunks input (from the chunk stage)")
    chunks = read_chunks(ctx)
    if params.item >= len(chunks.chunks):
        raise BadInput(f"item {params.item}: the chunks input lists {len(chunks.chunks)} chunks")
    chunk = chunks.chunks[params.item]
    audio, regions = chunk_audio(ctx, chunk)
    duration = len(audio) / SAMPLE_RATE
    started = time.monotonic()
    detected = None
    with model.decoder() as (decoder, engine):
        if language is None and len(audio) and regions and not detects_on_first_window(model):
            language, detected = detect(model, engine, audio, regions, ctx)
        language, language_probability, segments = transcribe(model, engine, audio, language, regions, ctx,
                                                              params.task)
    if detected is not None and params.task != "translate":
        language_probability = float(detected)
    segments = shifted(drop_hallucinations(segments, regions, duration, ctx), chunk.start)
    seconds = time.monotonic() - started
    transcript = Transcript(language=language, language_probability=language_probability, duration=chunks.duration,
                            model=describe_model(model), segments=segments)
    out = ctx.work_dir / "transcript.json"
    out.write_text(transcript.model_dump_json(indent=1))
    ctx.metrics.update(model_load_s=model.load_seconds, audio_duration_s=duration, asr_s=seconds,
                       realtime_factor=seconds / duration if duration else 0.0, segments=float(len(segments)),
                       chunk_start_s=chunk.start, speech_region_s=float(sum(e - s for s, e in regions)),
                       decoder=float(decoder))
    ctx.progress(1.0, f"chunk {params.item}: {len(segments)} segments")
    return {"transcript": out}


def cache_inputs(request: StageRequest, ctx: StageContext) -> dict[str, str] | None:
    """The stage cache key of one chunk (param `item`): its window's samples, the chunk itself
    (times, regions) and the language, not the whole film: re-running a film with one changed scene
    redoes that scene's chunk only. Other requests: None (every input's hash)."""
    params: AsrParams = ctx.params
    if params.item is None or params.task != "transcribe" or "chunks" not in request.inputs:
        return None
    chunks = read_chunks(ctx)
    if params.item >= len(chunks.chunks):
        return None
    chunk = chunks.chunks[params.item]
    digests = {
        "chunk_audio": wav_window_digest(ctx.input_path("audio"), chunk.start, chunk.end),
        "chunk": chunk.model_dump_json(),
        "duration": repr(chunks.duration),
    }
    if "language" in request.inputs:
        digests["language"] = request.inputs["language"].key
    return digests


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    model: AsrModel = ctx.resources
    params: AsrParams = ctx.params
    check_model(params, model)
    if params.task == "detect_language":
        return handle_detect(request, ctx, params, model)
    language = given_language(request, ctx, params, model)
    if params.item is not None:
        return handle_chunk(request, ctx, params, model, language)
    audio = read_wav(ctx.input_path("audio"))
    duration = len(audio) / SAMPLE_RATE
    regions = read_regions(request, ctx, duration)
    started = time.monotonic()

    with model.decoder() as (decoder, engine):
        language, language_probability, segments = transcribe(model, engine, audio, language, regions, ctx,
                                                              params.task)
    segments = drop_hallucinations(segments, regions, duration, ctx)

    seconds = time.monotonic() - started
    transcript = Transcript(
        language=language,
        language_probability=language_probability,
        duration=duration,
        model=describe_model(model),
        segments=segments,
    )
    out = ctx.work_dir / "transcript.json"
    out.write_text(transcript.model_dump_json(indent=1))

    ctx.metrics.update(
        model_load_s=model.load_seconds,
        audio_duration_s=duration,
        asr_s=seconds,
        realtime_factor=seconds / duration if duration else 0.0,
        segments=float(len(segments)),
        decoder=float(decoder),
    )
    if regions is not None:
        ctx.metrics["speech_region_s"] = float(sum(end - start for start, end in regions))
    if regions == []:
        ctx.warn("the vad stage found no speech in the audio: empty transcript")
    elif not segments:
        ctx.warn("no speech found in the audio")
    ctx.progress(1.0, f"{len(segments)} segments")
    return {"transcript": out}


STAGE = StageDefinition(
    spec=ASR,
    handle=handle,
    setup=setup,
    # whichever backend this env lacks is reported as "missing"
    report_packages=("whisperx", "faster-whisper", "ctranslate2", "torch", "mlx-whisper", "mlx"),
    describe_model=describe_model,
    declare_model=declare_model,
    cache_inputs=cache_inputs,
    slots_option="workers",  # requests at once: one per decoder (AsrModel.engines)
)
