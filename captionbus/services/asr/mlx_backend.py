"""The asr stage's MLX backend: Whisper with mlx-whisper (Apple silicon; the `mlx` env, whose
`mlx[cpu]` also runs it, slowly, on Linux). captionbus/services/asr/stage.py calls these four functions;
nothing here is imported outside the mlx env's asr process (mlx is imported inside them).

Model: a local folder in mlx-whisper's layout (config.json + weights.npz / weights.safetensors,
as the mlx-community conversions; tests/model_factory/whisper_mlx.py converts our CTranslate2
Whisper base into it) or a Hugging Face repo id (`mlx-community/whisper-base-mlx`, fetched by
huggingface_hub unless HF_HUB_OFFLINE finds it in the cache). Loaded once per process: float16
on the GPU (mlx-whisper's default), float32 on the CPU, where MLX multiplies float16 matrices
with its own slow loops but float32 ones with BLAS.

Linux CPU speed: the mlx-cpu wheel vendors the reference (netlib) BLAS, ~20x slower than a tuned
BLAS on the encoder's matrix products (measured, 1500x512x2048 sgemm: reference 0.60 s, Intel MKL
0.03 s with 2 threads, 0.045 s with one). Before mlx is first imported we load a tuned BLAS with
RTLD_GLOBAL, so MLX's cblas_sgemm / LAPACK calls resolve to it. Candidates, first that works:
1. Intel MKL's single dynamic library `libmkl_rt.so` from the `mkl` wheel (the mlx env pins it
   on Linux x86-64). It picks its kernels for the CPU it runs on, so it runs on every x86-64.
2. OpenBLAS from the cmeel-openblas wheel (pinned on every Linux; needs the system's
   libgfortran.so.5). The wheel's x86-64 build has AVX-512 kernels only: on an AMD EPYC without
   AVX-512 (December 2026) MLX's first matrix product after this preload died with SIGILL in
   `sgemm_small_kernel_b0_nn` (`vbroadcastss ... %zmm1`), whatever OPENBLAS_CORETYPE said. It is
   kept for the Linux machines MKL has no wheel for (aarch64).
Each pairing is first tried in a child interpreter (`_blas_works`, ~1 s), since a bad one dies
with SIGILL and in-process would kill the worker on every model load. When none works we log a
warning and run on the reference BLAS. The asr service option mlx_openblas=false
(CAPTIONBUS_MLX_OPENBLAS=0; the name predates MKL) turns the preload off. MKL's threads follow
the asr `threads` option (default: the usable cores).

What it buys, tests/integration/test_asr_mlx.py (Whisper base, float32, 2 cores): ~8 s per
encoder pass on the reference BLAS; the whole test took 395 s of the suite's time.

Decoding is `mlx_whisper.transcribe(word_timestamps=True)`, i.e. Whisper's own timestamp-token
decoding with word times from the alignment heads' cross-attention. With speech regions (the
vad stage) only speech is decoded: regions are grouped into stretches of at most 30 s (one
Whisper window), each stretch is cut out with the audio between its regions silenced, decoded
on its own and its times shifted back. We do not use mlx-whisper's `clip_timestamps` for this:
in 0.4.3 its loop never seeks to the start of the second and later clips, so it decodes the gaps.
Language detection (when no language is given) listens to the first 30 s of speech, regions
back to back, as the whisperx backend does; it also gives the language probability.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import subprocess
import sys
import threading
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from captionbus.contracts.transcript import Segment, Word
from captionbus.services.runtime import BadInput

SAMPLE_RATE = 16000
# Regions are decoded in groups spanning at most one Whisper window.
GROUP_MAX_S = 30.0
# Shorter audio (or speech) than this has nothing to decode.
MIN_SAMPLES = SAMPLE_RATE // 10


@dataclass
class MlxWhisper:
    """What load() returns and every transcribe() call reuses."""

    model: Any  # mlx_whisper.whisper.Whisper
    source: str  # as configured
    location: str  # what mlx-whisper's model cache is keyed by (the resolved path or the repo id)
    device: str  # "cpu" | "gpu"
    fp16: bool  # compute in float16 (GPU) or float32 (CPU)
    load_seconds: float
    blas: str | None = None  # the tuned BLAS preloaded ("mkl: /path"); None: MLX's reference BLAS
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        path = Path(self.source)
        return path.name if path.exists() else self.source


@dataclass(frozen=True)
class Blas:
    """A tuned BLAS to load before mlx: its name, its shared library, and how to set its threads
    (a C function taking one int, or None)."""

    name: str
    library: Path
    set_threads: str | None


def _blas_candidates() -> list[Blas]:
    """The tuned BLAS libraries installed in this env, in the order they are tried."""
    from importlib import metadata

    found: list[Blas] = []
    try:
        mkl = metadata.distribution("mkl")
        runtime = next((f for f in mkl.files or () if f.name.startswith("libmkl_rt.so")), None)
        if runtime is not None:
            found.append(Blas("mkl", Path(mkl.locate_file(runtime)).resolve(), "MKL_Set_Num_Threads"))
    except metadata.PackageNotFoundError:
        pass
    try:
        openblas = metadata.distribution("cmeel-openblas")
        found.append(Blas("openblas", Path(openblas.locate_file("cmeel.prefix/lib/libopenblas.so.0")),
                          "openblas_set_num_threads"))
    except metadata.PackageNotFoundError:
        pass
    return found


def _preload_blas(log, threads: int | None) -> str | None:
    """Load the first tuned BLAS that works globally before mlx (Linux only; see the module
    docstring) and set its threads. Returns what took effect ("mkl: /path"), None when nothing
    did (the reference BLAS)."""
    if not sys.platform.startswith("linux"):
        return None
    if "mlx.core" in sys.modules:  # too late: mlx already bound its BLAS symbols
        log.warning("mlx was imported before the asr backend; it keeps the reference BLAS (slow)")
        return None
    problems: dict[str, str] = {}
    for blas in _blas_candidates():
        problem = _blas_works(blas.library)
        if problem is None:
            try:
                library = ctypes.CDLL(str(blas.library), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
            except OSError as err:
                problem = str(err)
            else:
                if threads and blas.set_threads:
                    getattr(library, blas.set_threads)(ctypes.c_int(threads))
                return f"{blas.name}: {blas.library}"
        problems[blas.name] = problem
    log.warning("no tuned BLAS loaded; MLX runs on its bundled reference BLAS (slow)",
                tried=problems or "none installed (the mlx env pins mkl and cmeel-openblas on Linux)")
    return None


_PROBE = """
import ctypes, os, sys
ctypes.CDLL(sys.argv[1], mode=os.RTLD_GLOBAL | os.RTLD_NOW)
import mlx.core as mx
a = mx.ones((64, 64))
mx.eval(a @ a)
"""


def _blas_works(library: Path) -> str | None:
    """None when MLX multiplies matrices with `library` preloaded, in a child interpreter (a bad
    pairing dies with SIGILL, which must not take the worker down); else why not."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, str(library)], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        return f"probe failed: {err}"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"MLX with {library.name} dies with signal {-done.returncode} on this CPU"
    return f"probe exited {done.returncode}: {done.stderr.strip()[-300:]}"


def load(source: str, log, *, fast_blas: bool = True, threads: int | None = None) -> MlxWhisper:
    """Load the MLX Whisper model from a local folder or Hugging Face repo id (`fast_blas`: load a
    tuned BLAS before mlx on Linux, with `threads` threads (None: its default, every core); see
    the module docstring)."""
    blas = _preload_blas(log, threads) if fast_blas else None
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_whisper.load_models import load_model

    path = Path(source).expanduser()
    if path.exists():
        missing = [n for n in ("config.json",) if not (path / n).is_file()]
        if not (path / "weights.safetensors").is_file() and not (path / "weights.npz").is_file():
            missing.append("weights.safetensors or weights.npz")
        if missing:
            raise RuntimeError(f"{path} is not an MLX Whisper model folder: no {', '.join(missing)}")
        location = str(path.resolve())
    else:
        location = source  # a repo id: huggingface_hub fetches it (or finds it cached)
    device = "gpu" if mx.default_device().type == mx.gpu else "cpu"
    fp16 = device == "gpu"
    dtype = mx.float16 if fp16 else mx.float32
    started = time.monotonic()
    model = load_model(location, dtype=dtype)
    # The weights keep the file's dtype; compute in `dtype` (integers, e.g. alignment_heads, stay).
    floats = (mx.float16, mx.bfloat16, mx.float32)
    model.update(tree_map(lambda p: p.astype(dtype) if p.dtype in floats else p, model.parameters()))
    mx.eval(model.parameters())
    load_seconds = time.monotonic() - started
    log.info("mlx whisper loaded", model=source, device=device, dtype=str(dtype), blas=blas,
             seconds=round(load_seconds, 2), dims=vars(model.dims))
    return MlxWhisper(model, source, location, device, fp16, load_seconds, blas)


def describe(model: MlxWhisper) -> str:
    return f"{model.name} (mlx, {model.device})"


def supported_languages(model: MlxWhisper) -> list[str]:
    from mlx_whisper.tokenizer import LANGUAGES

    if not model.model.is_multilingual:
        return ["en"]
    return list(LANGUAGES)[: model.model.num_languages]


def transcribe(
    model: MlxWhisper,
    audio: np.ndarray,
    language: str | None,
    regions: list[tuple[float, float]] | None,
    progress: Callable[[float, str], None],
    task: str = "transcribe",
) -> tuple[str, float | None, list[Segment]]:
    """(language, its probability when detected else None, segments with word times in seconds
    from the start of `audio`), decoding only inside `regions` when they are given; task
    translate: into English (mlx-whisper's translate task)."""
    audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
    duration = len(audio) / SAMPLE_RATE
    regions = _clean_regions(regions, duration) if regions is not None else None
    speech = [(0.0, duration)] if regions is None else regions
    if language is not None and language not in supported_languages(model):
        raise BadInput(f"language {language!r} is not one the loaded model ({model.name}) knows; "
                       f"use a Whisper code such as en, hi, ta, or leave it unset to detect")
    if sum(end - start for start, end in speech) * SAMPLE_RATE < MIN_SAMPLES:
        return language or "en", None, []

    with model.lock:  # mlx-whisper keeps the model and our progress hook in module globals
        probability = None
        if language is None:
            language, probability = _detect_language(model, _speech_sample(audio, speech))
            progress(0.02, f"language {language}")
        groups = _group(speech) if regions is not None else [[(0.0, duration)]]
        total = sum(group[-1][1] - group[0][0] for group in groups)
        done = 0.0
        segments: list[Segment] = []
        for n, group in enumerate(groups):
            start, end = group[0][0], group[-1][1]
            first = int(start * SAMPLE_RATE)
            # Slice first, then silence the gaps inside this clip: never a copy of the whole film.
            clip = _silenced_outside(audio[first : int(round(end * SAMPLE_RATE))],
                                     [(a - start, b - start) for a, b in group])
            label = "transcribing speech" if len(groups) == 1 else f"transcribing speech {n + 1}/{len(groups)}"

            def report(fraction: float, _done=done, _span=end - start, _label=label) -> None:
                progress(min(1.0, 0.02 + 0.98 * (_done + fraction * _span) / total), _label)

            result = _decode(model, clip, language, report, task)
            segments.extend(_segments(result["segments"], offset=start, limit=end))
            done += end - start
            report(1.0)
    return language, probability, segments


# ---------------------------------------------------------------- helpers


def detect(model: MlxWhisper, audio: np.ndarray, regions: list[tuple[float, float]] | None) -> tuple[str, float | None]:
    """(language, probability) heard in the first 30 s of speech (of `regions` when given)."""
    audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
    duration = len(audio) / SAMPLE_RATE
    speech = _clean_regions(regions, duration) if regions else [(0.0, duration)]
    with model.lock:
        return _detect_language(model, _speech_sample(audio, speech))


def _clean_regions(regions: list[tuple[float, float]], duration: float) -> list[tuple[float, float]]:
    """Sorted, non-overlapping regions inside the audio."""
    merged: list[list[float]] = []
    for start, end in sorted((max(0.0, float(a)), min(duration, float(b))) for a, b in regions):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _group(regions: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Neighbouring regions in groups spanning at most GROUP_MAX_S (a longer region is a group
    of its own: mlx-whisper slides its window over it)."""
    groups: list[list[tuple[float, float]]] = []
    for region in regions:
        if groups and region[1] - groups[-1][0][0] <= GROUP_MAX_S:
            groups[-1].append(region)
        else:
            groups.append([region])
    return groups


def _silenced_outside(audio: np.ndarray, regions: list[tuple[float, float]]) -> np.ndarray:
    """A copy of the audio, silent outside `regions` (same length, so times do not move)."""
    kept = np.zeros_like(audio)
    for start, end in regions:
        a, b = int(start * SAMPLE_RATE), int(round(end * SAMPLE_RATE))
        kept[a:b] = audio[a:b]
    return kept


def _speech_sample(audio: np.ndarray, regions: list[tuple[float, float]], seconds: float = 30.0) -> np.ndarray:
    """The first `seconds` of speech, regions back to back."""
    parts, left = [], int(seconds * SAMPLE_RATE)
    for start, end in regions:
        part = audio[int(start * SAMPLE_RATE) : int(round(end * SAMPLE_RATE))][:left]
        parts.append(part)
        left -= len(part)
        if left <= 0:
            break
    return np.concatenate(parts) if parts else audio[:0]


def _detect_language(model: MlxWhisper, speech: np.ndarray) -> tuple[str, float | None]:
    import mlx.core as mx
    from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

    if not model.model.is_multilingual:
        return "en", None
    mel = log_mel_spectrogram(speech, n_mels=model.model.dims.n_mels, padding=N_SAMPLES)
    dtype = mx.float16 if model.fp16 else mx.float32
    _, probabilities = model.model.detect_language(pad_or_trim(mel, N_FRAMES, axis=-2).astype(dtype))
    language = max(probabilities, key=probabilities.get)
    return language, float(probabilities[language])


@contextmanager
def _progress_hook(module, report: Callable[[float], None]):
    """mlx-whisper reports decoding progress only to a tqdm bar (frames decoded of the total):
    swap its `tqdm` module for one whose bar calls `report(fraction)`, for this call only."""

    class Bar:
        def __init__(self, total=None, **_ignored):
            self.total, self.done = max(1, int(total or 1)), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.done += n
            report(min(1.0, self.done / self.total))

    original = module.tqdm
    module.tqdm = types.SimpleNamespace(tqdm=Bar)
    try:
        yield
    finally:
        module.tqdm = original


def _decode(model: MlxWhisper, clip: np.ndarray, language: str, report: Callable[[float], None],
            task: str = "transcribe") -> dict:
    from mlx_whisper.transcribe import ModelHolder

    module = importlib.import_module("mlx_whisper.transcribe")  # the module, not the function
    # Hand mlx-whisper our loaded model: it caches one model by path in ModelHolder.
    ModelHolder.model, ModelHolder.model_path = model.model, model.location
    with _progress_hook(module, report):
        return module.transcribe(
            clip,
            path_or_hf_repo=model.location,
            language=language,
            task=task,
            word_timestamps=True,
            fp16=model.fp16,
            verbose=False,  # no console output; progress goes through the hook
        )


def _segments(raw: list[dict], offset: float, limit: float) -> list[Segment]:
    """mlx-whisper segments (times from the clip start) -> contract segments in audio time."""

    def at(t: float) -> float:
        return round(min(max(offset + float(t), offset), limit), 3)

    segments = []
    for seg in raw:
        text = seg["text"].strip()
        if not text:
            continue
        words = [
            Word(text=w["word"].strip(), start=at(w["start"]), end=at(w["end"]), score=round(float(w["probability"]), 3))
            for w in seg.get("words", [])
            if w["word"].strip()
        ]
        start = words[0].start if words else at(seg["start"])
        end = words[-1].end if words else at(seg["end"])
        segments.append(Segment(start=start, end=max(start, end), text=text, words=words, **decoder_stats(seg)))
    return segments


def decoder_stats(seg: dict) -> dict:
    """mlx-whisper's own per-segment decoder statistics (openai-whisper's segment fields), each
    None where it reported none."""
    stats = {name: (float(seg[name]) if seg.get(name) is not None else None)
             for name in ("avg_logprob", "compression_ratio", "no_speech_prob")}
    tokens = seg.get("tokens")
    return {**stats, "tokens": [int(t) for t in tokens] if tokens is not None else None}
