"""Reading the demux output (16 kHz mono 16-bit PCM WAV) in blocks, so a feature film is never
held in memory whole. Shared by both VAD backends; numpy only. Opening and checking the file is
captionbus/services/audio.py's `open_wav`, re-exported here."""
from __future__ import annotations

import wave
from typing import Iterator

import numpy as np

from captionbus.services.audio import SAMPLE_RATE, open_wav

__all__ = ["SAMPLE_RATE", "open_wav", "read_samples", "iter_blocks", "truncation_warning"]
# How wave reports reading or seeking past the data a damaged/truncated file really holds: that is
# where the audio ends (the truncation warning tells the user).
_PAST_THE_END = (wave.Error, RuntimeError, EOFError)


def read_samples(reader: wave.Wave_read, start: int, count: int) -> np.ndarray:
    """`count` samples from sample `start` as float32 in -1..1 (fewer at the end of the file)."""
    try:
        reader.setpos(start)
        data = reader.readframes(count)
    except _PAST_THE_END:
        data = b""
    return _to_float(data)


def iter_blocks(reader: wave.Wave_read, block_samples: int) -> Iterator[np.ndarray]:
    """The whole file in consecutive blocks of `block_samples` (the last one shorter)."""
    try:
        reader.rewind()
    except _PAST_THE_END:
        return
    while True:
        try:
            data = reader.readframes(block_samples)
        except _PAST_THE_END:
            data = b""
        samples = _to_float(data)
        if not len(samples):
            return
        yield samples


def _to_float(data: bytes) -> np.ndarray:
    data = data[: len(data) // 2 * 2]  # a truncated file can end mid-sample
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def truncation_warning(header_samples: int, samples: int) -> str | None:
    """A warning when the file ended before its header said it would (an interrupted copy)."""
    if samples >= header_samples:
        return None
    return (f"the audio ends early: its header promises {header_samples / SAMPLE_RATE:.1f} s, the file holds "
            f"{samples / SAMPLE_RATE:.1f} s (truncated?); regions cover what is there")
