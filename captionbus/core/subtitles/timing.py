"""When each cue shows: from the speech it carries to times that meet the rules.

Everything is integer ms on the rules' grid. Order, no overlap, the two-frame gap and the duration
bounds always hold; when the speech leaves no room for them (e.g. a one-word cue between two close
speakers) the cue drifts off its speech, and the engine reports that as a `sync` problem.
"""
from __future__ import annotations

import math
from typing import Sequence

from captionbus.core.subtitles.rules import Rules


def reading_need_ms(chars: int, rules: Rules) -> int:
    """How long `chars` characters must stay on screen: reading speed, within the duration bounds."""
    need = rules._up(chars * 1000.0 / rules.max_cps) if rules.max_cps > 0 else 0
    return min(max(need, rules.min_duration_ms), rules.max_duration_ms)


def place_cues(spans: Sequence[tuple[int, int]], chars: Sequence[int], rules: Rules,
               fps: float | None = None, lead_ms: float | None = None,
               after: int | None = None, then: float = math.inf) -> list[tuple[int, int]]:
    """spans[k]: (first word start, last word end) of cue k in ms, in order; returns (start, end) per cue.

    lead_ms: how early a cue may appear before its first word (default the rules' max_lead).
    after / then: where the cue before spans[0] ends and the speech after the last span starts,
    when the cues are placed a stretch at a time (engine._Layout); none / never by default."""
    gap, max_d = rules.min_gap_ms(fps), rules.max_duration_ms
    lead = rules._down(rules.max_lead * 1000 if lead_ms is None else lead_ms)
    lag = rules._down(rules.max_lag * 1000)
    delay = rules._down(rules.max_start_delay * 1000)
    out: list[tuple[int, int]] = []
    prev_end = after
    for k, (speech_start, speech_end) in enumerate(spans):
        need = reading_need_ms(chars[k], rules)
        next_speech = spans[k + 1][0] if k + 1 < len(spans) else then
        earliest = max(0, speech_start - lead)
        if prev_end is not None:
            earliest = max(earliest, prev_end + gap)
        start = max(speech_start, earliest)
        # Leave the next cue free to start with its speech.
        latest = min(speech_end + lag, next_speech - gap, start + max_d)
        end = min(max(speech_end, start + need), latest)
        if end - start < need:  # too short to read: show it earlier, within the lead
            start = max(earliest, end - need)
        if end - start < need:  # still too short: hold it a little into the next cue's speech
            end = max(end, min(start + need, speech_end + lag, next_speech + delay - gap))
        if end - start < rules.min_duration_ms:  # no room at all: keep the rules, lose sync
            end = start + rules.min_duration_ms
        out.append((int(start), int(end)))
        prev_end = int(end)
    return out
