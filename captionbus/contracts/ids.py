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


# Tenants (deploy/README.md, "Tenancy on the bus"): a client login of a fleet behind the auth
# callout acts for one tenant, and every subject and key of its jobs carries the tenant as a whole
# token, so NATS permissions can grant it that tenant's and nothing else. The job id carries it as
# its first part, `<tenant>_<rest>`, so whatever holds a job id (a worker, the coordinator, gc)
# derives the subjects and keys without being told. A job id without one (every job before
# tenants, and jobs of trusted roles: the gateway, `run` on one host) is of no tenant, NO_TENANT.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
_TENANT_RE = re.compile(TENANT_PATTERN)
NO_TENANT = "_"


def is_tenant(value: object) -> bool:
    return isinstance(value, str) and bool(_TENANT_RE.fullmatch(value))


def validate_tenant(value: str) -> str:
    if not is_tenant(value):
        raise ValueError(f"invalid tenant {value!r}: use 1-32 characters from a-z 0-9 - (not starting with -)")
    return value


def tenant_of(job_id: str) -> str:
    """The tenant a job id names (`acme_j18c…` -> `acme`), or NO_TENANT."""
    head, sep, _ = job_id.partition("_")
    return head if sep and is_tenant(head) else NO_TENANT


def new_job_id(tenant: str | None = None) -> str:
    # Sortable by creation time, unguessable enough to be a name.
    base = f"j{int(time.time() * 1000):x}-{secrets.token_hex(4)}"
    return f"{validate_tenant(tenant)}_{base}" if tenant and tenant != NO_TENANT else base
