"""Windowed streaming of a 16 kHz mono 16-bit WAV through a per-window function, with linear
cross-fades where windows overlap, straight to a WAV writer. Pure numpy + stdlib `wave`: what
is held in memory at any time is one window and one overlap, whatever the file's length.

Used by the source_separation stage (the per-window function runs demucs); kept apart so the
windowing, the cross-fade and the memory bound are tested without torch.
"""
from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from captionbus.services.audio import SAMPLE_RATE, WAV_HEADER_ERRORS
from captionbus.services.runtime import BadInput

SAMPLE_WIDTH = 2
SCAN_BLOCK_FRAMES = 1 << 20  # 65 s of audio per read in the checking pass


@dataclass(frozen=True)
class AudioStats:
    """What the checking pass learns about the whole file, in float units (-1..1)."""

    frames: int
    mean: float
    std: float

    @property
    def duration_s(self) -> float:
        return self.frames / SAMPLE_RATE


def _open(path: Path, name: str) -> wave.Wave_read:
    try:
        reader = wave.open(str(path), "rb")
    except WAV_HEADER_ERRORS as err:
        raise BadInput(f"{name} is not a readable PCM WAV file ({err or 'its header is damaged'}); separation needs the demux output") from None
    shape = (reader.getframerate(), reader.getnchannels(), reader.getsampwidth())
    if shape != (SAMPLE_RATE, 1, SAMPLE_WIDTH):
        reader.close()
        raise BadInput(
            f"{name} must be 16 kHz mono 16-bit PCM WAV (the demux output); got {shape[0]} Hz, "
            f"{shape[1]} channel(s), {8 * shape[2]}-bit"
        )
    return reader


def _samples(data: bytes) -> np.ndarray:
    """int16 samples of whole frames (a file cut mid-sample ends in half a frame)."""
    return np.frombuffer(data, dtype="<i2", count=len(data) // SAMPLE_WIDTH)


def scan(path: Path, name: str = "audio") -> AudioStats:
    """Check the file end to end (format, data as long as the header says) and get the mean and
    standard deviation demucs normalises by, reading one block at a time."""
    reader = _open(path, name)
    with reader:
        expected = reader.getnframes()
        if expected == 0:
            raise BadInput(f"{name} has no samples (zero-length audio); nothing to separate")
        seen, total, total_sq = 0, 0.0, 0.0
        while seen < expected:
            block = _samples(reader.readframes(min(SCAN_BLOCK_FRAMES, expected - seen)))
            if block.size == 0:
                break
            values = block.astype(np.float64)
            total += float(values.sum())
            total_sq += float(np.dot(values, values))
            seen += block.size
    if seen < expected:
        raise BadInput(
            f"{name} is cut short: its header promises {expected / SAMPLE_RATE:.1f} s but the file holds "
            f"{seen / SAMPLE_RATE:.1f} s of samples (an interrupted copy?)"
        )
    mean = total / seen
    variance = max(total_sq / seen - mean * mean, 0.0)
    return AudioStats(frames=seen, mean=mean / 32768.0, std=math.sqrt(variance) / 32768.0)


def plan_windows(total: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) sample ranges covering [0, total): as few windows of at most `window` as
    can cover it, all the same length, neighbours overlapping by `overlap` (a few samples
    more from rounding). Equal lengths rather than a short last window: no window gets
    less context than the others, and nothing is separated twice beyond the overlaps. With
    overlap <= window / 3 no sample is in more than two windows, which the cross-fade needs."""
    if window <= 0 or not 0 <= 3 * overlap <= window:
        raise ValueError(f"window {window} and overlap {overlap}: need window > 0 and 0 <= overlap <= window / 3")
    if total <= window:
        return [(0, total)]
    count = math.ceil((total - overlap) / (window - overlap))
    length = math.ceil((total + (count - 1) * overlap) / count)
    # Spread the starts evenly (not k * (length - overlap)): rounding must not pile up into
    # the last overlap.
    return [(start, start + length) for start in (k * (total - length) // (count - 1) for k in range(count))]


def fade_in(length: int) -> np.ndarray:
    """Linear ramp 0 -> 1 over `length` samples; the outgoing window gets 1 - ramp, so a
    window function that changes nothing leaves the signal exactly as it was."""
    return ((np.arange(length, dtype=np.float32) + 0.5) / length) if length else np.zeros(0, np.float32)


def to_pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def stream_windows(
    source: Path,
    destination: Path,
    windows: list[tuple[int, int]],
    process: Callable[[int, np.ndarray], np.ndarray],
    on_window: Callable[[int], None] | None = None,
) -> None:
    """Read each window of `source` (float32, -1..1), run `process(index, samples)` on it (same
    length back), cross-fade with the previous window's overlap and append to `destination`
    (16 kHz mono 16-bit WAV, as long as the source). `on_window(i)` runs after window i is
    written."""
    reader = _open(source, "audio")
    with reader, wave.open(str(destination), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(SAMPLE_WIDTH)
        writer.setframerate(SAMPLE_RATE)
        tail = np.zeros(0, np.float32)  # previous window's output over the next window's start
        for index, (start, end) in enumerate(windows):
            reader.setpos(start)
            raw = _samples(reader.readframes(end - start))
            if raw.size != end - start:
                raise BadInput(f"audio ends early at {(start + raw.size) / SAMPLE_RATE:.1f} s while reading it")
            out = np.asarray(process(index, raw.astype(np.float32) / 32768.0), dtype=np.float32)
            if out.shape != (end - start,):
                raise RuntimeError(f"window {index} came back with shape {out.shape}, expected ({end - start},)")
            if tail.size:
                ramp = fade_in(tail.size)
                out = out.copy()
                out[: tail.size] = tail * (1.0 - ramp) + out[: tail.size] * ramp
            keep_until = windows[index + 1][0] - start if index + 1 < len(windows) else out.size
            writer.writeframes(to_pcm16(out[:keep_until]))
            tail = out[keep_until:].copy()
            if on_window:
                on_window(index)
