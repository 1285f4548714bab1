"""Length as the eye sees it: extended grapheme clusters (Devanagari conjuncts, combining marks, emoji)."""
from __future__ import annotations

from functools import lru_cache

import regex

_CLUSTER = regex.compile(r"\X")


@lru_cache(maxsize=65536)
def display_len(text: str) -> int:
    """Grapheme clusters in `text`, line breaks not counted."""
    if text.isascii():
        return len(text) - text.count("\n")
    return sum(1 for c in _CLUSTER.findall(text) if c not in ("\n", "\r\n", "\r"))


def clusters(text: str) -> list[str]:
    return _CLUSTER.findall(text)
