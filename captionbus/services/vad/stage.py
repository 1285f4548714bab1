"""vad: 16 kHz mono WAV -> where someone speaks (regions.json, captionbus.contracts.speech.SpeechRegions,
backend "silero"), with the Silero VAD ONNX model run by onnxruntime (no torch: env `common`).

The audio is streamed in blocks and scored in Silero's 32 ms frames (512 samples at 16 kHz, each
fed with the previous frame's last 64 samples as context and the recurrent state carried over,
as silero-vad's own OnnxWrapper does); only one float per frame is kept. Frames become regions
with the shared post-processing in captionbus/services/vad/regions.py.

Params (declaration.VadParams) and service options (declaration.VadOptions):
`captionbus stages vad`.
Outputs: `regions` (regions.json). Audio of zero length gives an empty region list and a
warning (as asr gives an empty transcript), not an error; a corrupt file or another format
(not 16 kHz mono 16-bit PCM) is BadInput.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.vad import VAD, VadParams
from captionbus.contracts.speech import SpeechRegion, SpeechRegions
from captionbus.services.runtime import SetupContext, StageContext, StageDefinition
from captionbus.services.runtime.cache import model_identity
from captionbus.services.vad import audio as wav
from captionbus.services.vad.regions import FrameScores, speech_regions

FRAME_SAMPLES = 512  # Silero's frame at 16 kHz
CONTEXT_SAMPLES = 64  # samples of the previous frame it sees with each frame
FRAME_S = FRAME_SAMPLES / wav.SAMPLE_RATE
BLOCK_FRAMES = 1875  # 60 s of audio read (and reported as progress) at a time


@dataclass
class SileroModel:
    session: Any  # onnxruntime.InferenceSession
    path: Path
    load_seconds: float


def model_path(ctx: SetupContext) -> Path:
    configured = ctx.options.model
    path = Path(configured) if configured else Path(ctx.models_dir) / "silero-vad" / "silero_vad.onnx"
    if not path.is_file():
        raise RuntimeError(
            f"no Silero VAD model at {path}: run `captionbus models fetch-test` "
            f"(or point CAPTIONBUS_VAD_MODEL at a silero_vad.onnx)"
        )
    return path


def setup(ctx: SetupContext) -> SileroModel:
    import onnxruntime

    path = model_path(ctx)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = ctx.options.threads
    options.inter_op_num_threads = 1
    started = time.monotonic()
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    load_seconds = time.monotonic() - started
    ctx.log.info("silero vad loaded", model=str(path), seconds=round(load_seconds, 3))
    return SileroModel(session, path, load_seconds)


def declare_model(ctx: SetupContext) -> str:
    """The Silero file setup() will load, stamped, before loading it (see StageDefinition)."""
    return model_identity("silero-vad-onnx", model_path(ctx))


def describe_model(resources: SileroModel | None) -> str | None:
    return None if resources is None else f"silero-vad ({resources.path.name}, onnxruntime)"


class SileroStream:
    """Speech probability per 512-sample frame, fed block by block; the recurrent state and
    the 64-sample context carry across blocks, so block edges change nothing."""

    def __init__(self, session):
        self.session = session
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros((1, CONTEXT_SAMPLES), dtype=np.float32)
        self.sample_rate = np.array(wav.SAMPLE_RATE, dtype=np.int64)

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        if len(samples) % FRAME_SAMPLES:  # only the file's last block: pad with silence
            samples = np.pad(samples, (0, FRAME_SAMPLES - len(samples) % FRAME_SAMPLES))
        frames = samples.reshape(-1, FRAME_SAMPLES)
        out = np.empty(len(frames), dtype=np.float32)
        for k, frame in enumerate(frames):
            x = np.concatenate([self.context, frame[None, :]], axis=1)
            prob, self.state = self.session.run(None, {"input": x, "state": self.state, "sr": self.sample_rate})
            self.context = x[:, -CONTEXT_SAMPLES:]
            out[k] = prob[0, 0]
        return out


def finish(ctx: StageContext, backend: str, scores: list[np.ndarray], frame_s: float, header_samples: int,
           samples: int, params: VadParams, started: float, load_s: float) -> dict[str, Path]:
    """Both backends end alike: per-frame speech scores of the `samples` read -> regions.json,
    metrics and warnings (a file shorter than its header says, no speech)."""
    if warning := wav.truncation_warning(header_samples, samples):
        ctx.warn(warning)
    duration = samples / wav.SAMPLE_RATE
    probs = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
    regions = speech_regions(FrameScores(probs, frame_s), duration, params)
    out = write_regions(ctx, backend, duration, regions)
    report(ctx, duration, regions, time.monotonic() - started, load_s)
    return {"regions": out}


def write_regions(ctx: StageContext, backend: str, duration: float, regions: list[tuple[float, float]]) -> Path:
    result = SpeechRegions(
        backend=backend, duration=round(duration, 3), regions=[SpeechRegion(start=s, end=e) for s, e in regions]
    )
    out = ctx.work_dir / "regions.json"
    out.write_text(result.model_dump_json(indent=1))
    return out


def report(ctx: StageContext, duration: float, regions: list[tuple[float, float]], seconds: float, load_s: float) -> None:
    speech = sum(e - s for s, e in regions)
    ctx.metrics.update(
        model_load_s=load_s,
        audio_duration_s=duration,
        vad_s=seconds,
        realtime_factor=seconds / duration if duration else 0.0,
        regions=float(len(regions)),
        speech_s=speech,
    )
    if duration == 0:
        ctx.warn("the audio is empty (0 samples): no speech regions")
    elif not regions:
        ctx.warn("no speech found in the audio")
    ctx.progress(1.0, f"{len(regions)} speech regions, {speech:.1f} s of {duration:.1f} s")


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    model: SileroModel = ctx.resources
    params: VadParams = ctx.params
    started = time.monotonic()
    stream = SileroStream(model.session)
    blocks: list[np.ndarray] = []
    samples = 0
    with wav.open_wav(ctx.input_path("audio")) as reader:
        expected = reader.getnframes()
        for block in wav.iter_blocks(reader, BLOCK_FRAMES * FRAME_SAMPLES):
            blocks.append(stream.probabilities(block))
            samples += len(block)
            ctx.progress(min(samples / max(expected, 1), 1.0) * 0.99, f"{samples / wav.SAMPLE_RATE:.0f} s scanned")
    return finish(ctx, "silero", blocks, FRAME_S, expected, samples, params, started, model.load_seconds)


STAGE = StageDefinition(
    spec=VAD,
    handle=handle,
    setup=setup,
    report_packages=("onnxruntime", "numpy"),
    describe_model=describe_model,
    declare_model=declare_model,
    cache_ignores=("source_language",),  # the job's spoken language changes nothing here
)
