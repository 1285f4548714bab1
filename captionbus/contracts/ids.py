"""Identifiers that end up in NATS subject tokens, KV keys and directory names.

One rule for all of them: a short run of [A-Za-z0-9_-]. No dots (subject separators),
no '*' or '>' (wildcards), no '/' or '..' (paths), no whitespace.
"""
from __future__ import annotations

import re
import secrets
import time
from typing import Annotated

from pydantic import StringConstraints

TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # fullmatch: "$" alone allows a trailing newline
JOB_ID_PATTERN = TOKEN_PATTERN
_TOKEN_RE = re.compile(TOKEN_PATTERN)

Token = Annotated[str, StringConstraints(pattern=TOKEN_PATTERN)]
JobId = Token
StageName = Token
# A node of a workflow graph: a stage name, or "<name>-<lang>" for a fanned-out branch.
NodeId = Token


def validate_token(value: str, what: str = "identifier") -> str:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ -"
        )
    return value


def new_job_id() -> str:
    # Sortable by creation time, unguessable enough to be a name.
    return f"j{int(time.time() * 1000):x}-{secrets.token_hex(4)}"
