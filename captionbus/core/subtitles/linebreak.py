"""Where to break: between cues and between the lines of a cue.

Costs are small numbers on one scale, shared by the cue segmenter (engine.py) and the line breaker,
so "after a comma" means the same thing to both.
"""
from __future__ import annotations

from itertools import pairwise
from typing import Sequence

from captionbus.core.subtitles.graphemes import display_len
from captionbus.core.subtitles.rules import Rules

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


_HYPHENS = "-\u2010"  # hyphen-minus, hyphen (not the dashes – —, which are clause marks)
HYPHEN = PLAIN + 0.5  # after the hyphen of a compound: allowed, but a space is better


def is_hyphen_continuation(prev: str, nxt: str) -> bool:
    """`nxt` carries on `prev` across a hyphen: Whisper merges a hyphen into the word after it
    (its prepend punctuation), so "Inter-Asterisk" arrives as the words "Inter", "-Asterisk"."""
    return (len(nxt) > 1 and nxt[0] in _HYPHENS and nxt[1].isalnum() and prev[-1:].isalnum())


def hyphen_pieces(texts: Sequence[str]) -> tuple[list[str], list[int], list[bool]]:
    """Words as the pieces a line may break between. A compound breaks after its hyphen, which
    stays on the upper line ("Inter-" / "Asterisk"), never before it ("Inter" / "-Asterisk").

    Returns (pieces, owner: the word each piece comes from, glued: piece k follows piece k-1
    with no separator)."""
    pieces: list[str] = []
    owner: list[int] = []
    glued: list[bool] = []
    for w, text in enumerate(texts):
        parts: list[str] = []
        current = ""
        for pos, ch in enumerate(text):
            current += ch
            # inside a word: letter/digit, hyphen, letter/digit
            if (ch in _HYPHENS and 0 < pos < len(text) - 1 and text[pos - 1].isalnum()
                    and text[pos + 1].isalnum()):
                parts.append(current)
                current = ""
        parts.append(current)
        if w and pieces and is_hyphen_continuation(texts[w - 1], text):
            pieces[-1] += text[0]  # the leading hyphen goes up to the word it joins
            parts[0] = parts[0][1:]
            attach = True
        else:
            attach = False
        for k, part in enumerate(parts):
            pieces.append(part)
            owner.append(w)
            glued.append(attach if k == 0 else True)
    return pieces, owner, glued


def text_break_cost(prev: str, nxt: str, rules: Rules) -> float:
    """Cost of a break between the words `prev` and `nxt`, from their text alone."""
    if is_hyphen_continuation(prev, nxt):
        return GLUED  # one compound word: a cue never ends inside it
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
                sep: int, glued: Sequence[bool] | None = None) -> tuple[float, list[int]] | None:
    """Best line breaks for one cue.

    lengths[k]: displayed length of word k; costs[k] (k >= 1): cost of breaking before word k;
    glued[k]: word k follows word k-1 with no separator (a compound's pieces).
    Returns (cost, break positions) or None when the words cannot fit in max_lines lines.
    One line whenever it fits; otherwise lines balanced, the lower not much shorter.
    """
    n, width = len(lengths), rules.max_chars_per_line
    prefix = [0]
    for x in lengths:
        prefix.append(prefix[-1] + x)
    joints = [0, 0]  # joints[k]: glued joints among words 1..k-1
    for k in range(1, n):
        joints.append(joints[-1] + (1 if glued and glued[k] else 0))

    def span(a: int, b: int) -> int:
        return prefix[b] - prefix[a] + sep * (b - a - 1 - (joints[b] - joints[a + 1]))

    if span(0, n) <= width:
        return 0.0, []
    if n < 2 or rules.max_lines < 2:
        return None

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


def join_lines(texts: Sequence[str], breaks: Sequence[int], sep: str,
               glued: Sequence[bool] | None = None) -> list[str]:
    edges = [0, *breaks, len(texts)]
    lines = []
    for a, b in pairwise(edges):
        line = texts[a] if b > a else ""
        for k in range(a + 1, b):
            line += ("" if glued and glued[k] else sep) + texts[k]
        lines.append(line)
    return lines


def lay_lines(texts: Sequence[str], costs: Sequence[float], rules: Rules) -> list[str] | None:
    """The lines of one cue: `texts` its words, costs[k] (k >= 1) the cost of a break before word k.
    Compounds may break after a hyphen (hyphen_pieces). None when they cannot fit."""
    pieces, owner, glued = hyphen_pieces(texts)
    piece_costs = [0.0] + [HYPHEN if glued[k] else costs[owner[k]] for k in range(1, len(pieces))]
    sep = rules.word_separator
    found = split_lines([display_len(p) for p in pieces], piece_costs, rules, display_len(sep), glued)
    if found is None:
        return None
    return join_lines(pieces, found[1], sep, glued)


def break_text(texts: Sequence[str], rules: Rules) -> list[str]:
    """Lines for a known set of words (used on re-flow); over-long input stays on its lines, unbroken."""
    costs = [0.0] + [text_break_cost(texts[k - 1], texts[k], rules) for k in range(1, len(texts))]
    lines = lay_lines(texts, costs, rules)
    if lines is None:
        pieces, _, glued = hyphen_pieces(texts)
        return join_lines(pieces, [], rules.word_separator, glued)
    return lines
