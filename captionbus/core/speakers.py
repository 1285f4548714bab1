"""Words to speakers: each word takes the speaker of the turn that covers most of it, each segment
the speaker most of its words have (issue 21). Pure Python on the contracts' models, so the
transcript_join stage (env common) and the diarization library share one rule.

The rule, word by word (turns sorted by start, as the diarization stage writes them):
- the turn with the largest overlap wins; on a tie (a word exactly across a change of speaker)
  the earlier turn wins, the speaker who was talking when the word began;
- a zero-length word takes the turn it lies in (its start inside [start, end]);
- a word no turn touches (speech the VAD cut short, a word in a pause) takes the nearest turn
  within `max_gap_s` (0.5 s), else no speaker (None): a guess across a long pause would put a word
  in the wrong mouth;
- a word without times (the recogniser gave none) gets no speaker.
A segment's speaker is the one its words carry for the most seconds (ties: the earliest speaker
among its words); a segment without timed words takes the turn covering most of the segment.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from captionbus.contracts.transcript import Segment, Transcript

MAX_GAP_S = 0.5


class TurnLike(Protocol):
    start: float
    end: float
    speaker: str


def speaker_of(start: float | None, end: float | None, turns: Sequence[TurnLike],
               max_gap_s: float = MAX_GAP_S) -> str | None:
    """The speaker of the span [start, end] by the rule above (None: unknown)."""
    if start is None or end is None or not turns:
        return None
    a, b = float(start), max(float(start), float(end))
    best, best_overlap = None, 0.0
    for turn in turns:
        overlap = min(turn.end, b) - max(turn.start, a)
        if overlap > best_overlap:  # strictly more: on a tie the earlier turn stays
            best, best_overlap = turn, overlap
    if best is not None:
        return best.speaker
    if a == b:
        inside = next((t for t in turns if t.start <= a <= t.end), None)
        if inside is not None:
            return inside.speaker
    nearest = min(turns, key=lambda t: max(t.start - b, a - t.end))
    return nearest.speaker if max(nearest.start - b, a - nearest.end) <= max_gap_s else None


def assign_segment(segment: Segment, turns: Sequence[TurnLike], max_gap_s: float = MAX_GAP_S) -> Segment:
    """The segment with a speaker on each word and on itself."""
    words = [w.model_copy(update={"speaker": speaker_of(w.start, w.end, turns, max_gap_s)}) for w in segment.words]
    seconds: dict[str, float] = {}
    for word in words:
        if word.speaker is not None:
            seconds[word.speaker] = seconds.get(word.speaker, 0.0) + max(word.end - word.start, 1e-3)
    if seconds:
        speaker = max(seconds, key=lambda s: seconds[s])  # dicts keep first-seen order: ties go earliest
    else:
        speaker = speaker_of(segment.start, segment.end, turns, max_gap_s)
    return segment.model_copy(update={"words": words, "speaker": speaker})


def assign_speakers(transcript: Transcript, turns: Sequence[TurnLike], max_gap_s: float = MAX_GAP_S) -> Transcript:
    """The transcript with speakers on its words and segments (turns in time order)."""
    turns = sorted(turns, key=lambda t: (t.start, t.end))
    return transcript.model_copy(update={"segments": [assign_segment(s, turns, max_gap_s) for s in transcript.segments]})
