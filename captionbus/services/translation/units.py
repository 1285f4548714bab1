"""Sentence units: consecutive transcript segments joined into what a translation model should
see at once, and a unit's translation split back over its segments. Pure; no ML here.

ASR segments often end mid-sentence (a pause, a 30 s chunk edge). Translating each alone loses
the rest of the sentence, and word order differs between languages, so a segment's translation
is only well defined as a share of its sentence's. We translate whole sentences (capped in
length) and give each segment a share of the translation proportional to its share of the
source text, cut at word boundaries (grapheme clusters for scripts without spaces).
"""
from __future__ import annotations

from dataclasses import dataclass

from captionbus.core.subtitles.graphemes import clusters, display_len

# Sentence-final marks across the scripts we serve: Latin, Devanagari danda/double danda,
# CJK full-width, Arabic/Urdu question mark and full stop, ellipsis.
SENTENCE_END = ".?!…।॥。？！؟۔"
# Closing marks that may follow the sentence-final one: `He said "no."` ends a sentence.
TRAILING_CLOSERS = "\"'”’»)]}」』"

MAX_UNIT_SEGMENTS = 5
MAX_UNIT_CHARS = 400
# A silence this long between two segments ends a unit even without punctuation (ASR of
# unpunctuated speech, scene changes).
MAX_JOIN_GAP_S = 2.0


@dataclass(frozen=True)
class SegmentText:
    """What grouping needs to know about one transcript segment."""

    text: str
    start: float
    end: float
    speaker: str | None = None


@dataclass(frozen=True)
class Unit:
    indices: tuple[int, ...]  # segment indices, consecutive
    text: str  # the segments' texts joined with the source language's word separator


def ends_sentence(text: str) -> bool:
    stripped = text.rstrip().rstrip(TRAILING_CLOSERS)
    return bool(stripped) and stripped[-1] in SENTENCE_END


def group_units(
    segments: list[SegmentText],
    max_segments: int = MAX_UNIT_SEGMENTS,
    max_chars: int = MAX_UNIT_CHARS,
    separator: str = " ",
    max_gap_s: float = MAX_JOIN_GAP_S,
) -> list[Unit]:
    """Consecutive non-empty segments joined until one ends a sentence, the unit has
    max_segments or would pass max_chars, the speaker changes, or a long silence follows.
    Segments with no text are in no unit (nothing to translate). max_segments=1 translates
    every segment alone."""
    units: list[Unit] = []
    current: list[int] = []

    def close() -> None:
        if current:
            text = separator.join(segments[i].text.strip() for i in current)
            units.append(Unit(tuple(current), text))
            current.clear()

    for i, segment in enumerate(segments):
        text = segment.text.strip()
        if not text:
            close()
            continue
        if current:
            last = segments[current[-1]]
            joined_chars = sum(display_len(segments[j].text.strip()) for j in current) + display_len(text)
            if (
                len(current) >= max_segments
                or joined_chars > max_chars
                or segment.speaker != last.speaker
                or segment.start - last.end > max_gap_s
            ):
                close()
        current.append(i)
        if ends_sentence(text):
            close()
    close()
    return units


def _pieces(text: str, separator: str) -> list[str]:
    return text.split() if separator else [c for c in clusters("".join(text.split())) if c]


def split_translation(translation: str, source_texts: list[str], separator: str = " ") -> list[str]:
    """`translation` of the joined `source_texts`, cut into len(source_texts) parts in order, each
    part's share of the translated text about its source text's share of the source, cut at word
    boundaries (grapheme clusters when `separator` is "", for scripts written without spaces).

    Each part gets at least one piece while pieces last; with fewer pieces than parts the last
    parts are empty. One source text gets the whole (whitespace-normalised) translation."""
    parts = len(source_texts)
    pieces = _pieces(translation, separator)
    if parts == 0:
        return []
    if parts == 1:
        return [separator.join(pieces)]
    weights = [max(display_len(t.strip()), 1) for t in source_texts]
    total_weight = sum(weights)
    lengths = [display_len(p) for p in pieces]
    total_len = sum(lengths)
    # ends[k]: cumulative translated length after piece k (the "cut after piece k" positions)
    ends, running = [], 0
    for length in lengths:
        running += length
        ends.append(running)

    cuts: list[int] = []  # cuts[k] = number of pieces in parts 0..k
    taken, cumulative_weight = 0, 0
    for k in range(parts - 1):
        cumulative_weight += weights[k]
        wanted = total_len * cumulative_weight / total_weight
        remaining_parts = parts - k - 1
        low = min(taken + 1, len(pieces))  # at least one piece for this part, if any are left
        high = max(low, len(pieces) - remaining_parts)  # leave one for each later part, if possible
        high = min(high, len(pieces))
        best = min(range(low, high + 1), key=lambda n: (abs((ends[n - 1] if n else 0) - wanted), n))
        cuts.append(best)
        taken = best
    cuts.append(len(pieces))
    out, previous = [], 0
    for cut in cuts:
        out.append(separator.join(pieces[previous:cut]))
        previous = cut
    return out
