"""Download links for a job's outputs on its page: off unless the operator asks for them.

Secure default: the `dashboard` role (deploy/nats/roles.conf) reads job state, events, queues and
$SRV, not artifact bytes, and the page never offers what its credentials cannot read. With
`captionbus dashboard --downloads` it probes, at start, whether they can: a local artifact root
it can read (one host), or the object store through the `dashboard_downloads` role (the
dashboard's reads plus object-store reads, no writes). Only then does a job page link its outputs;
otherwise it says why there are none. A link serves only an output the job's state names (never
a key from the URL), as an attachment (an HTML output never runs in the dashboard's origin).

Streamed, not held: a local artifact is sent from its file in chunks; an object-store artifact
is fetched chunk by chunk to a private temporary file (ArtifactStore.fetch_to: checked against its
key, one chunk in memory at a time), sent from there and removed afterwards. The first byte
therefore waits for the fetch (~100 MB/s from the object store here), the memory does not grow.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import structlog

from captionbus.contracts.ids import tenant_of
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.settings import Settings

log = structlog.get_logger("captionbus.dashboard")

PROBE_KEY = "0" * 64  # an object nobody stores: "not found" means the read was allowed
PROBE_TIMEOUT_S = 3.0


class Downloads:
    def __init__(self, store: ArtifactStore | None = None, reason: str = "downloads are off: start the dashboard "
                 "with --downloads and credentials that may read artifacts"):
        self.store = store
        self.reason = "" if store is not None else reason

    @property
    def enabled(self) -> bool:
        return self.store is not None

    @classmethod
    async def probe(cls, js: Any, settings: Settings) -> "Downloads":
        store = ArtifactStore(settings, js)
        if not store.use_object_store:
            root = Path(settings.artifacts_dir)
            if root.is_dir() and os.access(root, os.R_OK | os.X_OK):
                return cls(store)
            return cls(reason=f"downloads are off: the artifact root {root} is not readable here")
        try:
            await asyncio.wait_for(store.objects.info(PROBE_KEY), PROBE_TIMEOUT_S)
        except Exception as e:  # a permissions violation shows as a timeout or an error reply
            log.warning("downloads off: this NATS user may not read the object store", error=f"{type(e).__name__}: {e}")
            return cls(reason="downloads are off: the dashboard's NATS user may not read the object store "
                              "(give it the dashboard_downloads role, deploy/nats/roles.conf)")
        return cls(store)

    async def open(self, ref: Any, job_id: str) -> tuple[Path, Path | None]:
        """(a file with the artifact's bytes, a temporary folder to remove after sending or None);
        job `job_id`'s artifact, in its tenant's namespace of the object store."""
        assert self.store is not None
        store = self.store.scoped(tenant_of(job_id))
        local = store.local_path(ref)
        if local is not None:
            return local, None
        tmp = Path(tempfile.mkdtemp(prefix="captionbus-download-"))
        try:
            return await store.fetch_to(ref, tmp / "artifact"), tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
