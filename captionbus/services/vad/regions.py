"""Per-frame speech probabilities -> speech regions: the post-processing both VAD backends share.

Pure functions over lists of (start, end) seconds, no ML library, so they are unit-tested in the
plain interpreter. The params (and their bounds) are declaration.VadParams. The order
in `speech_regions` is deliberate:
  1. hysteresis thresholding: speech starts on a frame >= threshold and lasts until a frame drops
     below threshold - 0.15 (Silero's and pyannote's rule), so a wobbling score near the
     threshold does not chop a word into pieces;
  2. pauses shorter than `min_silence_s` are bridged (one region per phrase, not per word);
  3. regions shorter than `min_speech_s` are dropped (clicks, coughs, noise blips);
  4. `pad_s` is added on both sides, clipped to [0, duration]; regions the padding makes
     overlap are merged;
  5. regions longer than `max_region_s` are cut at their least speech-like frame in the second
     half of each `max_region_s` window (whisperx's min-cut), so ASR chunks stay bounded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from captionbus.contracts.declarations.vad import VadParams

Region = tuple[float, float]


@dataclass
class FrameScores:
    """Speech probability per frame; frame k covers [t0 + k*frame_s, t0 + (k+1)*frame_s)."""

    probs: np.ndarray
    frame_s: float
    t0: float = 0.0

    def time_of(self, k: int) -> float:
        return self.t0 + k * self.frame_s

    def least_speech_between(self, a: float, b: float) -> float | None:
        """Middle of the lowest-probability frame whose middle lies in [a, b] (None if none)."""
        first = max(0, math.ceil((a - self.t0) / self.frame_s - 0.5))
        last = min(len(self.probs) - 1, math.floor((b - self.t0) / self.frame_s - 0.5))
        if last < first:
            return None
        k = first + int(np.argmin(self.probs[first : last + 1]))
        return self.time_of(k) + self.frame_s / 2


def binarize(scores: FrameScores, onset: float, offset: float) -> list[Region]:
    """Hysteresis thresholding: [start, end) of each run of speech frames."""
    probs = np.asarray(scores.probs, dtype=np.float32)
    regions: list[Region] = []
    start: int | None = None
    # Only frames where the decision can change matter: above onset (may start) or below
    # offset (may end); scanning those keeps a film's 200k frames quick.
    candidates = np.flatnonzero((probs >= onset) | (probs < offset))
    for k in candidates.tolist():
        p = probs[k]
        if start is None and p >= onset:
            start = k
        elif start is not None and p < offset:
            regions.append((scores.time_of(start), scores.time_of(k)))
            start = None
    if start is not None:
        regions.append((scores.time_of(start), scores.time_of(len(probs))))
    return regions


def bridge_short_gaps(regions: Sequence[Region], min_silence_s: float) -> list[Region]:
    """Merge neighbours separated by less than `min_silence_s` (and any that touch/overlap)."""
    merged: list[Region] = []
    for start, end in sorted(regions):
        if merged and (start - merged[-1][1] < min_silence_s or start < merged[-1][1]):
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def drop_short(regions: Sequence[Region], min_speech_s: float) -> list[Region]:
    return [(s, e) for s, e in regions if e - s >= min_speech_s]


def pad(regions: Sequence[Region], pad_s: float, duration: float) -> list[Region]:
    """Widen by `pad_s` each side within [0, duration]; merge what then overlaps."""
    widened = [(max(0.0, s - pad_s), min(duration, e + pad_s)) for s, e in regions]
    return bridge_short_gaps([(s, e) for s, e in widened if e > s], 0.0)


def split_long(regions: Sequence[Region], max_region_s: float, scores: FrameScores | None = None) -> list[Region]:
    """Cut regions longer than `max_region_s`: each piece ends at the least speech-like frame
    between half and all of `max_region_s` from its start (evenly without scores)."""
    out: list[Region] = []
    for start, end in regions:
        while end - start > max_region_s:
            cut = scores.least_speech_between(start + max_region_s / 2, start + max_region_s) if scores else None
            if cut is None or not start < cut < end:
                pieces = math.ceil((end - start) / max_region_s)
                cut = start + (end - start) / pieces
            out.append((start, cut))
            start = cut
        out.append((start, end))
    return out


def speech_regions(scores: FrameScores, duration: float, params: VadParams) -> list[Region]:
    """The whole post-processing (see the module docstring), rounded to milliseconds."""
    raw = [(max(0.0, s), min(duration, e)) for s, e in binarize(scores, params.threshold, params.offset_threshold)]
    regions = bridge_short_gaps([(s, e) for s, e in raw if e > s], params.min_silence_s)
    regions = drop_short(regions, params.min_speech_s)
    regions = pad(regions, params.pad_s, duration)
    regions = split_long(regions, params.max_region_s, scores)
    rounded = [(round(s, 3), round(e, 3)) for s, e in regions]
    return [(s, e) for s, e in rounded if e > s]
