"""Artifacts: files addressed by the sha256 of their bytes, behind one interface.

Two places hold them:
- the local root, `settings.artifacts_dir/<key[:2]>/<key>`: producer and consumer on one host
  hand over a path (a hardlink when possible, never a copy through the bus);
- the JetStream object store bucket `ARTIFACTS_BUCKET`, object name = key: across hosts
  (upload and fetch in `captionbus.core.artifacts.transfer`, a faster fetch in `captionbus.core.artifacts.direct`).

Content addressing makes both a cache: an object already present (same name and size) is not
uploaded again, and a fetched object lands in the local root so the next `get` is a file open.

Nothing here ever holds a whole file in memory: hashing, copying, uploading and fetching
all go through fixed-size buffers.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import os
import secrets
import shutil
import time
from copy import copy as shallow_copy
from pathlib import Path

import structlog
from nats.js import JetStreamContext, api

from captionbus.contracts.artifacts import ArtifactRef
from captionbus.contracts.ids import NO_TENANT
from captionbus.contracts.subjects import ARTIFACTS_BUCKET
from captionbus.core.artifacts import direct
from captionbus.core.artifacts.errors import (
    ArtifactCorrupt,
    ArtifactError,
    ArtifactMissing,
    ArtifactStoreFull,
    describe,
    is_disk_full,
)
from captionbus.core.artifacts.transfer import ChunkReader, DiskSink, ObjectBucket, Resume, digest_hex
from captionbus.core.settings import Settings

log = structlog.get_logger("captionbus.artifacts")

IO_BUFFER = 1024 * 1024  # local hashing/copying
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_NAME_MAX = 200  # ArtifactRef.name limit
READ_CHECK_TIMEOUT_S = 2.0  # a refused request gets no reply: this long to tell "not allowed"
FETCH_ATTEMPTS = 5  # readers per fetch: the first, and resumes after a lost chunk or a stall


def safe_name(name: str | None, fallback: str = "artifact") -> str:
    """A file name that is never a path: last component only, no separators or NULs,
    not '.'/'..', at most 200 characters (keeping the extension). `ref.name` comes from
    other processes and is untrusted."""
    name = (name or "").replace("\\", "/").split("/")[-1]
    name = "".join(c for c in name if c >= " " and c != "\x7f")
    name = name.strip()
    if name in ("", ".", ".."):
        name = fallback
    if len(name) > _NAME_MAX:
        stem, dot, ext = name.rpartition(".")
        ext = ext if dot and len(ext) <= 16 else ""
        name = stem[: _NAME_MAX - len(ext) - 1] + "." + ext if ext else name[:_NAME_MAX]
    return name


def hash_file(path: Path) -> tuple[str, int]:
    """sha256 hex and size, streamed."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(IO_BUFFER)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


def _copy_hashing(src: Path, dst: Path) -> tuple[str, int]:
    """Copy src to dst and hash in the same pass (one read of the source)."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(IO_BUFFER)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while n := fin.readinto(buf):
            h.update(view[:n])
            out = view[:n]
            while out:  # an unbuffered write may be short (a disk filling up): never drop the rest
                out = out[fout.write(out):]
            size += n
    return h.hexdigest(), size


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class ArtifactStore:
    """put/get artifacts by content; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        js: JetStreamContext | None,
        *,
        use_object_store: bool | None = None,
    ):
        self.settings = settings
        self.js = js
        self.use_object_store = settings.use_object_store() if use_object_store is None else use_object_store
        if self.use_object_store and js is None:
            raise ArtifactError("the object store needs a JetStream context (js=None given)")
        self.root = Path(settings.artifacts_dir)
        self.objects = ObjectBucket(js, ARTIFACTS_BUCKET) if js is not None else None
        self.tenant: str | None = None
        # Fetch with direct.DirectReader where it can; False, or a connection or nats-py
        # version it does not speak, reads through nats-py (transfer.ChunkReader).
        self.direct_fetch = True
        self._readable = False  # has our bus user been answered a lookup on the object store? (_check_readable)
        self._sweep_tmp()

    def scoped(self, tenant: str | None, restricted: bool = False) -> ArtifactStore:
        """This store in `tenant`'s namespace of the object store (transfer.py, "Tenants"): what
        a tenant's jobs read and write there. restricted: as that tenant's own client, which may
        read its namespace only through consumers. The same store for no tenant (None or
        NO_TENANT, what `tenant_of` says of a job id without one)."""
        tenant = None if tenant in (None, "", NO_TENANT) else tenant
        if self.objects is None or (not restricted and tenant == self.tenant):
            return self
        view = shallow_copy(self)
        view.objects = self.objects.scoped(tenant, restricted)
        view.tenant, view._readable = tenant, False
        return view

    # ---- local root -------------------------------------------------------------------

    def _key_path(self, key: str) -> Path:
        # The key is validated by ArtifactRef (64 hex); check again, since this builds a path.
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ArtifactError(f"not a sha256 key: {key!r}")
        return self.root / key[:2] / key

    def _sweep_tmp(self, max_age_s: float = 24 * 3600) -> None:
        """Remove temp files a crashed process left behind (old enough to be nobody's)."""
        cutoff = time.time() - max_age_s
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / ".tmp"):
                with contextlib.suppress(OSError):
                    if entry.name.endswith(".part") and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)

    def _tmp_path(self, key: str) -> Path:
        # Temp files live under the root so os.replace into place is atomic (same filesystem).
        tmp_dir = self.root / ".tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        return tmp_dir / f"{key[:16]}.{os.getpid()}.{secrets.token_hex(4)}.part"

    def local_path(self, ref: ArtifactRef) -> Path | None:
        """The file under this host's local root, if it is there with the right size."""
        path = self._key_path(ref.key)
        try:
            if path.stat().st_size == ref.size:
                return path
        except FileNotFoundError:
            return None
        # Wrong size: a torn or tampered file. Drop it so a fetch can replace it.
        log.warning("dropping local artifact with wrong size", key=ref.key, path=str(path))
        _unlink(path)
        return None

    async def exists(self, ref: ArtifactRef) -> bool:
        """Whether `get(ref)` can succeed from here: on this host's root, or in the object store."""
        if self.local_path(ref) is not None:
            return True
        if self.objects is None:
            return False
        info = await self.objects.info(ref.key)
        return info is not None and info.size == ref.size

    def _ingest(self, src: Path, copy: bool = False) -> tuple[str, int, Path]:
        """Bring `src` into the local root: hardlink if we can (and may), else copy; hash on the way."""
        src_stat = os.stat(src)
        tmp = self._tmp_path(f"{src_stat.st_ino:016x}")
        try:
            try:
                if copy:
                    raise OSError("a copy was asked for")
                os.link(src, tmp)  # same inode, no bytes copied
                key, size = hash_file(tmp)
            except OSError as e:
                # EXDEV: another filesystem; EPERM/EACCES: protected_hardlinks; others: no links.
                log.debug("hardlink not possible, copying", src=str(src), error=str(e))
                _unlink(tmp)
                key, size = _copy_hashing(src, tmp)
            final = self._key_path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists() and final.stat().st_size == size:
                # Already there: content addressing makes this a hit. Its time now says "just
                # written" again, so the GC's grace period (captionbus/core/gc.py) covers it until the job
                # that stores it again references it.
                with contextlib.suppress(OSError):
                    os.utime(final)
                return key, size, final
            os.replace(tmp, final)
            return key, size, final
        finally:
            _unlink(tmp)

    def _materialise(self, src: Path, dest_dir: Path, name: str) -> Path:
        """A named view of a root file in dest_dir (hardlink, else copy), atomically."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / safe_name(name)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samefile(src, target):
                return target
        tmp = dest_dir / f".{target.name[:64]}.{secrets.token_hex(4)}.part"
        try:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        finally:
            _unlink(tmp)
        return target

    # ---- put ----------------------------------------------------------------------------

    async def put(
        self, path: Path, *, name: str | None = None, media_type: str | None = None, copy: bool = False
    ) -> ArtifactRef:
        """Store `path`. `copy=True` for files someone else owns (a user's input may be edited
        in place later; a hardlinked root file would change with it). Stage outputs in a work
        dir that is deleted afterwards can be linked."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"cannot store {path}: not a regular file")
        name = safe_name(name or path.name)
        # Hashing a film takes seconds: keep the event loop (heartbeats) free meanwhile.
        try:
            key, size, local = await asyncio.to_thread(self._ingest, path, copy)
        except OSError as e:
            if is_disk_full(e):
                raise self._disk_full(f"{path.name!r} ({path.stat().st_size} bytes)", e) from None
            raise
        ref = ArtifactRef(
            key=key,
            name=name,
            size=size,
            media_type=media_type or mimetypes.guess_type(name)[0],
            origin_host=self.settings.host_id,
        )
        if self.use_object_store:
            await self.objects.upload(local, ref)
            ref = ref.model_copy(update={"in_object_store": True})
        log.debug("artifact stored", key=key, name=name, size=size, object_store=ref.in_object_store)
        return ref

    # ---- get ----------------------------------------------------------------------------

    async def get(self, ref: ArtifactRef, dest_dir: Path | None = None) -> Path:
        """A local path holding the artifact's bytes; treat it as read-only.

        Without `dest_dir` that is the file in this host's local root. With `dest_dir`, it
        is `dest_dir/<sanitised ref.name>` (a hardlink to the root file, else a copy), for
        tools that care about the file name; an existing file of that name is replaced.
        """
        path = self.local_path(ref)
        if path is not None:
            await self._check_readable(ref)
        try:
            if path is None:
                path = await self._fetch(ref)
            if dest_dir is not None:
                return await asyncio.to_thread(self._materialise, path, Path(dest_dir), ref.name)
        except OSError as e:
            if is_disk_full(e):
                raise self._disk_full(describe(ref), e) from None
            raise
        return path

    def _disk_full(self, what: str, error: OSError) -> ArtifactStoreFull:
        return ArtifactStoreFull(f"artifact store full: no space on the disk of {self.root} for {what} "
                                 f"({error.strerror}); free space with `captionbus gc`")

    async def _check_readable(self, ref: ArtifactRef) -> None:
        """With the object store (a fleet, where the bus has users and roles) a file under the
        local root is served only to a process whose bus user may read the artifact store: a
        root filled by another process (a worker on the same host) must not hand the dashboard
        user what the bus refuses it. Asked once per store: a metadata lookup on the bucket,
        which a user without the right gets no answer to (the server logs a violation)."""
        if not self.use_object_store or self._readable:
            return
        try:
            await asyncio.wait_for(self.objects.info(ref.key), READ_CHECK_TIMEOUT_S)
            self._readable = True  # asked and answered: this user may read the bucket
            return
        except Exception as e:  # a permissions violation shows as no reply (a timeout); not cached
            log.debug("artifact read check failed", error=str(e) or type(e).__name__)
            raise ArtifactError(
                f"{describe(ref)}: this process's NATS user may not read the artifact store "
                f"(no answer to a lookup on bucket {self.objects.name!r}), so the copy under "
                f"{self.root} is not served either") from None

    async def fetch_to(self, ref: ArtifactRef, path: Path) -> Path:
        """The artifact's bytes at `path` (outside this host's root; the caller removes it), or
        the file in the local root when it is there already. Chunks go to disk as they arrive
        and are checked against the key: a reader that must not keep a copy (the dashboard's
        downloads) holds one chunk at a time in memory, never the file."""
        local = self.local_path(ref)
        if local is not None:
            await self._check_readable(ref)
            return local
        info = await self._object_info(ref)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = await self._read_chunks(info, path, ref)
        if digest != ref.key:
            _unlink(path)
            raise ArtifactCorrupt(f"{describe(ref)}: fetched bytes hash to {digest[:12]}…, not the key")
        return path

    async def _object_info(self, ref: ArtifactRef) -> api.ObjectInfo:
        where = f"this host's artifact root ({self.root})"
        if not ref.in_object_store:
            raise ArtifactMissing(
                f"{describe(ref)} is not in {where} and was never uploaded to the object store "
                f"(it was made on host {ref.origin_host!r} with local artifacts only; "
                "run every host with CAPTIONBUS_ARTIFACTS=object to share artifacts over NATS)"
            )
        if self.objects is None:
            raise ArtifactMissing(f"{describe(ref)} is not in {where}, and there is no bus to fetch it from")
        info = await self.objects.info(ref.key)
        if info is None:
            raise ArtifactMissing(f"{describe(ref)} is not in {where} nor in object store bucket {self.objects.name!r}")
        if info.size != ref.size or digest_hex(info) != ref.key:
            raise ArtifactCorrupt(
                f"{describe(ref)}: the object store holds other bytes under this key "
                f"({info.size} bytes, sha256 {(digest_hex(info) or '?')[:12]}…)"
            )
        return info

    async def _fetch(self, ref: ArtifactRef) -> Path:
        info = await self._object_info(ref)
        final = self._key_path(ref.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_path(ref.key)
        try:
            t0 = time.perf_counter()
            digest = await self._read_chunks(info, tmp, ref)
            if digest != ref.key:
                raise ArtifactCorrupt(f"{describe(ref)}: fetched bytes hash to {digest[:12]}…, not the key")
            os.replace(tmp, final)
        finally:
            _unlink(tmp)
        elapsed = time.perf_counter() - t0
        log.debug("artifact fetched", key=ref.key, size=ref.size, seconds=round(elapsed, 3))
        return final

    async def _read_chunks(self, info: api.ObjectInfo, tmp: Path, ref: ArtifactRef) -> str:
        """Stream the object's chunks into `tmp`; returns the sha256 hex of what was written.

        An ephemeral push consumer with flow control: the server sends as fast as we
        acknowledge flow-control requests, and we answer each one right after writing the
        chunks before it, so the window never outruns the disk. If a chunk goes missing
        (a dropped message shows as a consumer-sequence gap) or the stream stalls, we resume
        with a fresh consumer from the last stream sequence we wrote.
        """
        written = 0
        last_sseq = 0
        with DiskSink(tmp) as sink:
            if info.size == 0:
                return sink.finish()
            use_direct = self.direct_fetch
            for attempt in range(FETCH_ATTEMPTS):
                reader = None
                if use_direct:
                    try:
                        reader = direct.DirectReader(self.objects, info, sink, written, last_sseq)
                    except direct.DirectUnavailable as e:
                        log.debug("direct fetch not possible; reading through nats-py", reason=str(e))
                        use_direct = False
                if reader is None:
                    reader = ChunkReader(self.objects, info, sink, written, last_sseq)
                try:
                    await reader.run()
                    return sink.finish()
                except direct.DirectUnavailable as e:
                    log.debug("direct fetch not possible; reading through nats-py", reason=str(e))
                    use_direct = False
                    written, last_sseq = reader.written, reader.last_sseq
                except Resume as r:
                    written, last_sseq = reader.written, reader.last_sseq
                    log.warning("artifact fetch resuming", key=ref.key, at=written, reason=str(r), attempt=attempt)
        raise ArtifactError(f"{describe(ref)}: fetch from the object store kept stalling; giving up")
