"""vad_pyannote: 16 kHz mono WAV -> where someone speaks (regions.json, captionbus.contracts.speech.SpeechRegions,
backend "pyannote"), with pyannote.audio and the segmentation model whisperx ships (env `pyannote`).

As whisperx's own pyannote VAD does: `Model.from_pretrained` on the local checkpoint, a sliding
`Inference` whose per-chunk scores are reduced to "anyone speaking" (max over the model's
speaker outputs, as pyannote's VoiceActivityDetection pipeline does) and aggregated per frame
(~17 ms). The audio goes to pyannote in memory ({"waveform", "sample_rate"}), in blocks of
BLOCK_S with one model window of extra audio on each side, so a film is never decoded whole and
block edges see the same context as the middle. Frames become regions with the shared
post-processing in captionbus/services/vad/regions.py.

Params: as for `vad` (declaration.VadParams); service options:
declaration.VadPyannoteOptions (`captionbus stages vad_pyannote`).
Outputs: `regions` (regions.json). Zero-length audio gives an empty list and a warning; a
corrupt file or another format is BadInput.

pyannote's usage telemetry is switched off (PYANNOTE_METRICS_ENABLED=false unless set).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.vad import VAD_PYANNOTE, VadParams, VadPyannoteOptions
from captionbus.services.runtime import SetupContext, StageContext, StageDefinition
from captionbus.services.runtime.options import default_device
from captionbus.services.vad import audio as wav
from captionbus.services.vad.stage import finish

BLOCK_S = 300.0  # audio scored per Inference call (plus one window of context each side)


@dataclass
class PyannoteModel:
    inference: Any  # pyannote.audio.Inference
    path: Path
    device: str
    window_s: float
    frame_s: float  # the model's output frame step
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)


def model_path(ctx: SetupContext) -> Path:
    configured = ctx.options.model  # or CAPTIONBUS_PYANNOTE_SEGMENTATION
    path = Path(configured) if configured else Path(ctx.models_dir) / "pyannote-segmentation" / "pytorch_model.bin"
    if not path.is_file():
        raise RuntimeError(
            f"no pyannote segmentation model at {path}: run `captionbus models fetch-test` "
            f"(or point CAPTIONBUS_PYANNOTE_SEGMENTATION at a pyannote segmentation checkpoint)"
        )
    return path


def setup(ctx: SetupContext) -> PyannoteModel:
    # pyannote.audio 4 sends usage telemetry (OpenTelemetry, to pyannote's servers) on each model
    # load unless told not to; it is read at import. An operator may still opt in explicitly.
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    import torch
    from pyannote.audio import Inference, Model  # heavy: only in this stage's process

    options: VadPyannoteOptions = ctx.options
    path = model_path(ctx)
    device = options.device or default_device()
    torch.set_num_threads(options.threads)
    started = time.monotonic()
    model = Model.from_pretrained(path)  # a local checkpoint: no hub, no token
    if model is None:
        raise RuntimeError(f"pyannote could not load a model from {path}")
    window_s = float(model.specifications.duration)
    inference = Inference(
        model,
        window="sliding",
        duration=window_s,
        step=options.step or window_s / 10,
        batch_size=options.batch_size,
        device=torch.device(device),
        # "anyone speaking": the most active of the model's speaker outputs, per frame
        pre_aggregation_hook=lambda scores: np.max(scores, axis=-1, keepdims=True),
    )
    load_seconds = time.monotonic() - started
    frame_s = float(model.receptive_field.step)
    ctx.log.info("pyannote vad loaded", model=str(path), device=device, seconds=round(load_seconds, 2))
    return PyannoteModel(inference, path, device, window_s, frame_s, load_seconds)


def describe_model(resources: PyannoteModel | None) -> str | None:
    return None if resources is None else f"pyannote segmentation ({resources.path.name}, {resources.device})"


def score_block(model: PyannoteModel, samples: np.ndarray, hook) -> tuple[np.ndarray, np.ndarray]:
    """(frame middle times relative to the block start, speech probability) for one block."""
    import torch

    waveform = torch.from_numpy(samples).unsqueeze(0)  # (channel, sample)
    scores = model.inference({"waveform": waveform, "sample_rate": wav.SAMPLE_RATE}, hook=hook)
    window = scores.sliding_window
    middles = window.start + window.duration / 2 + window.step * np.arange(len(scores.data))
    return middles, np.asarray(scores.data[:, 0], dtype=np.float32)


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    model: PyannoteModel = ctx.resources
    params: VadParams = ctx.params
    started = time.monotonic()
    frame_s = model.frame_s
    block = int(BLOCK_S * wav.SAMPLE_RATE)
    margin = int(model.window_s * wav.SAMPLE_RATE)
    parts: list[np.ndarray] = []
    with wav.open_wav(ctx.input_path("audio")) as reader, model.lock:
        total_samples = reader.getnframes()
        core_start = 0
        while core_start < total_samples:
            read_from = max(0, core_start - margin)
            samples = wav.read_samples(reader, read_from, core_start + block + margin - read_from)
            core_end = min(core_start + block, read_from + len(samples))
            if core_end <= core_start:
                break  # the header promised more samples than the file holds
            done, share = core_start / total_samples, (core_end - core_start) / total_samples

            def hook(completed=0, total=1, **_):  # pyannote's: model windows done / in this block
                ctx.progress(min(0.99, done + share * min(completed, total) / max(total, 1)), "scoring speech")

            middles, probs = score_block(model, samples, hook)
            middles = middles + read_from / wav.SAMPLE_RATE
            # This block's share of the global frame grid (frame k centred at (k + 0.5) * frame_s):
            # each frame takes the score of the block frame nearest to its centre.
            first = int(np.ceil(core_start / wav.SAMPLE_RATE / frame_s - 0.5))
            last = int(np.ceil(core_end / wav.SAMPLE_RATE / frame_s - 0.5))
            centres = (np.arange(first, last) + 0.5) * frame_s
            nearest = np.clip(np.rint((centres - middles[0]) / frame_s).astype(int), 0, len(probs) - 1)
            parts.append(probs[nearest])
            core_start = core_end
    return finish(ctx, "pyannote", parts, frame_s, total_samples, core_start, params, started, model.load_seconds)


STAGE = StageDefinition(
    spec=VAD_PYANNOTE,
    handle=handle,
    setup=setup,
    report_packages=("pyannote-audio", "torch"),
    describe_model=describe_model,
    cache_ignores=("source_language",),  # the job's spoken language changes nothing here
)
