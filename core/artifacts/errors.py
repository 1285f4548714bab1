"""What can go wrong with an artifact, and how to name one in a message a person reads."""
from __future__ import annotations

from contracts.artifacts import ArtifactRef


class ArtifactError(RuntimeError):
    pass


class ArtifactMissing(ArtifactError, FileNotFoundError):
    """The bytes are neither under this host's local root nor in the object store."""


class ArtifactCorrupt(ArtifactError):
    """Bytes were found but their size or sha256 does not match the reference."""


def describe(ref: ArtifactRef) -> str:
    return f"artifact {ref.name!r} ({ref.key[:12]}…, {ref.size} bytes)"
