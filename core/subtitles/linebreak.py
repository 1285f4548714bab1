"""Where to break: between cues and between the lines of a cue.

Costs are small numbers on one scale, shared by the cue segmenter (engine.py) and the line breaker,
so "after a comma" means the same thing to both.
"""
from __future__ import annotations

from typing import Sequence

from core.subtitles.graphemes import display_len
from core.subtitles.rules import Rules

SENTENCE = 0.0   # after . ? ! ।
CLAUSE = 0.5     # after , ; : –
BEFORE_CONJ = 1.0  # before "and", "because", "of" ...
PLAIN = 2.0      # between two ordinary words
GLUED = 5.0      # after "the", before a Hindi postposition: never split these if anything else fits

_CLOSERS = "\"'”’»)]"


def _last_mark(text: str) -> str:
    t = text.rstrip(_CLOSERS)
    return t[-1] if t else ""


def is_sentence_end(text: str, rules: Rules) -> bool:
    return _last_mark(text) in rules.sentence_end if text else False


def text_break_cost(prev: str, nxt: str, rules: Rules) -> float:
    """Cost of a break between the words `prev` and `nxt`, from their text alone."""
    mark = _last_mark(prev)
    if mark and mark in rules.sentence_end:
        return SENTENCE
    if mark and mark in rules.clause_end or nxt[:1] in "–—(":
        return CLAUSE
    p, n = prev.lower(), nxt.lower().strip("\"'“‘«(")
    if p in rules.no_break_after or n in rules.no_break_before:
        return GLUED
    if n in rules.break_before:
        return BEFORE_CONJ
    return PLAIN


def line_len(lengths: Sequence[int], a: int, b: int, sep: int) -> int:
    """Displayed length of words a..b-1 on one line."""
    return sum(lengths[a:b]) + sep * (b - a - 1)


def split_lines(lengths: Sequence[int], costs: Sequence[float], rules: Rules,
                sep: int) -> tuple[float, list[int]] | None:
    """Best line breaks for one cue.

    lengths[k]: displayed length of word k; costs[k] (k >= 1): cost of breaking before word k.
    Returns (cost, break positions) or None when the words cannot fit in max_lines lines.
    One line whenever it fits; otherwise lines balanced, the lower not much shorter.
    """
    n, width = len(lengths), rules.max_chars_per_line
    total = sum(lengths) + sep * (n - 1)
    if total <= width:
        return 0.0, []
    if n < 2 or rules.max_lines < 2:
        return None
    prefix = [0]
    for x in lengths:
        prefix.append(prefix[-1] + x)

    def span(a: int, b: int) -> int:
        return prefix[b] - prefix[a] + sep * (b - a - 1)

    def imbalance(upper: int, lower: int) -> float:
        d = (upper - lower) / width
        return 2.5 * d if d > 0 else -1.0 * d  # a short lower line reads worse

    if rules.max_lines == 2:  # the common case, linear
        best: tuple[float, list[int]] | None = None
        for k in range(1, n):
            a, b = span(0, k), span(k, n)
            if a > width or b > width:
                continue
            c = costs[k] + imbalance(a, b)
            if best is None or c < best[0]:
                best = (c, [k])
        return best
    # General case: DP over (words placed, lines used).
    inf = float("inf")
    dp = [[inf] * (rules.max_lines + 1) for _ in range(n + 1)]
    back: dict[tuple[int, int], int] = {}
    dp[0][0] = 0.0
    for b in range(1, n + 1):
        for lines in range(1, rules.max_lines + 1):
            for a in range(b - 1, -1, -1):
                if span(a, b) > width:
                    break
                if dp[a][lines - 1] == inf:
                    continue
                c = dp[a][lines - 1] + (costs[a] if a else 0.0)
                if c < dp[b][lines]:
                    dp[b][lines], back[b, lines] = c, a
    best_lines = lines = min(range(1, rules.max_lines + 1), key=lambda m: dp[n][m])
    if dp[n][lines] == inf:
        return None
    cuts, b = [], n
    while lines > 0:
        a = back[b, lines]
        if a:
            cuts.append(a)
        b, lines = a, lines - 1
    return dp[n][best_lines], sorted(cuts)


def join_lines(texts: Sequence[str], breaks: Sequence[int], sep: str) -> list[str]:
    edges = [0, *breaks, len(texts)]
    return [sep.join(texts[a:b]) for a, b in zip(edges, edges[1:])]


def break_text(texts: Sequence[str], rules: Rules) -> list[str]:
    """Lines for a known set of words (used on re-flow); over-long input stays on its lines, unbroken."""
    sep = rules.word_separator
    lengths = [display_len(t) for t in texts]
    costs = [0.0] + [text_break_cost(texts[k - 1], texts[k], rules) for k in range(1, len(texts))]
    found = split_lines(lengths, costs, rules, display_len(sep))
    if found is None:
        return [sep.join(texts)]
    return join_lines(texts, found[1], sep)
