"""Text a person reads in an event or a status line."""
from __future__ import annotations

import re

REASON_MAX = 300  # characters of a failure reason in an event


def one_line(text: object, limit: int = REASON_MAX) -> str:
    """`text` on one line (every run of whitespace, newlines included, becomes one space),
    cut to `limit` characters with an ellipsis."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# A filesystem path in an error line: `/` or `~/` at the start of a word or right after a colon
# (`dir:/srv/cb`, ffmpeg's `file:/x`), or after `file://` (`file:///x`), then anything up to a
# space, a quote, a bracket or a separator. Not a URL's `//host` (a `/` followed by another, or
# after one), not the `/` inside a word (`and/or`, `MP2/3`, `text/plain`, `1/2`).
_PATH = re.compile(r"(?:(?<=file://)|(?<![\w./~-]))~?/(?=[^/\s'\"`()\[\]{}<>,;|])[^\s'\"`()\[\]{}<>,;|]*")


def without_paths(text: str) -> tuple[str, bool]:
    """`text` with each filesystem path cut to its last part (`/home/w/.captionbus/work/ab12/
    input.wav` -> `…/input.wav`), and whether any was cut. A stage's failure reason goes into the
    job's record and events, which API keys (the gateway) and bus tenants read: the worker's home,
    its user name, the layout of its artifact root and its model folders are the operator's, not
    theirs. The worker's log keeps the whole line."""
    def cut(found: re.Match) -> str:
        path = found.group(0)
        bare = path.rstrip("/.:")  # a sentence's full stop or colon after the path stays
        return f"…/{bare.rsplit('/', 1)[-1]}{path[len(bare):]}"

    cleaned = _PATH.sub(cut, text)
    return cleaned, cleaned != text
