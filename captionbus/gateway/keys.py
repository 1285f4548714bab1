"""API keys, stored hashed in a file: one `NAME SHA256HEX [admin|metrics]` line per key.

A key sees and acts on the jobs it submitted (the job's `spec.owner` is the key's name) and no
others: another key's job id answers 404, as an unknown one does, on every route (status, list,
events, outputs, webhooks, cancel, retry). A key marked `admin` (`add-key NAME --admin`) sees and
acts on every job, including those submitted through the CLI (which have no owner). A key marked
`metrics` (`add-key NAME --metrics`, for a Prometheus scraper) reads `/metrics` and nothing else;
`/metrics` counts every key's requests and deliveries, so an ordinary key may not read it (an
admin key may): a scraper's credential is then worth nothing but the counters if it leaks.

Which key a job belongs to is `JobSpec.owner`, a name any bus client that may submit could write
(the CLI's `client` login, a tenant). So the gateway trusts a job's owner only with its proof,
`JobSpec.owner_proof`: an HMAC-SHA256 of the job id and what it asks for (`proof_message`) keyed by
that key's stored hash, made at submit time. Only a holder of the keys file (a gateway) or of the key itself (its owner, who gains nothing)
can make one; a job with an owner and no valid proof belongs to no key (admin keys see it, its
webhook deliveries name no owner), and the gateway logs it. A key made again under the same name
(a new secret) no longer proves the old key's jobs: they become admin-only, as a revoked key's should.

So the keys file is a secret of the gateway's: its hashes let no one in, but whoever reads it
can make any key's owner proofs (and so give a job it submits on the bus to any key).

Why sha256 and not bcrypt/argon2: a key is 32 random bytes (`secrets.token_urlsafe(32)`), not a
password a person chose, so there is nothing to brute-force from a leaked hash, and a fast hash
keeps the per-request check in microseconds (bcrypt costs ~250 ms a request by design). The
plain key is printed once by `captionbus gateway add-key` and never stored.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from captionbus.contracts import JobSpec
from captionbus.contracts.ids import validate_token

KEY_PREFIX = "cbk_"


def proof_message(spec: JobSpec) -> bytes:
    """What an owner proof signs: the job's id and what it asks for (its submit time, input,
    workflow, languages, options), so a proof copied onto another job, or onto a job submitted
    again under a gc'd job's id with other work, proves nothing. Named fields rather than the
    whole spec's JSON: a field a later version adds to JobSpec must not unprove every job."""
    return json.dumps(["captionbus-owner", spec.job_id, f"{spec.submitted_at.timestamp():.6f}", spec.input.key,
                       spec.workflow, spec.source_language, spec.target_languages, spec.options],
                      sort_keys=True, separators=(",", ":"), default=str).encode()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


ADMIN = "admin"
METRICS = "metrics"


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: a key's name, whether that key may see every job (`admin`), and
    whether it is a scraper's key, which reads /metrics and nothing else (`metrics_only`)."""

    name: str
    admin: bool = False
    metrics_only: bool = False

    def may_see(self, owner: str | None) -> bool:
        return self.admin or (owner is not None and owner == self.name)


@dataclass(frozen=True)
class KeyRing:
    """name -> sha256 of the key; `admins`: the names marked admin; `scrapers`: those marked metrics."""

    hashes: dict[str, str]
    admins: frozenset[str] = frozenset()
    scrapers: frozenset[str] = frozenset()

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        hashes: dict[str, str] = {}
        marked: dict[str, set[str]] = {ADMIN: set(), METRICS: set()}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, digest, *marks = [*line.split(), ""][:2] + line.split()[2:]
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or marks not in ([], [ADMIN], [METRICS]):
                raise ValueError(f"{path}:{number}: not `NAME SHA256HEX`, `NAME SHA256HEX admin` or `NAME SHA256HEX metrics`")
            hashes[validate_token(name, "key name")] = digest
            if marks:
                marked[marks[0]].add(name)
        return cls(hashes, frozenset(marked[ADMIN]), frozenset(marked[METRICS]))

    def who(self, key: str | None) -> str | None:
        """The key's name, or None; compares every hash in constant time."""
        if not key:
            return None
        digest = hash_key(key)
        found = None
        for name, stored in self.hashes.items():
            if hmac.compare_digest(stored, digest):
                found = name
        return found

    def proof(self, name: str, spec: JobSpec) -> str:
        """The owner proof of `spec` for key `name` (JobSpec.owner_proof; module docstring)."""
        return hmac.new(bytes.fromhex(self.hashes[name]), proof_message(spec), hashlib.sha256).hexdigest()

    def owner(self, spec: JobSpec) -> str | None:
        """`spec.owner` when `spec.owner_proof` proves it (a key of this ring made it for this
        very job), else None."""
        owner, proof = spec.owner, spec.owner_proof
        if owner is None or not isinstance(proof, str) or owner not in self.hashes:
            return None
        return owner if hmac.compare_digest(self.proof(owner, spec), proof) else None

    def caller(self, key: str | None) -> Caller | None:
        name = self.who(key)
        return None if name is None else Caller(name, admin=name in self.admins, metrics_only=name in self.scrapers)


def add_key(path: Path, name: str, admin: bool = False, metrics: bool = False) -> str:
    """Append a new key's hash to `path` (created 0600) and return the key itself; `admin`: the
    key sees and acts on every job, not only its own; `metrics`: it reads /metrics only."""
    validate_token(name, "key name")
    if admin and metrics:
        raise ValueError("a key is admin or metrics, not both (a scraper needs no jobs)")
    path = Path(path)
    if path.exists() and name in KeyRing.load(path).hashes:
        raise ValueError(f"a key named {name!r} is already in {path}; pick another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        mark = f" {ADMIN}" if admin else f" {METRICS}" if metrics else ""
        f.write(f"{name} {hash_key(key)}{mark}\n")
    return key
