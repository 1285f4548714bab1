"""The asr stage's whisperx backend: faster-whisper / CTranslate2 batched decoding through
whisperx's FasterWhisperPipeline (the `whisperx` env). captionbus/services/asr/stage.py calls the same four
functions as of captionbus/services/asr/mlx_backend.py: load, describe, supported_languages, transcribe;
whisperx, faster-whisper and torch are imported inside them, so nothing heavy loads until the
asr process's setup().

Where word times come from. whisperx's FasterWhisperPipeline decodes each VAD speech chunk
(up to 30 s) in batches with `without_timestamps=True` and returns one text per chunk, no word
times: whisperx gets those from its separate wav2vec2 alignment step, which here is the
`alignment` stage of the translate/subtitle workflows (captionbus/services/alignment). Running faster-whisper's own
`transcribe(word_timestamps=True)` on the same chunks was measured worse on the test clip
(WER 0.21 vs 0.0: it pads the mel spectrogram instead of the audio and decodes with
timestamp tokens). So we keep whisperx's text and time its words with Whisper's cross-attention
alignment (faster-whisper's `find_alignment`, i.e. CTranslate2 `Whisper.align`, the mechanism
behind faster-whisper's word timestamps) on the very chunk and features the text was decoded
from. On the CPU the alignment reads the encoder output the decode itself made
(reused_encoder_alignment); elsewhere, or when that output is not at hand, time_words encodes
the chunk again: one extra encoder pass per chunk, same model, same process. These times are
what the transcribe workflow uses, and what alignment falls back to for a language without an
aligner.

Decoder statistics. Each segment carries the decoder's own numbers for the chunk it was decoded
from, as faster-whisper's `WhisperModel.transcribe` reports them per 30 s window: `avg_logprob`
(the beam's cumulative log probability over length+1, faster-whisper's formula), `no_speech_prob`
(CTranslate2's probability of the no-speech token at the first step), `compression_ratio`
(faster-whisper's `get_compression_ratio` of the chunk's decoded text) and `tokens` (the decoded
text token ids, split between a chunk's segments at their words). whisperx's pipeline keeps only
the text (3.8.6 adds avg_logprob), so for the length of one transcribe call the pipeline's
CTranslate2 model is wrapped in `_RecordingWhisper`, which asks `generate` for the same decode plus
`return_no_speech_prob=True` (a report of the first step's logits, as faster-whisper's own
batched pipeline asks for it; the search is unchanged) and keeps each result in chunk order. The
words and times are the ones decoded before this (checked on the espeak clip: identical text,
words and times with and without the wrapper). The mlx backend passes mlx-whisper's own
per-segment values through; a backend that reports none leaves them None.

With speech regions (the vad stage) only they are decoded: they are cut to Whisper's window at
their quietest frame and handed to the pipeline in place of its own pyannote VAD (for that call
only). Without regions whisperx's pyannote VAD finds the speech.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from captionbus.contracts.transcript import Segment, Word
from captionbus.services.asr.hallucination import DecodedWord
from captionbus.services.audio import WHISPER_WINDOW_S, sample_index

SAMPLE_RATE = 16000
SENTENCE_END = (".", "?", "!", "。", "？", "！", "।")
# A pause this long between two words starts a new transcript segment even mid-sentence.
SEGMENT_BREAK_PAUSE_S = 1.5
# Share of the progress bar given to decoding; word timing takes the rest.
DECODE_SHARE = 0.8
# Language detection looks for speech in this much audio from the start.
DETECT_WINDOW_S = 600
# With speech regions the language is heard in the first decode window, whose encoder output the
# decode then reuses (detect_on_regions); a window less sure than this of its language is checked
# against the first 30 s of speech back to back (speech_sample), as before, and that answer holds.
FIRST_WINDOW_CONFIDENCE = 0.9
# stage.py: this backend detects inside transcribe() on the decode's own first window, so a request
# that must detect lets transcribe() do it instead of detecting first (no second encoder pass).
DETECTS_ON_FIRST_WINDOW = True
MIN_AUDIO_SAMPLES = SAMPLE_RATE // 10
# Whisper's window: whisperx decodes speech chunks of at most this length (the chunk stage
# replicates the grouping: captionbus/services/audio.WHISPER_WINDOW_S).
CHUNK_S = int(WHISPER_WINDOW_S)

Regions = list[tuple[float, float]]


@dataclass
class WhisperX:
    """What load() returns and every transcribe() call reuses (callers serialise the calls on
    one WhisperX; decoders() makes more of them over the same loaded model)."""

    pipeline: Any  # whisperx's FasterWhisperPipeline
    source: str
    device: str
    compute_type: str
    batch_size: int
    load_seconds: float
    tokenizers: dict[tuple[str, str], Any] = field(default_factory=dict)
    # Word times from the decode's own encoder output (CPU only; see reused_encoder_alignment).
    # False: a second encoder pass per chunk (benchmarks/asr_word_timing.py measures both).
    reuse_encoder: bool = True

    @property
    def whisper(self):
        """The faster-whisper WhisperModel inside the pipeline (whisperx subclasses it)."""
        return self.pipeline.model

    def tokenizer(self, language: str, task: str = "transcribe"):
        if (language, task) not in self.tokenizers:
            from faster_whisper.tokenizer import Tokenizer

            self.tokenizers[(language, task)] = Tokenizer(
                self.whisper.hf_tokenizer, self.whisper.model.is_multilingual, task=task, language=language
            )
        return self.tokenizers[(language, task)]


def load(source: str, log, *, device: str, compute_type: str, threads: int, batch_size: int,
         workers: int = 1) -> WhisperX:
    """Load the CTranslate2 Whisper model (a local folder or Hugging Face id) into a pipeline,
    with `workers` CTranslate2 workers of `threads` threads each (decoders() hands them out).

    whisperx.load_model builds faster-whisper's WhisperModel with one worker and no way to ask
    for more, so the WhisperModel is built here (the same arguments load_model gives it, plus
    num_workers, CTranslate2's inter_threads) and handed to load_model, which builds the rest of
    the pipeline around it as before."""
    import torch
    import whisperx  # heavy (torch, pyannote): only in the asr process, only here
    from whisperx.asr import WhisperModel

    torch.set_num_threads(threads * workers)  # pyannote VAD runs in torch, one call at a time (decoders)
    started = time.monotonic()
    local = Path(source).is_dir()
    whisper = WhisperModel(source, device=device, compute_type=compute_type, cpu_threads=threads,
                           num_workers=workers, local_files_only=local)
    pipeline = whisperx.load_model(
        source,
        device=device,
        compute_type=compute_type,
        language=None,  # per request: given or detected
        vad_method="pyannote",  # its weights ship in the wheel; "silero" needs torch.hub (online)
        threads=threads,
        model=whisper,
        local_files_only=local,
    )
    load_seconds = time.monotonic() - started
    log.info("asr model loaded", backend="whisperx", model=source, device=device, compute_type=compute_type,
             threads=threads, workers=workers, seconds=round(load_seconds, 2))
    return WhisperX(pipeline, source, device, compute_type, batch_size, load_seconds)


def decoders(model: WhisperX, count: int) -> list[WhisperX]:
    """`count` WhisperX over the one model load() made (with `workers` = count), each for one
    transcribe() call at a time, so `count` requests decode at once in one process.

    Why one process and not `count`: `run --replicas 2` started two asr processes, each importing
    torch and loading Whisper, and on 2 cores the second load ran after the first (two at once
    fought for the cores, captionbus/services/runtime/setup_turn.py), so the second replica took
    its first chunk of a 10.6-minute film late (README, "One film across the fleet"). Here the
    model loads once and every decoder can start the moment it has.

    What is shared: the CTranslate2 model (its workers share the weights on one device: the
    CTranslate2 docs, "parallel.md"; each call from a Python thread runs on a free worker, the
    GIL released), the tokenizers and the feature extractor (read only), and the pyannote VAD
    (used only without speech regions; one call at a time, behind a lock). What is each
    decoder's own: a shallow copy of the pipeline and of its WhisperModel, because a
    transcribe() call swaps attributes on them for its length (recording_decoder: the
    WhisperModel's `model`, the pipeline's `preprocess`; decode_regions: its `vad_model`;
    whisperx itself: its `tokenizer` and `options`), and its own tokenizer cache."""
    if count <= 1:
        return [model]
    vad = _one_call_at_a_time(model.pipeline.vad_model, threading.Lock())
    out = []
    for _ in range(count):
        pipeline = copy.copy(model.pipeline)
        pipeline.model = copy.copy(model.pipeline.model)
        pipeline.vad_model = vad
        out.append(dataclasses.replace(model, pipeline=pipeline, tokenizers={}))
    return out


def _one_call_at_a_time(vad, lock: threading.Lock):
    """The pipeline's VAD model, called by one decoder at a time; still a whisperx Vad with the
    wrapped one's preprocess_audio and merge_chunks (FasterWhisperPipeline.transcribe reads them
    from a Vad)."""
    from whisperx.vads import Vad

    class OneAtATime(Vad):
        preprocess_audio = staticmethod(type(vad).preprocess_audio)
        merge_chunks = staticmethod(type(vad).merge_chunks)

        def __init__(self) -> None:  # noqa: D107  no Vad state of its own: the wrapped model's
            pass

        def __call__(self, *args, **kwargs):
            with lock:
                return vad(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(vad, name)

    return OneAtATime()


Align = Callable[[int, Any, int, list[int]], "list[dict] | None"]


class _RecordingWhisper:
    """The pipeline's CTranslate2 Whisper model with `generate` also asking for the no-speech
    probability and keeping, per decoded chunk in order: tokens (text tokens only),
    avg_logprob, no_speech_prob, and with `align` the chunk's word alignment (`alignment`; None
    where `align` has none) from the encoder output `generate` was given. Everything else is the
    wrapped model's."""

    def __init__(self, inner, length_penalty: float, eot: int, align: Align | None = None):
        self._inner, self._length_penalty, self._eot, self._align = inner, length_penalty, eot, align
        self.decoded: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def generate(self, encoder_output, *args, **kwargs):
        results = self._inner.generate(encoder_output, *args, **{**kwargs, "return_no_speech_prob": True})
        for row, result in enumerate(results):
            ids = list(result.sequences_ids[0])
            cumulative = result.scores[0] * (len(ids) ** self._length_penalty)
            tokens = [int(t) for t in ids if t < self._eot]
            entry = {"tokens": tokens, "avg_logprob": float(cumulative / (len(ids) + 1)),
                     "no_speech_prob": float(result.no_speech_prob)}
            if self._align is not None:
                entry["alignment"] = self._align(len(self.decoded), encoder_output, row, tokens)
            self.decoded.append(entry)
        return results


@contextmanager
def recording_decoder(model: WhisperX, language: str, task: str):
    """For one pipeline.transcribe call (callers serialise calls): the decoder's per-chunk
    statistics, in the order the pipeline returns its chunks, and on the CPU (unless
    model.reuse_encoder is off) each chunk's word alignment from the decode's encoder output.
    For that the pipeline's `preprocess` (one chunk's samples -> mel features, called in chunk
    order before the batch is decoded) also notes each chunk's length in samples."""
    whisper, pipeline = model.whisper, model.pipeline
    eot = model.tokenizer(language, task).eot
    samples: list[int] = []
    align = reused_encoder_alignment(model, language, task, samples) \
        if model.reuse_encoder and model.device == "cpu" else None
    recorder = _RecordingWhisper(whisper.model, pipeline.options.length_penalty, eot, align)
    whisper.model = recorder
    own = vars(pipeline).get("preprocess")  # an instance attribute of its own (none in whisperx 3.8.6)
    if align is not None:
        prepare = pipeline.preprocess

        def preprocess(inputs, **kwargs):
            samples.append(len(inputs["inputs"]))
            return prepare(inputs, **kwargs)

        pipeline.preprocess = preprocess
    try:
        yield recorder.decoded
    finally:
        whisper.model = recorder._inner
        if own is None:
            vars(pipeline).pop("preprocess", None)
        else:
            pipeline.preprocess = own


def reused_encoder_alignment(model: WhisperX, language: str, task: str, samples: list[int]) -> Align:
    """align(n, encoder_output, row, tokens): the word alignment of decoded chunk n (row `row`
    of the batch's encoder output, `samples[n]` samples long) from the encoder output its decode
    used, instead of time_words encoding the chunk again; None where time_words answers without
    one (no tokens, under two frames) or the chunk's length was not noted.

    Why: on the CPU the encoder is most of asr's time. benchmarks/asr_word_timing.py measured the
    stage at 1.26x a bare whisperx loop's wall with the second encoder pass per window and 0.91x
    without it; on eSpeak clips of 41-59 s (2 windows each, Whisper base int8) the encoder took
    20.0-25.2 s of a 27.7-37.2 s transcribe, in 5 passes per clip (language detection, 2 windows
    decoded, the same 2 windows encoded again for word times). The features are the same either
    way (the chunk's samples padded to 30 s), and a chunk's encoder output does not depend on the
    batch it is in (Whisper base int8, 4 windows of a film: identical, max difference 0.0, alone
    and in a batch of 4). What must hold is that a chunk decoded from a film and from one of its
    chunks (the chunked workflow) starts at the same sample: speech_chunks cuts at whole samples
    (audio.sample_index), as the stage silences outside the regions. CPU only: the batch is read
    back as a numpy array; on CUDA the output stays on the GPU and encoding again costs little."""
    from ctranslate2 import StorageView
    from whisperx.audio import HOP_LENGTH, N_SAMPLES

    tokenizer = model.tokenizer(language, task)

    failed: list[str] = []

    def align(n: int, encoder_output, row: int, tokens: list[int]) -> list[dict] | None:
        if failed or n >= len(samples) or not tokens or samples[n] < HOP_LENGTH * 2:
            return None
        try:
            batch = np.asarray(encoder_output)  # (chunks, 1500, d_model), a view of the CPU storage
            one = StorageView.from_array(np.ascontiguousarray(batch[row : row + 1]))
            return model.whisper.find_alignment(tokenizer, [tokens], one, min(samples[n], N_SAMPLES) // HOP_LENGTH)[0]
        except Exception as e:  # noqa: BLE001  e.g. a compute type numpy cannot view: encode again instead
            failed.append(f"{type(e).__name__}: {e}")
            logging.getLogger("captionbus.asr").warning(
                "word times from the decode's encoder output failed (%s); encoding each window again", failed[0])
            return None

    return align


def describe(model: WhisperX) -> str:
    return f"{model.source} ({model.compute_type}, {model.device})"


def supported_languages(model: WhisperX) -> list[str]:
    return list(model.whisper.supported_languages)


def transcribe(
    model: WhisperX,
    audio: np.ndarray,
    language: str | None,
    regions: Regions | None,
    progress: Callable[[float, str], None],
    task: str = "transcribe",
) -> tuple[str, float | None, list[Segment]]:
    """(language, its probability when detected else None, segments with word times in seconds
    from the start of `audio`): detect the language if not given, decode speech chunks in
    batches (ours from `regions`, else whisperx's pyannote VAD), time words per chunk.
    `audio` is silent outside `regions` when there are any. task translate: decoded into
    English (Whisper's translate task); word times then come from the same cross-attention
    alignment of the English tokens, so they are approximate (OpenAI gives none for translations)."""
    language_probability = None
    if len(audio) < MIN_AUDIO_SAMPLES or regions == []:
        return language or "en", None, []  # pyannote rejects an empty waveform; nothing to hear
    if regions is not None:
        regions = split_long_regions(regions, audio)
    first = None
    if language is None:
        if regions is not None:
            language, language_probability, first = detect_on_regions(model, audio, regions)
        else:
            language, language_probability = detect_language(model, audio)
    progress(0.02, f"language {language}")
    with recording_decoder(model, language, task) as decoded, first_window_reused(model, first):
        if regions is not None:
            chunks = decode_regions(model, audio, regions, language, progress, task)
        else:
            chunks = model.pipeline.transcribe(
                audio,
                batch_size=model.batch_size,
                language=language,
                task=task,
                progress_callback=lambda percent: progress(DECODE_SHARE * percent / 100, "transcribing speech"),
            )["segments"]
    if len(decoded) != len(chunks):  # a whisperx that decodes otherwise: no statistics, never wrong ones
        decoded = [None] * len(chunks)
    segments: list[Segment] = []
    for n, (chunk, stats) in enumerate(zip(chunks, decoded)):
        segments.extend(timed_segments(model, audio, chunk, language, task, stats))
        progress(DECODE_SHARE + (1 - DECODE_SHARE) * (n + 1) / len(chunks), f"segment {n + 1}/{len(chunks)}")
    return language, language_probability, segments


def detect(model: WhisperX, audio: np.ndarray, regions: Regions | None) -> tuple[str, float]:
    """(language, probability) heard, with `regions`, as transcribe() hears it (detect_on_regions:
    the first decode window; `audio` and `regions` as transcribe() gets them), else in the first
    30 s of speech faster-whisper's VAD finds (detect_language)."""
    if regions:
        language, probability, _ = detect_on_regions(model, audio, split_long_regions(regions, audio))
        return language, probability
    return detect_language(model, audio)


@dataclass
class FirstWindow:
    """The first decode window's features (what the pipeline's preprocess makes of its samples)
    and their encoder output, kept so that the decode does not encode the window again."""

    features: Any  # torch tensor (n_mels, 3000)
    encoder_output: Any  # ctranslate2 StorageView (1, 1500, d_model)


def detect_on_regions(model: WhisperX, audio: np.ndarray, regions: Regions) -> tuple[str, float, FirstWindow | None]:
    """(language, probability, the first window encoded) heard in the first decode window, the
    window transcribe() decodes first (speech_chunks of `regions`, split to Whisper's window);
    when it is less sure than FIRST_WINDOW_CONFIDENCE, in the first 30 s of speech back to back
    (speech_sample) instead. The first window is returned either way, for first_window_reused.

    Why: on the CPU the encoder is most of asr's time, and detecting on a sample of its own cost
    a clip one encoder pass of three (a 20-60 s clip decodes in 1-2 windows): bare whisperx pays
    that pass too (FasterWhisperPipeline.detect_language encodes the first 30 s of the file).
    Whisper itself detects on the window it decodes (faster-whisper's sequential transcribe).
    The decoded words only depend on the language, and a window sure of it at 0.9 is not
    overruled by 30 s of speech that holds its own speech; below that the old answer stands. A
    film and its chunks (the chunked workflow) decode the same first window at the same samples,
    so the `language` request of a job of several chunks hears what the unchunked decode hears."""
    first = encode_first_window(model, audio, regions)
    if first is not None:
        found = model.whisper.model.detect_language(first.encoder_output)[0]  # [(token, probability)], best first
        language, probability = found[0][0][2:-2], float(found[0][1])
        if probability >= FIRST_WINDOW_CONFIDENCE:
            return language, probability, first
    language, probability, _ = model.whisper.detect_language(audio=speech_sample(audio, regions))
    return language, float(probability), first


def encode_first_window(model: WhisperX, audio: np.ndarray, regions: Regions) -> FirstWindow | None:
    """The first decode window cut where the pipeline cuts it (_handed_over), made into features
    as its preprocess makes them, and encoded; None without one."""
    from whisperx.audio import N_SAMPLES, log_mel_spectrogram

    windows = _handed_over(speech_chunks(regions))
    if not windows:
        return None
    piece = audio[int(windows[0]["start"] * SAMPLE_RATE) : int(windows[0]["end"] * SAMPLE_RATE)]
    if len(piece) < MIN_AUDIO_SAMPLES:
        return None
    n_mels = model.whisper.feat_kwargs.get("feature_size") or 80
    features = log_mel_spectrogram(piece, n_mels=n_mels, padding=N_SAMPLES - piece.shape[0])
    return FirstWindow(features, model.whisper.encode(features))


@contextmanager
def first_window_reused(model: WhisperX, first: FirstWindow | None):
    """For one pipeline.transcribe call (callers serialise calls), on the CPU: the batch whose first
    row is exactly `first`'s features gets `first`'s encoder output for that row and encodes only
    the others. A window's encoder output does not depend on its batch (reused_encoder_alignment:
    Whisper base int8, identical alone and in a batch of 4), so the decode is the one it was.
    Anything else (no match, another device) is encoded as before."""
    whisper = model.whisper
    if first is None or model.device != "cpu":
        yield
        return
    import torch
    from ctranslate2 import StorageView

    encode, own = whisper.encode, vars(whisper).get("encode")
    pending = [first]

    def reusing(features):
        batch = torch.as_tensor(features)
        if not pending or batch.dim() != 3 or not torch.equal(batch[0], first.features):
            return encode(features)
        pending.clear()
        if batch.shape[0] == 1:
            return first.encoder_output
        rest = np.asarray(encode(batch[1:]))
        return StorageView.from_array(np.ascontiguousarray(np.concatenate([np.asarray(first.encoder_output), rest])))

    whisper.encode = reusing
    try:
        yield
    finally:
        if own is None:
            vars(whisper).pop("encode", None)
        else:
            whisper.encode = own


# ---------------------------------------------------------------- helpers


def detect_language(model: WhisperX, audio: np.ndarray) -> tuple[str, float]:
    """Detect on the first 30 s of *speech* (faster-whisper's bundled Silero ONNX VAD), not the
    first 30 s of the file, which in films is often music or silence. The VAD only looks at
    the first DETECT_WINDOW_S so a feature film does not pay for a VAD pass over all of it."""
    window = audio[: int(DETECT_WINDOW_S * SAMPLE_RATE)]
    language, probability, _ = model.whisper.detect_language(audio=window, vad_filter=True)
    return language, float(probability)


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
    its own batched decoding (data generator -> __call__ -> generate_segment_batched) on them.
    Its bounds are handed over half a sample late: the pipeline cuts at int(t * 16000), which
    for a whole sample's time t (n / 16000) truncates to n - 1 about once in ten."""
    from whisperx.vads import Vad

    given = _handed_over(chunks)

    class GivenChunks(Vad):
        def __init__(self):
            super().__init__(0.5)

        def __call__(self, audio, **kwargs):
            return given

        @staticmethod
        def preprocess_audio(audio):
            return audio  # nothing to prepare: no VAD model runs

        @staticmethod
        def merge_chunks(segments, chunk_size, onset=None, offset=None):
            return segments  # already merged (speech_chunks)

    return GivenChunks()


def _handed_over(chunks: list[dict]) -> list[dict]:
    """The chunks' bounds as _given_chunks_vad hands them to the pipeline: half a sample late."""
    return [{**c, "start": (sample_index(c["start"]) + 0.5) / SAMPLE_RATE,
             "end": (sample_index(c["end"]) + 0.5) / SAMPLE_RATE} for c in chunks]


def speech_chunks(regions: Regions) -> list[dict]:
    """Neighbouring regions merged into chunks of at most CHUNK_S by whisperx's own
    Vad.merge_chunks (regions must be split to CHUNK_S first); [{start, end, segments}], start
    and end at whole samples (audio.sample_index), so a film and a chunk of it cut the same
    window at the same samples."""
    from collections import namedtuple

    from whisperx.vads import Vad

    if not regions:
        return []
    span = namedtuple("span", "start end speaker")
    merged = Vad.merge_chunks([span(a, b, None) for a, b in regions], CHUNK_S, onset=0.5, offset=None)
    return [{**c, "start": sample_index(c["start"]) / SAMPLE_RATE, "end": sample_index(c["end"]) / SAMPLE_RATE}
            for c in merged]


def decode_regions(model: WhisperX, audio: np.ndarray, regions: Regions, language: str,
                   progress: Callable[[float, str], None], task: str = "transcribe") -> list[dict]:
    """whisperx's batched decoding on chunks built from our regions instead of its pyannote VAD:
    the pipeline's VAD is swapped for one that returns our chunks, for this call only (callers
    serialise calls). Each chunk comes back with its exact bounds (the pipeline rounds them to
    the millisecond)."""
    pipeline = model.pipeline
    original = pipeline.vad_model
    windows = speech_chunks(regions)
    pipeline.vad_model = _given_chunks_vad(windows)
    try:
        decoded = pipeline.transcribe(
            audio,
            batch_size=model.batch_size,
            language=language,
            task=task,
            chunk_size=CHUNK_S,
            progress_callback=lambda percent: progress(DECODE_SHARE * percent / 100, "transcribing speech"),
        )["segments"]
    finally:
        pipeline.vad_model = original
    if len(decoded) != len(windows):
        return decoded
    return [{**chunk, "start": window["start"], "end": window["end"]} for chunk, window in zip(decoded, windows)]


def time_words(model: WhisperX, chunk: np.ndarray, text: str, language: str, task: str = "transcribe",
               tokens: list[int] | None = None, alignment: list[dict] | None = None) -> list[dict]:
    """Word start/end (seconds from the chunk start) and token ids for `text` decoded from
    `chunk` (as `tokens` when the decoder's are known, else re-encoded), by Whisper
    cross-attention alignment on the same features the decoder saw: `alignment` when the decode
    made it from its own encoder output (reused_encoder_alignment), else the chunk encoded again."""
    from faster_whisper.transcribe import merge_punctuations
    from whisperx.audio import HOP_LENGTH, N_SAMPLES, log_mel_spectrogram

    chunk = chunk[:N_SAMPLES]
    tokenizer = model.tokenizer(language, task)
    tokens = tokens or [t for t in tokenizer.encode(text) if t < tokenizer.eot]
    if not tokens or len(chunk) < HOP_LENGTH * 2:
        return []
    if alignment is None:
        n_mels = model.whisper.feat_kwargs.get("feature_size") or 80
        features = log_mel_spectrogram(chunk, n_mels=n_mels, padding=N_SAMPLES - chunk.shape[0])
        encoder_output = model.whisper.encode(features.numpy() if hasattr(features, "numpy") else features)
        alignment = model.whisper.find_alignment(tokenizer, [tokens], encoder_output, len(chunk) // HOP_LENGTH)[0]
    merge_punctuations(alignment, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、")
    words, blank = [], []
    for w in alignment:  # a blank word's tokens go to the next word, so words' tokens add up to all
        if w["word"].strip():
            words.append({**w, "tokens": blank + list(w["tokens"])})
            blank = []
        else:
            blank += list(w["tokens"])
    if words and blank:
        words[-1]["tokens"] = words[-1]["tokens"] + blank
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


def timed_segments(model: WhisperX, audio: np.ndarray, chunk: dict, language: str,
                   task: str = "transcribe", decoded: dict | None = None) -> list[Segment]:
    """One whisperx chunk ({start, end, text}) -> transcript segments with word times, and with
    the chunk's decoder statistics (`decoded`, from recording_decoder) when known: every segment
    of the chunk shares its avg_logprob, no_speech_prob and compression_ratio, as faster-whisper's
    segments of one window do; tokens are split between them at their words."""
    start, end = float(chunk["start"]), float(chunk["end"])
    if not chunk["text"].strip():
        return []
    tokens = decoded["tokens"] if decoded else None
    alignment = decoded.get("alignment") if decoded else None
    timed = time_words(model, audio[sample_index(start) : sample_index(end)], chunk["text"], language, task,
                       tokens, alignment)
    words = [
        DecodedWord(  # with its tokens, so the hallucination cleaner can keep a segment's consistent
            text=w["word"].strip(),
            start=round(min(start + float(w["start"]), end), 3),
            end=round(min(start + float(w["end"]), end), 3),
            score=round(float(w["probability"]), 3),
            tokens=[int(t) for t in w["tokens"]],
        )
        for w in timed
    ]
    segments = split_into_segments(words, fallback=Segment(start=start, end=end, text=chunk["text"].strip()))
    return with_decoder_stats(segments, chunk["text"], decoded)


def with_decoder_stats(segments: list[Segment], text: str, decoded: dict | None) -> list[Segment]:
    """The chunk's segments with its decoder statistics. Each segment's tokens are its words'
    (DecodedWord.tokens, in order) when every word carries its own; else all the chunk's when the
    segment is the chunk's only one (with or without words: it holds all the chunk's text); else
    None (unknown, never another segment's tokens)."""
    if not decoded:
        return segments
    shared = {"avg_logprob": decoded["avg_logprob"], "no_speech_prob": decoded["no_speech_prob"],
              "compression_ratio": compression_ratio(text.strip())}
    out = []
    for segment in segments:
        own = [getattr(word, "tokens", None) for word in segment.words]
        if own and all(ids is not None for ids in own):
            tokens = [t for ids in own for t in ids]
        elif len(segments) == 1:
            tokens = list(decoded["tokens"])
        else:
            tokens = None
        out.append(segment.model_copy(update={**shared, "tokens": tokens}))
    return out


def compression_ratio(text: str) -> float:
    """faster-whisper's get_compression_ratio (its transcribe.py): UTF-8 length over zlib-compressed
    length, the repetition measure its temperature fallback and our hallucination filter read.
    Written out so the CPU unit tests, which have no faster-whisper, reach with_decoder_stats."""
    import zlib

    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw))
