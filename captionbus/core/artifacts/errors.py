"""What can go wrong with an artifact, and how to name one in a message a person reads."""
from __future__ import annotations

from captionbus.contracts.artifacts import ArtifactRef


class ArtifactError(RuntimeError):
    pass


class ArtifactMissing(ArtifactError, FileNotFoundError):
    """The bytes are neither under this host's local root nor in the object store."""


class ArtifactCorrupt(ArtifactError):
    """Bytes were found but their size or sha256 does not match the reference."""


class ArtifactStoreFull(ArtifactError):
    """No room for an artifact: a disk holding the local root is full, or the object store
    (its max_bytes, the account's or the server's JetStream storage) refused it. Retrying the
    same request will not help until space is freed (`captionbus gc`), so the runtime fails the
    request with this one line instead of redelivering it."""


def is_disk_full(error: BaseException) -> bool:
    import errno

    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe(ref: ArtifactRef) -> str:
    return f"artifact {ref.name!r} ({ref.key[:12]}…, {ref.size} bytes)"
