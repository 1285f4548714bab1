"""Text a person reads in an event or a status line."""
from __future__ import annotations

REASON_MAX = 300  # characters of a failure reason in an event


def one_line(text: object, limit: int = REASON_MAX) -> str:
    """`text` on one line (every run of whitespace, newlines included, becomes one space),
    cut to `limit` characters with an ellipsis."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
