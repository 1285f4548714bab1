"""Reading the demux output (16 kHz mono 16-bit PCM WAV) in blocks, so a feature film is never
held in memory whole. Shared by both VAD backends; numpy only."""
from __future__ import annotations

import struct
import wave
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from services.runtime.errors import BadInput

SAMPLE_RATE = 16000
# How wave reports reading or seeking past the data a damaged/truncated file really holds: that is
# where the audio ends (the truncation warning tells the user).
_PAST_THE_END = (wave.Error, RuntimeError, EOFError)


@contextmanager
def open_wav(path: Path) -> Iterator[wave.Wave_read]:
    """The WAV, checked to be what demux writes; BadInput (one line) otherwise."""
    try:
        reader = wave.open(str(path), "rb")
    # what Python's wave raises on a damaged header (RuntimeError: a chunk size past the end)
    except (wave.Error, EOFError, RuntimeError, ValueError, struct.error) as err:
        raise BadInput(f"audio is not a readable PCM WAV file ({err or 'its header is damaged or cut short'})") from None
    try:
        shape = (reader.getframerate(), reader.getnchannels(), reader.getsampwidth())
        if shape != (SAMPLE_RATE, 1, 2):
            raise BadInput(
                f"audio must be 16 kHz mono 16-bit PCM WAV (the demux output); got {shape[0]} Hz, "
                f"{shape[1]} channel(s), {8 * shape[2]}-bit"
            )
        yield reader
    finally:
        reader.close()


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
