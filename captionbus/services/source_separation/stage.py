"""source_separation: the demux output (16 kHz mono 16-bit WAV) -> its vocals only, with demucs
(htdemucs, two stems: vocals and the rest), so ASR hears speech rather than music and effects.

The file is streamed in windows, never loaded whole: a first pass checks it and measures the
mean/level demucs normalises by (as `demucs.api.Separator` does for a whole track); then each
window (`chunk_s`, overlapping its neighbour by `overlap_s`) is resampled and upmixed to the
model's rate and channels, separated with `demucs.apply.apply_model` (which splits it into the
model's own segments), the `vocals` source downmixed and resampled back to 16 kHz, linearly
cross-faded into the previous window's overlap and appended to the output WAV. Memory is one
window's worth whatever the film's length.

Params: declaration.SourceSeparationParams: `chunk_s` (longest window, seconds;
default 60, at most 600), `overlap_s` (default 3; at most a third of chunk_s). Windows are made
equally long, so a film is cut into ceil(duration / 57 s) of them. Service options:
declaration.SourceSeparationOptions (`captionbus stages source_separation`).
Outputs: `vocals` (vocals.wav: 16 kHz mono 16-bit PCM, exactly as long as the input).
Metrics: separation_s, audio_duration_s, realtime_factor, windows, model_load_s.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.source_separation import (
    SOURCE_SEPARATION,
    SourceSeparationOptions,
    SourceSeparationParams,
)
from captionbus.core.hardware import usable_cores
from captionbus.services.runtime import SetupContext, StageContext, StageDefinition
from captionbus.services.runtime.cache import model_identity
from captionbus.services.runtime.options import default_device
from captionbus.services.source_separation.streaming import (
    SAMPLE_RATE,
    plan_windows,
    scan,
    stream_windows,
)

VOCALS = "vocals"
SEGMENT_OVERLAP = 0.25  # apply_model's own overlap between the model's segments (its default)


@dataclass
class DemucsModel:
    """What setup() loads once per process and every request reuses."""

    model: Any  # demucs HTDemucs / BagOfModels, in eval mode
    name: str
    repo: str | None
    device: str
    shifts: int
    load_seconds: float
    resample_in: Any  # julius.ResampleFrac 16 kHz -> model rate (None when equal)
    resample_out: Any  # model rate -> 16 kHz
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def samplerate(self) -> int:
        return int(self.model.samplerate)

    @property
    def channels(self) -> int:
        return int(self.model.audio_channels)

    @property
    def vocals_index(self) -> int:
        return list(self.model.sources).index(VOCALS)

    def apply(self, mix, on_segment=None):
        """mix: (1, channels, samples) float tensor at the model rate -> (1, sources, channels,
        samples). Kept as one method so tests can swap the network for a stand-in."""
        from demucs.apply import apply_model

        return apply_model(self.model, mix, shifts=self.shifts, split=True, overlap=SEGMENT_OVERLAP,
                           device=self.device, progress=False, callback=on_segment)


def load_model(name: str, repo: str | None):
    """demucs's own loader: a name or signature, from `repo` or demucs's pretrained sources."""
    from demucs.pretrained import get_model
    from demucs.repo import ModelLoadingError

    if repo is not None and not Path(repo).is_dir():
        # demucs itself would sys.exit() here
        raise RuntimeError(f"CAPTIONBUS_DEMUCS_REPO={repo} is not a folder")
    try:
        model = get_model(name, repo=Path(repo) if repo else None)
    except ModelLoadingError as err:
        where = f"in {repo}" if repo else "among demucs's pretrained models"
        raise RuntimeError(f"demucs model {name!r} not found {where} ({err}); set CAPTIONBUS_DEMUCS_MODEL / _REPO") from None
    except OSError as err:  # the download of pretrained weights (no network, no hub access)
        raise RuntimeError(
            f"could not fetch demucs model {name!r} ({err}); put its files in a folder and set "
            f"CAPTIONBUS_DEMUCS_REPO to it"
        ) from None
    if VOCALS not in model.sources:
        raise RuntimeError(f"demucs model {name!r} separates {model.sources}, no {VOCALS!r} source")
    return model


def setup(ctx: SetupContext) -> DemucsModel:
    import julius
    import torch

    options: SourceSeparationOptions = ctx.options
    name, repo = options.model, options.repo
    device = options.device or default_device()
    torch.set_num_threads(options.threads or usable_cores())

    started = time.monotonic()
    model = load_model(name, repo).to(device)
    load_seconds = time.monotonic() - started
    rate = int(model.samplerate)
    resample_in = julius.ResampleFrac(SAMPLE_RATE, rate).to(device) if rate != SAMPLE_RATE else None
    resample_out = julius.ResampleFrac(rate, SAMPLE_RATE).to(device) if rate != SAMPLE_RATE else None
    ctx.log.info("demucs model loaded", model=name, repo=repo, device=device, samplerate=rate,
                 sources=list(model.sources), seconds=round(load_seconds, 2))
    return DemucsModel(model, name, repo, device, options.shifts, load_seconds,
                       resample_in, resample_out)


def declare_model(ctx: SetupContext) -> str:
    """The demucs model setup() will load, before torch and demucs are imported (the stage cache
    answers hits meanwhile): its name, and the repo folder stamped by size/mtime when one is set
    (a pretrained name resolves through demucs's own download cache: the name is the identity)."""
    options: SourceSeparationOptions = ctx.options
    if not options.repo:
        return f"demucs:{options.model}|pretrained"
    return model_identity(f"demucs:{options.model}", options.repo)


def describe_model(resources: DemucsModel | None) -> str | None:
    if resources is None:
        return None
    where = resources.repo or "pretrained"
    return f"demucs {resources.name} ({where}, {resources.samplerate} Hz, {resources.device})"


def separate_window(model: DemucsModel, samples: np.ndarray, mean: float, std: float, on_segment=None) -> np.ndarray:
    """One window, 16 kHz mono float32 -> its vocals, 16 kHz mono float32, same length."""
    import torch

    with torch.no_grad():
        x = (torch.from_numpy(samples).to(model.device) - mean) / std
        if model.resample_in is not None:
            x = model.resample_in(x, full=True)
        mix = x.expand(1, model.channels, x.shape[-1]).contiguous()  # mono -> the model's channels
        vocals = model.apply(mix, on_segment)[0, model.vocals_index].mean(dim=0)
        if model.resample_out is not None:
            vocals = model.resample_out(vocals, output_length=samples.size)
        vocals = (vocals[: samples.size] * std + mean).float().cpu().numpy()
    if not np.isfinite(vocals).all():
        raise RuntimeError("demucs returned NaN/inf samples for this window")
    return vocals


class WindowProgress:
    """Progress over all windows, refined by apply_model's per-segment callbacks (which also
    let a cancelled job stop within one model segment rather than one window). Never goes back."""

    def __init__(self, ctx: StageContext, windows: list[tuple[int, int]], model_rate: int):
        self.ctx, self.windows, self.model_rate = ctx, windows, model_rate
        self.window, self.reported = 0, 0.0

    def report(self, fraction: float, message: str) -> None:
        self.reported = max(self.reported, min(1.0, fraction))
        self.ctx.progress(self.reported, message)

    def on_segment(self, info: dict) -> None:
        if info.get("state") != "end":
            self.ctx.check_cancelled()
            return
        start, end = self.windows[self.window]
        model_samples = max(1, (end - start) * self.model_rate // SAMPLE_RATE)
        passes = max(1, int(info.get("models", 1)))
        done_passes = int(info.get("model_idx_in_bag", 0))
        within = (done_passes + min(1.0, int(info.get("segment_offset", 0)) / model_samples)) / passes
        self.report((self.window + within) / len(self.windows), f"window {self.window + 1}/{len(self.windows)}")

    def window_done(self, index: int) -> None:
        self.window = index + 1
        self.report(self.window / len(self.windows), f"window {self.window}/{len(self.windows)} done")


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    model: DemucsModel = ctx.resources
    params: SourceSeparationParams = ctx.params
    chunk_s, overlap_s = params.chunk_s, params.window_overlap_s
    source = ctx.input_path("audio")
    stats = scan(source)  # BadInput for anything but non-empty, intact 16 kHz mono 16-bit PCM
    windows = plan_windows(stats.frames, int(chunk_s * SAMPLE_RATE), int(overlap_s * SAMPLE_RATE))
    std = stats.std + 1e-8  # as demucs.api does: digital silence stays silence instead of NaN
    ctx.log.info("separating", duration_s=round(stats.duration_s, 2), windows=len(windows), chunk_s=chunk_s, overlap_s=overlap_s)
    progress = WindowProgress(ctx, windows, model.samplerate)
    progress.report(0.0, f"{len(windows)} window(s) of up to {chunk_s:g} s")

    out = ctx.work_dir / "vocals.wav"
    started = time.monotonic()
    with model.lock:
        stream_windows(
            source, out, windows,
            lambda index, samples: separate_window(model, samples, stats.mean, std, progress.on_segment),
            on_window=progress.window_done,
        )
    seconds = time.monotonic() - started
    ctx.metrics.update(
        model_load_s=model.load_seconds,
        audio_duration_s=stats.duration_s,
        separation_s=seconds,
        realtime_factor=seconds / stats.duration_s,
        windows=float(len(windows)),
    )
    if stats.std < 1e-6:
        ctx.warn("the audio is silent; the vocals track is silent too")
    return {VOCALS: out}


STAGE = StageDefinition(
    spec=SOURCE_SEPARATION,
    handle=handle,
    setup=setup,
    report_packages=("demucs", "torch", "julius", "numpy"),
    describe_model=describe_model,
    declare_model=declare_model,
    cache_ignores=("source_language",),  # the job's spoken language changes nothing here
)
