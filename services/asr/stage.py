"""asr: 16 kHz mono WAV -> transcript JSON (contracts.transcript.Transcript) with segment and
word timestamps, using whisperx (faster-whisper / CTranslate2 + pyannote VAD), or mlx-whisper
on Apple silicon (services/asr/mlx_backend.py).

Inputs: `audio` (the demux WAV); optional `regions` (contracts.speech.SpeechRegions JSON from
the vad stage). With regions only they are decoded (audio outside them, beyond a
REGION_MARGIN_S margin, is silenced; whisperx's own pyannote VAD does not run), language
detection listens to them, and an empty region list means no speech: an empty transcript.
Params: `language` or the job's `source_language` (ISO 639-1 Whisper code; unset or "auto" =
detect), `model` (optional; must name the model this service loaded).
Outputs: `transcript` (transcript.json), cleaned by services/asr/hallucination.py (loops,
text outside speech, phantom phrases dropped; "lyrics" / "hallucination-suspect" flags).

Service options (`serve asr --option k=v`, or the env var in brackets):
  backend (CAPTIONBUS_ASR_BACKEND)  whisperx | mlx; default whisperx where it is installed,
                                 else mlx where mlx_whisper is (the mlx env)
  model (CAPTIONBUS_ASR_MODEL)   whisperx: local CTranslate2 dir or Hugging Face id, default
                                 <models_dir>/whisper-base-ct2; mlx: local MLX Whisper dir,
                                 default <models_dir>/whisper-base-mlx
  device (CAPTIONBUS_ASR_DEVICE) cpu | cuda; default cuda where the hardware cache has a GPU
  compute_type (CAPTIONBUS_ASR_COMPUTE_TYPE)  default int8 on cpu, float16 on cuda
  threads (CAPTIONBUS_ASR_THREADS)            default: all cores
  batch_size (CAPTIONBUS_ASR_BATCH_SIZE)      speech chunks decoded together; default 4
  (device, compute_type and batch_size apply to whisperx only)

Where word times come from. whisperx's FasterWhisperPipeline decodes each VAD speech chunk
(up to 30 s) in batches with `without_timestamps=True` and returns one text per chunk, no word
times: whisperx gets those from its separate wav2vec2 alignment step, which here is the
`alignment` stage of the translate/subtitle workflows (services/alignment). Running faster-whisper's own
`transcribe(word_timestamps=True)` on the same chunks was measured worse on the test clip
(WER 0.21 vs 0.0: it pads the mel spectrogram instead of the audio and decodes with
timestamp tokens). So we keep whisperx's text and time its words with Whisper's cross-attention
alignment (faster-whisper's `find_alignment`, i.e. CTranslate2 `Whisper.align`, the mechanism
behind faster-whisper's word timestamps) on the very chunk and features the text was decoded
from: one extra encoder pass per chunk, same model, same process. These times are what the
transcribe workflow uses, and what alignment falls back to for a language without an aligner.
"""
from __future__ import annotations

import importlib.util
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from contracts import StageRequest
from contracts.speech import SpeechRegions
from contracts.transcript import Segment, Transcript, Word
from services.asr import hallucination
from services.audio import read_wav
from services.runtime import BadInput, SetupContext, StageContext, StageDefinition
from services.runtime.options import default_device, option

SAMPLE_RATE = 16000
SENTENCE_END = (".", "?", "!", "。", "？", "！", "।")
# A pause this long between two words starts a new transcript segment even mid-sentence.
SEGMENT_BREAK_PAUSE_S = 1.5
# Share of the progress bar given to decoding; word timing takes the rest.
DECODE_SHARE = 0.8
# Language detection looks for speech in this much audio from the start.
DETECT_WINDOW_S = 600
MIN_AUDIO_SAMPLES = SAMPLE_RATE // 10
# Whisper's window: whisperx decodes speech chunks of at most this length.
CHUNK_S = 30
# Audio kept on each side of a speech region when decoding: VAD edges clip soft word edges.
REGION_MARGIN_S = 0.1
# Regions made for another audio (a different length) are refused beyond this difference.
REGION_DURATION_TOLERANCE_S = 0.5

Regions = list[tuple[float, float]]


BACKENDS = ("whisperx", "mlx")


@dataclass
class AsrModel:
    """What setup() loads once per process and every request reuses."""

    backend: str  # "whisperx" | "mlx"
    engine: Any  # whisperx: FasterWhisperPipeline; mlx: whatever mlx_backend.load() returned
    source: str
    device: str
    compute_type: str
    batch_size: int
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokenizers: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline(self):
        """whisperx's FasterWhisperPipeline (whisperx backend only)."""
        return self.engine

    @property
    def whisper(self):
        """The faster-whisper WhisperModel inside the pipeline (whisperx subclasses it)."""
        return self.engine.model

    def supported_languages(self) -> list[str]:
        if self.backend == "mlx":
            from services.asr import mlx_backend

            return list(mlx_backend.supported_languages(self.engine))
        return list(self.whisper.supported_languages)

    def names(self) -> set[str]:
        source = Path(self.source)
        return {self.source, source.name, str(source.resolve()) if source.exists() else self.source}

    def tokenizer(self, language: str):
        if language not in self.tokenizers:
            from faster_whisper.tokenizer import Tokenizer

            self.tokenizers[language] = Tokenizer(
                self.whisper.hf_tokenizer, self.whisper.model.is_multilingual, task="transcribe", language=language
            )
        return self.tokenizers[language]


def _option(ctx: SetupContext, key: str, default=None):
    return option(ctx, key, f"CAPTIONBUS_ASR_{key.upper()}", default)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def choose_backend(ctx: SetupContext) -> str:
    """The `backend` option, else whichever library this env has (whisperx first)."""
    configured = _option(ctx, "backend")
    if configured:
        backend = str(configured).strip().lower()
        if backend not in BACKENDS:
            raise RuntimeError(f"asr backend {configured!r} is unknown; use one of {', '.join(BACKENDS)}")
        return backend
    if _installed("whisperx"):
        return "whisperx"
    if _installed("mlx_whisper"):
        return "mlx"
    raise RuntimeError("asr needs whisperx or mlx-whisper: run it in the whisperx or mlx env (captionbus envs create)")


def model_source(ctx: SetupContext, backend: str = "whisperx") -> str:
    configured = _option(ctx, "model")
    if configured:
        return str(configured)
    if backend == "mlx":
        default = Path(ctx.models_dir) / "whisper-base-mlx"
        if default.is_dir():
            return str(default)
        raise RuntimeError(
            f"no MLX Whisper model: set CAPTIONBUS_ASR_MODEL to a folder with an MLX Whisper model "
            f"(config.json + weights.npz or weights.safetensors) or put one in {default}"
        )
    default = Path(ctx.models_dir) / "whisper-base-ct2"
    if (default / "model.bin").exists():
        return str(default)
    raise RuntimeError(
        f"no ASR model: set CAPTIONBUS_ASR_MODEL (a CTranslate2 dir or a Hugging Face id) "
        f"or run `captionbus models fetch-test` to put Whisper base in {default}"
    )


def setup(ctx: SetupContext) -> AsrModel:
    backend = choose_backend(ctx)
    source = model_source(ctx, backend)
    if backend == "mlx":
        from services.asr import mlx_backend

        started = time.monotonic()
        engine = mlx_backend.load(source, ctx.log)
        load_seconds = time.monotonic() - started
        ctx.log.info("asr model loaded", backend="mlx", model=source, seconds=round(load_seconds, 2))
        return AsrModel("mlx", engine, source, "mlx", "mlx", 1, load_seconds)

    import torch
    import whisperx  # heavy (torch, pyannote): only in the asr process, only here

    device = str(_option(ctx, "device", default_device()))
    compute_type = str(_option(ctx, "compute_type", "int8" if device == "cpu" else "float16"))
    threads = int(_option(ctx, "threads", os.cpu_count() or 1))
    batch_size = int(_option(ctx, "batch_size", 4))
    torch.set_num_threads(threads)  # pyannote VAD runs in torch

    started = time.monotonic()
    pipeline = whisperx.load_model(
        source,
        device=device,
        compute_type=compute_type,
        language=None,  # per request: given or detected
        vad_method="pyannote",  # its weights ship in the wheel; "silero" needs torch.hub (online)
        threads=threads,
        local_files_only=Path(source).is_dir(),
    )
    load_seconds = time.monotonic() - started
    ctx.log.info("asr model loaded", backend="whisperx", model=source, device=device, compute_type=compute_type,
                 seconds=round(load_seconds, 2))
    return AsrModel("whisperx", pipeline, source, device, compute_type, batch_size, load_seconds)


def describe_model(resources: AsrModel | None) -> str | None:
    if resources is None:
        return None
    if resources.backend == "mlx":
        from services.asr import mlx_backend

        return mlx_backend.describe(resources.engine)
    return f"{resources.source} ({resources.compute_type}, {resources.device})"


def requested_language(request: StageRequest, model: AsrModel) -> str | None:
    # `source_language` is what the coordinator passes every stage (the job's -s option).
    language = request.params.get("language") or request.params.get("source_language")
    if language in (None, "", "auto"):
        return None
    language = str(language).strip().lower()
    supported = model.supported_languages()
    if language not in supported:
        if supported == ["en"]:
            raise BadInput(f"language {language!r}: the loaded model ({Path(model.source).name}) is English-only")
        raise BadInput(
            f"language {language!r} is not a Whisper language code; use one such as en, hi, ta, bn, "
            f"or leave it unset to detect"
        )
    return language


def check_model(request: StageRequest, model: AsrModel) -> None:
    wanted = request.params.get("model")
    if wanted and str(wanted) not in model.names():
        raise BadInput(f"this asr service has {model.source} loaded, not {wanted!r}; send the job to a service with that model")


def detect_language(model: AsrModel, audio: np.ndarray) -> tuple[str, float]:
    """Detect on the first 30 s of *speech* (faster-whisper's bundled Silero ONNX VAD), not the
    first 30 s of the file, which in films is often music or silence. The VAD only looks at
    the first DETECT_WINDOW_S so a feature film does not pay for a VAD pass over all of it."""
    window = audio[: int(DETECT_WINDOW_S * SAMPLE_RATE)]
    language, probability, _ = model.whisper.detect_language(audio=window, vad_filter=True)
    return language, float(probability)


# ---------------------------------------------------------------- speech regions (vad stage)

def read_regions(request: StageRequest, ctx: StageContext, duration: float) -> Regions | None:
    """The `regions` input as sorted, non-overlapping (start, end) seconds inside the audio, or
    None when the job has no vad stage (the transcribe workflow)."""
    if "regions" not in request.inputs:
        return None
    try:
        parsed = SpeechRegions.model_validate_json(ctx.input_path("regions").read_bytes())
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "document"
        raise BadInput(f"speech regions input is not valid SpeechRegions JSON from the vad stage ({where}: {first['msg']})")
    if abs(parsed.duration - duration) > REGION_DURATION_TOLERANCE_S + 0.01 * duration:
        raise BadInput(
            f"speech regions were found in {parsed.duration:.1f} s of audio but this audio is {duration:.1f} s long; "
            f"they belong to another file"
        )
    return merge_regions([(r.start, r.end) for r in parsed.regions], duration)


def merge_regions(regions: Regions, duration: float, margin: float = 0.0) -> Regions:
    """Sorted, widened by `margin`, clipped to [0, duration], overlaps merged, empties dropped."""
    merged: Regions = []
    for start, end in sorted(regions):
        if end <= start:
            continue  # an empty region holds no speech, however wide the margin
        start, end = max(0.0, start - margin), min(duration, end + margin)
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def split_long_regions(regions: Regions, audio: np.ndarray, max_s: float = CHUNK_S) -> Regions:
    """Regions longer than Whisper's window cut into pieces of at most `max_s`, each cut at the
    quietest 10 ms frame of the second half of the window (what whisperx's Binarize does with
    max_duration, on VAD scores; we have the audio)."""
    frame = SAMPLE_RATE // 100
    out: Regions = []
    for start, end in regions:
        while end - start > max_s:
            first, last = int((start + max_s / 2) * SAMPLE_RATE), int((start + max_s) * SAMPLE_RATE)
            window = audio[first:last]
            usable = len(window) // frame * frame
            if usable:
                energy = np.mean(window[:usable].reshape(-1, frame) ** 2, axis=1)
                cut = start + max_s / 2 + (int(np.argmin(energy)) + 0.5) * frame / SAMPLE_RATE
            else:
                cut = start + max_s
            out.append((start, cut))
            start = cut
        out.append((start, end))
    return out


def speech_only(audio: np.ndarray, regions: Regions) -> np.ndarray:
    """A copy of the audio silent outside the regions, same length so times do not move."""
    kept = np.zeros_like(audio)
    for start, end in regions:
        a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        kept[a:b] = audio[a:b]
    return kept


def speech_sample(audio: np.ndarray, regions: Regions, seconds: float = CHUNK_S) -> np.ndarray:
    """The first `seconds` of speech, regions back to back (what language detection hears)."""
    pieces, total = [], 0
    for start, end in regions:
        piece = audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)][: int(seconds * SAMPLE_RATE) - total]
        pieces.append(piece)
        total += len(piece)
        if total >= seconds * SAMPLE_RATE:
            break
    return np.concatenate(pieces) if pieces else audio[:0]


def _given_chunks_vad(chunks: list[dict]):
    """A whisperx Vad that 'finds' exactly our chunks, so FasterWhisperPipeline.transcribe runs
    its own batched decoding (data generator -> __call__ -> generate_segment_batched) on them."""
    from whisperx.vads import Vad

    class GivenChunks(Vad):
        def __init__(self):
            super().__init__(0.5)

        def __call__(self, audio, **kwargs):
            return chunks

        @staticmethod
        def preprocess_audio(audio):
            return audio  # nothing to prepare: no VAD model runs

        @staticmethod
        def merge_chunks(segments, chunk_size, onset=None, offset=None):
            return segments  # already merged (speech_chunks)

    return GivenChunks()


def speech_chunks(regions: Regions) -> list[dict]:
    """Neighbouring regions merged into chunks of at most CHUNK_S by whisperx's own
    Vad.merge_chunks (regions must be split to CHUNK_S first); [{start, end, segments}]."""
    from collections import namedtuple

    from whisperx.vads import Vad

    if not regions:
        return []
    span = namedtuple("span", "start end speaker")
    return Vad.merge_chunks([span(a, b, None) for a, b in regions], CHUNK_S, onset=0.5, offset=None)


def decode_regions(model: AsrModel, audio: np.ndarray, regions: Regions, language: str, ctx: StageContext) -> list[dict]:
    """whisperx's batched decoding on chunks built from our regions instead of its pyannote VAD:
    the pipeline's VAD is swapped for one that returns our chunks, for this call only (callers
    hold model.lock)."""
    pipeline = model.pipeline
    original = pipeline.vad_model
    pipeline.vad_model = _given_chunks_vad(speech_chunks(regions))
    try:
        return pipeline.transcribe(
            audio,
            batch_size=model.batch_size,
            language=language,
            task="transcribe",
            chunk_size=CHUNK_S,
            progress_callback=lambda percent: ctx.progress(DECODE_SHARE * percent / 100, "transcribing speech"),
        )["segments"]
    finally:
        pipeline.vad_model = original


def time_words(model: AsrModel, chunk: np.ndarray, text: str, language: str) -> list[dict]:
    """Word start/end (seconds from the chunk start) for `text` decoded from `chunk`, by
    Whisper cross-attention alignment on the same features the decoder saw."""
    from faster_whisper.transcribe import merge_punctuations
    from whisperx.audio import HOP_LENGTH, N_SAMPLES, log_mel_spectrogram

    chunk = chunk[:N_SAMPLES]
    tokenizer = model.tokenizer(language)
    tokens = [t for t in tokenizer.encode(text) if t < tokenizer.eot]
    if not tokens or len(chunk) < HOP_LENGTH * 2:
        return []
    n_mels = model.whisper.feat_kwargs.get("feature_size") or 80
    features = log_mel_spectrogram(chunk, n_mels=n_mels, padding=N_SAMPLES - chunk.shape[0])
    encoder_output = model.whisper.encode(features.numpy() if hasattr(features, "numpy") else features)
    alignment = model.whisper.find_alignment(tokenizer, [tokens], encoder_output, len(chunk) // HOP_LENGTH)[0]
    merge_punctuations(alignment, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、")
    words = [w for w in alignment if w["word"].strip()]
    _trim_to_sound(words, chunk)
    return words


def _trim_to_sound(words: list[dict], chunk: np.ndarray) -> None:
    """Cross-attention alignment tends to stretch a word over the silence next to it (the
    first word of a chunk back to the VAD chunk start, the last one past the speech). Words
    do not start or end in silence: move the first word's start, the last word's end, and
    the edges of implausibly long words (over twice the median word length, as
    faster-whisper judges it) to the nearest 10 ms frame with sound in it."""
    frame = SAMPLE_RATE // 100
    usable = len(chunk) // frame * frame
    if not words or usable == 0:
        return
    rms = np.sqrt(np.mean(chunk[:usable].reshape(-1, frame) ** 2, axis=1))
    loudness_db = 20 * np.log10(rms + 1e-9)
    # "Sound" relative to this chunk's loud frames, so a film's noise floor counts as silence.
    has_sound = loudness_db >= np.percentile(loudness_db, 95) - 30
    durations = [w["end"] - w["start"] for w in words if w["end"] > w["start"]]
    longest_plausible = 2 * min(0.7, float(np.median(durations))) if durations else 1.4
    shortest = 0.1
    for i, word in enumerate(words):
        stretched = word["end"] - word["start"] > longest_plausible
        first_frame, last_frame = int(word["start"] * 100), min(int(word["end"] * 100), len(has_sound))
        sounding = np.flatnonzero(has_sound[first_frame:last_frame]) + first_frame
        if len(sounding) == 0:
            continue
        if i == 0 or stretched:
            word["start"] = min(float(sounding[0]) / 100, word["end"] - shortest)
        if i == len(words) - 1 or stretched:
            word["end"] = max(float(sounding[-1] + 1) / 100, word["start"] + shortest)


def split_into_segments(words: list[Word], fallback: Segment) -> list[Segment]:
    """One whisperx chunk (up to 30 s) -> segments at sentence ends and long pauses, so
    segments are units a reader (and the subtitle rules) can work with."""
    if not words:
        return [fallback]
    segments: list[Segment] = []
    current: list[Word] = []
    for i, word in enumerate(words):
        current.append(word)
        following = words[i + 1] if i + 1 < len(words) else None
        pause = following.start - word.end if following else 0.0
        if following is None or word.text.rstrip().endswith(SENTENCE_END) or pause >= SEGMENT_BREAK_PAUSE_S:
            segments.append(
                Segment(start=current[0].start, end=current[-1].end, text=" ".join(w.text for w in current), words=current)
            )
            current = []
    return segments


def timed_segments(model: AsrModel, audio: np.ndarray, chunk: dict, language: str) -> list[Segment]:
    """One whisperx chunk ({start, end, text}) -> transcript segments with word times."""
    start, end = float(chunk["start"]), float(chunk["end"])
    if not chunk["text"].strip():
        return []
    timed = time_words(model, audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)], chunk["text"], language)
    words = [
        Word(
            text=w["word"].strip(),
            start=round(min(start + float(w["start"]), end), 3),
            end=round(min(start + float(w["end"]), end), 3),
            score=round(float(w["probability"]), 3),
        )
        for w in timed
    ]
    return split_into_segments(words, fallback=Segment(start=start, end=end, text=chunk["text"].strip()))


def transcribe_whisperx(
    model: AsrModel, audio: np.ndarray, language: str | None, regions: Regions | None, ctx: StageContext
) -> tuple[str, float | None, list[Segment]]:
    """whisperx: detect the language if not given, decode speech chunks in batches (ours from
    `regions`, else whisperx's pyannote VAD), time words per chunk."""
    language_probability = None
    if len(audio) < MIN_AUDIO_SAMPLES or regions == []:
        return language or "en", None, []  # pyannote rejects an empty waveform; nothing to hear
    if regions is not None:
        regions = split_long_regions(merge_regions(regions, len(audio) / SAMPLE_RATE, REGION_MARGIN_S), audio)
        audio = speech_only(audio, regions)
    if language is None:
        if regions is not None:
            language, language_probability, _ = model.whisper.detect_language(audio=speech_sample(audio, regions))
            language_probability = float(language_probability)
        else:
            language, language_probability = detect_language(model, audio)
        ctx.log.info("language detected", language=language, probability=round(language_probability, 3))
    ctx.progress(0.02, f"language {language}")
    if regions is not None:
        chunks = decode_regions(model, audio, regions, language, ctx)
    else:
        chunks = model.pipeline.transcribe(
            audio,
            batch_size=model.batch_size,
            language=language,
            task="transcribe",
            progress_callback=lambda percent: ctx.progress(DECODE_SHARE * percent / 100, "transcribing speech"),
        )["segments"]
    segments: list[Segment] = []
    for n, chunk in enumerate(chunks):
        segments.extend(timed_segments(model, audio, chunk, language))
        ctx.progress(DECODE_SHARE + (1 - DECODE_SHARE) * (n + 1) / len(chunks), f"segment {n + 1}/{len(chunks)}")
    return language, language_probability, segments


def transcribe_mlx(
    model: AsrModel, audio: np.ndarray, language: str | None, regions: Regions | None, ctx: StageContext
) -> tuple[str, float | None, list[Segment]]:
    """mlx-whisper via services/asr/mlx_backend.py: transcribe(model, audio, language, regions,
    progress) -> (language, language_probability, segments). audio: float32 16 kHz mono (silent
    outside the regions when there are any); language: code or None to detect; regions: sorted
    (start, end) seconds or None for the whole audio; progress(fraction 0..1, message)."""
    from services.asr import mlx_backend

    if regions == []:
        return language or "en", None, []
    if regions is not None:
        regions = merge_regions(regions, len(audio) / SAMPLE_RATE, REGION_MARGIN_S)
        audio = speech_only(audio, regions)

    def progress(fraction: float, message: str = "transcribing speech") -> None:
        ctx.progress(min(1.0, max(0.0, 0.02 + 0.96 * float(fraction))), message)

    language, probability, segments = mlx_backend.transcribe(model.engine, audio, language, regions, progress)
    segments = [s if isinstance(s, Segment) else Segment.model_validate(s) for s in segments]
    return language, (None if probability is None else float(probability)), segments


def drop_hallucinations(segments: list[Segment], regions: Regions | None, duration: float, ctx: StageContext) -> list[Segment]:
    """services/asr/hallucination.py on the decoded segments; every drop logged and counted,
    one warning per request when anything went."""
    cleaned, report = hallucination.clean_segments(segments, regions, duration)
    for dropped in report.dropped:
        ctx.log.info("hallucination dropped", reason=dropped.reason, start=dropped.start, end=dropped.end, text=dropped.text)
    ctx.metrics.update(report.metrics())
    if report.anything_dropped:
        ctx.warn(f"dropped likely hallucinated text: {report.summary()}")
    return cleaned


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    model: AsrModel = ctx.resources
    check_model(request, model)
    language = requested_language(request, model)
    audio = read_wav(ctx.input_path("audio"))
    duration = len(audio) / SAMPLE_RATE
    regions = read_regions(request, ctx, duration)
    started = time.monotonic()

    with model.lock:  # the pipeline keeps per-call state (its tokenizer, our swapped VAD)
        transcribe = transcribe_mlx if model.backend == "mlx" else transcribe_whisperx
        language, language_probability, segments = transcribe(model, audio, language, regions, ctx)
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
    name="asr",
    handle=handle,
    setup=setup,
    # whichever backend this env lacks is reported as "missing"
    report_packages=("whisperx", "faster-whisper", "ctranslate2", "torch", "mlx-whisper", "mlx"),
    describe_model=describe_model,
)
