"""The demux output every audio stage reads: 16 kHz mono 16-bit PCM WAV. numpy only, so any
stage environment can use it. A damaged file is BadInput (the job fails with one line), never
an exception the runtime would retry."""
from __future__ import annotations

import struct
import wave
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from services.runtime.errors import BadInput

SAMPLE_RATE = 16000
# What Python's wave raises on a damaged or cut-short header (RuntimeError: a chunk size past the end).
WAV_HEADER_ERRORS = (wave.Error, EOFError, RuntimeError, ValueError, struct.error)


@contextmanager
def open_wav(path: Path, what: str = "audio") -> Iterator[wave.Wave_read]:
    """The WAV, checked to be what demux writes; BadInput (one line) otherwise."""
    try:
        reader = wave.open(str(path), "rb")
    except WAV_HEADER_ERRORS as err:
        raise BadInput(f"{what} is not a readable PCM WAV file ({err or 'its header is damaged or cut short'})") from None
    try:
        shape = (reader.getframerate(), reader.getnchannels(), reader.getsampwidth())
        if shape != (SAMPLE_RATE, 1, 2):
            raise BadInput(
                f"{what} must be 16 kHz mono 16-bit PCM WAV (the demux output); got {shape[0]} Hz, "
                f"{shape[1]} channel(s), {8 * shape[2]}-bit"
            )
        yield reader
    finally:
        reader.close()


def read_wav(path: Path, what: str = "audio"):
    """The whole file as float32 samples in -1..1 (for stages that need it all at once)."""
    import numpy as np

    with open_wav(path, what) as reader:
        try:
            frames = reader.readframes(reader.getnframes())
        except WAV_HEADER_ERRORS as err:
            raise BadInput(f"{what} is not a readable PCM WAV file ({err or 'its data is cut short'})") from None
    return np.frombuffer(frames[: len(frames) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
