"""Where to cut a film's speech into chunks, one asr request each: a pure function of the speech
regions (no audio, no numpy), so it is tested alone and any env can run it.

Rules, in order:
- a cut lies in a pause between two speech regions, never inside one: every word Whisper hears
  belongs to exactly one chunk, so none is dropped or doubled at a boundary;
- a chunk is closed at the first pause of at least `min_silence_s` once it holds `target_s`;
- no chunk window is longer than `max_s`: when the next region would not fit, the chunk is cut at
  its longest pause so far; only a region that alone exceeds `max_s` (less EDGE_S on each side)
  is cut inside, into equal pieces, and those chunks say `split`;
- a window reaches EDGE_S beyond its first and last region (never past the middle of a pause),
  so the decoder hears the edges of soft words; silence between chunks is not decoded;
- a cut goes only where decoding the whole film would start a new Whisper window anyway
  (`whisper_windows`: the asr stage's regions widened by DECODE_MARGIN_S, grouped greedily into
  windows of at most WHISPER_WINDOW_S, as whisperx's merge_chunks does). A chunk then decodes
  exactly the windows the unchunked film decodes, so it hears the same audio in the same
  context and gives the same words and word times. Only when no such cut fits in `max_s` (a
  target below a window's length) does a chunk cut elsewhere, at its widest pause.
  Not replicated: the asr stage splits a region longer than a window at its quietest frame
  (it has the audio; this plan has not); windows right after such a region may differ.
"""
from __future__ import annotations

import math

from captionbus.contracts.speech import SpeechChunk, SpeechChunks, SpeechRegion
from captionbus.services.audio import DECODE_MARGIN_S, WHISPER_WINDOW_S, merge_regions

EDGE_S = 1.0  # audio kept before a chunk's first region and after its last one

Span = tuple[float, float]


def plan_chunks(
    regions: list[Span], duration: float, target_s: float, min_silence_s: float, max_s: float | None
) -> SpeechChunks:
    """The chunks of `duration` seconds of audio with speech in `regions` (sorted or not)."""
    spans = merge_regions(regions, duration)
    if not spans:
        return SpeechChunks(duration=duration, chunks=[])
    if not target_s or max_s is None:
        return SpeechChunks(duration=duration, chunks=[_chunk(0.0, duration, spans, False)])
    pieces, split_after = _split_long(spans, max_s - 2 * EDGE_S)
    window_starts = whisper_windows(pieces, duration)
    groups: list[tuple[int, int]] = []  # [first, last] piece index of each chunk
    first = 0
    while first < len(pieces):
        window_start = pieces[first][0] - EDGE_S
        last = first
        while True:
            nxt = last + 1
            if nxt == len(pieces):
                break
            gap = pieces[nxt][0] - pieces[last][1]
            if pieces[last][1] - window_start >= target_s and gap >= min_silence_s and nxt in window_starts:
                break  # long enough, a pause to cut in, and the whole film's decode starts a window there
            if pieces[nxt][1] + EDGE_S - window_start > max_s:
                last = _widest_pause(pieces, first, last, window_starts)  # the next region does not fit
                break
            last = nxt
        groups.append((first, last))
        first = last + 1
    chunks = []
    for n, (a, b) in enumerate(groups):
        lo = pieces[a][0] - EDGE_S if n == 0 else max(pieces[a][0] - EDGE_S, _middle(pieces, a - 1))
        hi = pieces[b][1] + EDGE_S if n == len(groups) - 1 else min(pieces[b][1] + EDGE_S, _middle(pieces, b))
        chunks.append(_chunk(max(0.0, lo), min(duration, hi), pieces[a:b + 1], b in split_after))
    return SpeechChunks(duration=duration, chunks=chunks)


def _split_long(spans: list[Span], longest: float) -> tuple[list[Span], set[int]]:
    """Regions longer than `longest` in equal pieces; the indexes of pieces followed by a cut
    inside speech."""
    longest = max(longest, 1.0)
    pieces: list[Span] = []
    split_after: set[int] = set()
    for start, end in spans:
        n = math.ceil((end - start) / longest - 1e-9)
        step = (end - start) / n
        for i in range(n):
            if i < n - 1:
                split_after.add(len(pieces))
            pieces.append((start + i * step, end if i == n - 1 else start + (i + 1) * step))
    return pieces, split_after


def whisper_windows(pieces: list[Span], duration: float, margin: float = DECODE_MARGIN_S,
                    window_s: float = WHISPER_WINDOW_S) -> set[int]:
    """Indexes of the pieces that begin a Whisper window when the asr stage decodes them all in
    one request: regions widened by `margin` and merged (merge_regions), then grouped greedily
    (whisperx Vad.merge_chunks: a window closes when the next region would end more than
    `window_s` after the window's start). A widened region longer than a window (the asr stage
    splits it by the audio) is taken as ending its own last window."""
    starts: set[int] = set()
    widened: list[Span] = []
    owners: list[int] = []  # the first piece of each widened region
    for i, (start, end) in enumerate(pieces):
        start, end = max(0.0, start - margin), min(duration, end + margin)
        if widened and start <= widened[-1][1]:
            widened[-1] = (widened[-1][0], max(widened[-1][1], end))
        else:
            widened.append((start, end))
            owners.append(i)
    if not widened:
        return starts
    starts.add(owners[0])
    window_start, window_end = widened[0][0], 0.0
    for owner, (start, end) in zip(owners, widened):
        if end - window_start > window_s and window_end - window_start > 0:
            starts.add(owner)
            window_start = start
        if end - start > window_s:
            window_start = max(start, end - window_s)
        window_end = end
    return starts


def _widest_pause(pieces: list[Span], first: int, last: int, window_starts: set[int] = frozenset()) -> int:
    """The piece after which the pause is widest, among first..last (last: cut after it);
    pauses where a Whisper window starts first, when there are any."""
    if last == first:
        return last
    return max(range(first, last + 1), key=lambda i: (i + 1 in window_starts, pieces[i + 1][0] - pieces[i][1], i))


def _middle(pieces: list[Span], i: int) -> float:
    return (pieces[i][1] + pieces[i + 1][0]) / 2


def _chunk(start: float, end: float, spans: list[Span], split: bool) -> SpeechChunk:
    regions = [SpeechRegion(start=round(s, 3), end=round(e, 3)) for s, e in spans]
    return SpeechChunk(start=round(start, 3), end=round(end, 3), regions=regions, split=split)
