"""API keys, stored hashed in a file: one `NAME SHA256HEX` line per key.

Why sha256 and not bcrypt/argon2: a key is 32 random bytes (`secrets.token_urlsafe(32)`), not a
password a person chose, so there is nothing to brute-force from a leaked hash, and a fast hash
keeps the per-request check in microseconds (bcrypt costs ~250 ms a request by design). The
plain key is printed once by `captionbus gateway add-key` and never stored.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from contracts.ids import validate_token

KEY_PREFIX = "cbk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    """name -> sha256 of the key."""

    hashes: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        hashes: dict[str, str] = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, digest = line.partition(" ")
            digest = digest.strip()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{path}:{number}: not `NAME SHA256HEX`")
            hashes[validate_token(name, "key name")] = digest
        return cls(hashes)

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


def add_key(path: Path, name: str) -> str:
    """Append a new key's hash to `path` (created 0600) and return the key itself."""
    validate_token(name, "key name")
    path = Path(path)
    if path.exists() and name in KeyRing.load(path).hashes:
        raise ValueError(f"a key named {name!r} is already in {path}; pick another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{name} {hash_key(key)}\n")
    return key
