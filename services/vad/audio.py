"""Reading the demux output (16 kHz mono 16-bit PCM WAV) in blocks, so a feature film is never
held in memory whole. Shared by both VAD backends; numpy only."""
from __future__ import annotations

import wave
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from services.runtime.errors import BadInput

SAMPLE_RATE = 16000


@contextmanager
def open_wav(path: Path) -> Iterator[wave.Wave_read]:
    """The WAV, checked to be what demux writes; BadInput (one line) otherwise."""
    try:
        reader = wave.open(str(path), "rb")
    except (wave.Error, EOFError) as err:
        raise BadInput(f"audio is not a readable PCM WAV file ({err or 'file ends inside its header'})") from None
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
    reader.setpos(start)
    data = reader.readframes(count)
    data = data[: len(data) // 2 * 2]  # a truncated file can end mid-sample
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def iter_blocks(reader: wave.Wave_read, block_samples: int) -> Iterator[np.ndarray]:
    """The whole file in consecutive blocks of `block_samples` (the last one shorter)."""
    reader.rewind()
    while True:
        data = reader.readframes(block_samples)
        data = data[: len(data) // 2 * 2]
        if not data:
            return
        yield np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
