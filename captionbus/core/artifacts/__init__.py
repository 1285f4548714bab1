"""Artifacts: files addressed by the sha256 of their bytes (see `store` for the design).

- `store`: `ArtifactStore` (the put/get interface) and the local content-addressed root;
- `transfer`: the JetStream object store: upload, and the chunk reader on nats-py's connection;
- `direct`: a faster chunk reader on a raw socket of its own, for the nats-py it was written for.
"""
from captionbus.core.artifacts.errors import ArtifactCorrupt, ArtifactError, ArtifactMissing, ArtifactStoreFull, describe
from captionbus.core.artifacts.store import EMPTY_SHA256, IO_BUFFER, ArtifactStore, hash_file, safe_name
from captionbus.core.artifacts.transfer import CHUNK_SIZE

__all__ = [
    "CHUNK_SIZE",
    "EMPTY_SHA256",
    "IO_BUFFER",
    "ArtifactCorrupt",
    "ArtifactError",
    "ArtifactMissing",
    "ArtifactStoreFull",
    "ArtifactStore",
    "describe",
    "hash_file",
    "safe_name",
]
