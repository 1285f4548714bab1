"""The demux output every audio stage reads: 16 kHz mono 16-bit PCM WAV. numpy only, so any
stage environment can use it. A damaged file is BadInput (the job fails with one line), never
an exception the runtime would retry."""
from __future__ import annotations

import struct
import wave
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from captionbus.core.mediatools import SAMPLE_RATE
from captionbus.services.runtime.errors import BadInput

# The asr stage decodes speech regions widened by this much on each side (VAD edges clip soft
# word edges), grouped greedily into windows of at most WHISPER_WINDOW_S (whisperx's
# merge_chunks). The chunk stage replicates that grouping to cut a film only where the whole
# film's decode would start a new window anyway (captionbus/services/chunk/plan.py).
DECODE_MARGIN_S = 0.1
WHISPER_WINDOW_S = 30.0
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


def sample_index(seconds: float) -> int:
    """The sample at `seconds`, rounded to the nearest: `int(seconds * SAMPLE_RATE)` truncates, and
    a time that is a whole sample (or millisecond) in exact arithmetic can land one sample short
    after float subtraction (a chunk's regions are film times minus the chunk's start), so the
    same audio would be cut one sample apart in a chunk and in the whole film. One sample moves
    every mel frame: Whisper base's encoder output changed by up to 13.7 (of 24 at most) for a
    one-sample shift of a window, enough to move a word's cross-attention time by 20 ms."""
    return round(seconds * SAMPLE_RATE)


def read_wav(path: Path, what: str = "audio", start_s: float = 0.0, end_s: float | None = None):
    """The samples from `start_s` to `end_s` (default: the end) as float32 in -1..1. Only that
    window is read (the reader seeks to it), so a stage working on one chunk of a film holds that
    chunk, not the film: a 2-hour film is 230 MB of PCM, 460 MB as float32."""
    import numpy as np

    with open_wav(path, what) as reader:
        total = reader.getnframes()
        first = min(total, max(0, int(round(start_s * SAMPLE_RATE))))
        last = total if end_s is None else min(total, max(first, int(round(end_s * SAMPLE_RATE))))
        try:
            reader.setpos(first)
            frames = reader.readframes(last - first)
        except WAV_HEADER_ERRORS as err:
            raise BadInput(f"{what} is not a readable PCM WAV file ({err or 'its data is cut short'})") from None
    return np.frombuffer(frames[: len(frames) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


def wav_window_digest(path: Path, start_s: float, end_s: float, what: str = "audio") -> str:
    """sha256 of the PCM bytes from `start_s` to `end_s` (what a stage reading that window hears)."""
    import hashlib

    with open_wav(path, what) as reader:
        total = reader.getnframes()
        first = min(total, max(0, int(round(start_s * SAMPLE_RATE))))
        last = min(total, max(first, int(round(end_s * SAMPLE_RATE))))
        try:
            reader.setpos(first)
            return hashlib.sha256(reader.readframes(last - first)).hexdigest()
        except WAV_HEADER_ERRORS as err:
            raise BadInput(f"{what} is not a readable PCM WAV file ({err or 'its data is cut short'})") from None


def wav_duration(path: Path, what: str = "audio") -> float:
    """Seconds of audio in the WAV, from its header (nothing else is read)."""
    with open_wav(path, what) as reader:
        return reader.getnframes() / SAMPLE_RATE


def merge_regions(regions: list[tuple[float, float]], duration: float, margin: float = 0.0) -> list[tuple[float, float]]:
    """Sorted, widened by `margin`, clipped to [0, duration], overlaps merged, empties dropped
    (speech regions: the asr stage decodes inside them, the chunk stage cuts between them)."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(regions):
        if end <= start:
            continue  # an empty region holds no speech, however wide the margin
        start, end = max(0.0, start - margin), min(duration, end + margin)
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
