"""Artifacts: files addressed by the sha256 of their bytes, behind one interface.

Two places hold them:
- the local root, `settings.artifacts_dir/<key[:2]>/<key>`: producer and consumer on one host
  hand over a path (a hardlink when possible, never a copy through the bus);
- the JetStream object store bucket `ARTIFACTS_BUCKET`, object name = key: across hosts.

Content addressing makes both a cache: an object already present (same name and size) is not
uploaded again, and a fetched object lands in the local root so the next `get` is a file open.

Why `get` does not use nats-py's `ObjectStore.get`: it measured ~6 MB/s here. Its ordered
consumer answers the server's flow-control requests from a task that polls every 0.25 s,
and without `writeinto` it concatenates bytes (quadratic). We read the chunk subject
`$O.<bucket>.C.<nuid>` with our own ephemeral push consumer, answer flow control as soon
as the data before it is on disk, and hash while writing. The upload side follows the same
object store protocol as nats-py (chunks on the chunk subject, then a rollup meta message),
but pipelines the chunk publishes instead of waiting for each ack in turn.

Nothing here ever holds a whole file in memory: hashing, copying, uploading and fetching
all go through fixed-size buffers.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import mimetypes
import os
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from nats.js.kv import MSG_ROLLUP_SUBJECT

from captionbus.settings import Settings
from contracts.artifacts import ArtifactRef
from contracts.subjects import ARTIFACTS_BUCKET

log = structlog.get_logger("captionbus.artifacts")

# nats-py's default, so objects we write read back with any client (and theirs with ours).
CHUNK_SIZE = 128 * 1024
IO_BUFFER = 1024 * 1024  # local hashing/copying
UPLOAD_BLOCK = 8 * CHUNK_SIZE  # read per thread hop when uploading
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_NAME_MAX = 200  # ArtifactRef.name limit


class ArtifactError(RuntimeError):
    pass


class ArtifactMissing(ArtifactError, FileNotFoundError):
    """The bytes are neither under this host's local root nor in the object store."""


class ArtifactCorrupt(ArtifactError):
    """Bytes were found but their size or sha256 does not match the reference."""


def describe(ref: ArtifactRef) -> str:
    return f"artifact {ref.name!r} ({ref.key[:12]}…, {ref.size} bytes)"


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
            fout.write(view[:n])
            size += n
    return h.hexdigest(), size


def _digest_hex(info: api.ObjectInfo) -> str | None:
    """The object store's "SHA-256=<base64url>" digest as hex, comparable to a key."""
    digest = info.digest or ""
    if not digest.upper().startswith("SHA-256="):
        return None
    try:
        return base64.urlsafe_b64decode(digest[len("SHA-256="):]).hex()
    except ValueError:
        return None


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
        self.bucket = ARTIFACTS_BUCKET
        self.stream = f"OBJ_{self.bucket}"
        # How long a fetch may go without receiving a chunk before it is retried/fails.
        self.stall_timeout = 10.0
        self.ack_timeout = 10.0
        self._sweep_tmp()

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

    def _ingest(self, src: Path) -> tuple[str, int, Path]:
        """Bring `src` into the local root: hardlink if we can, else copy; hash on the way."""
        src_stat = os.stat(src)
        tmp = self._tmp_path(f"{src_stat.st_ino:016x}")
        try:
            try:
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
                return key, size, final  # already there: content addressing makes this a hit
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
        self, path: Path, *, name: str | None = None, media_type: str | None = None
    ) -> ArtifactRef:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"cannot store {path}: not a regular file")
        name = safe_name(name or path.name)
        # Hashing a film takes seconds: keep the event loop (heartbeats) free meanwhile.
        key, size, local = await asyncio.to_thread(self._ingest, path)
        ref = ArtifactRef(
            key=key,
            name=name,
            size=size,
            media_type=media_type or mimetypes.guess_type(name)[0],
            origin_host=self.settings.host_id,
        )
        if self.use_object_store:
            await self._upload(local, ref)
            ref = ref.model_copy(update={"in_object_store": True})
        log.debug("artifact stored", key=key, name=name, size=size, object_store=ref.in_object_store)
        return ref

    async def _object_info(self, key: str) -> api.ObjectInfo | None:
        meta_subj = f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(key.encode()).decode()}"
        try:
            msg = await self.js.get_last_msg(self.stream, meta_subj)
        except NotFoundError:
            return None
        info = api.ObjectInfo.from_response(json.loads(msg.data))
        return None if info.deleted else info

    async def _acked(self, fut: asyncio.Future) -> None:
        # nats-py's publish_async futures never time out on their own (a lost ack would hang).
        try:
            await asyncio.wait_for(fut, self.ack_timeout)
        except asyncio.TimeoutError:
            raise ArtifactError(f"object store did not acknowledge a chunk within {self.ack_timeout}s") from None

    async def _upload(self, local: Path, ref: ArtifactRef) -> None:
        existing = await self._object_info(ref.key)
        if existing is not None and existing.size == ref.size and _digest_hex(existing) == ref.key:
            return  # content addressing: an object under this key is these bytes
        nuid = self.js._nc._nuid.next().decode()  # nats-py's own nuid source, as its put does
        chunk_subj = f"$O.{self.bucket}.C.{nuid}"
        h = hashlib.sha256()
        chunks = 0
        window: list[asyncio.Future] = []
        loop = asyncio.get_running_loop()
        try:
            with open(local, "rb", buffering=0) as f:

                def read_block() -> bytes:
                    data = f.read(UPLOAD_BLOCK)
                    h.update(data)
                    return data

                while True:
                    # Read and hash in a thread, a block of chunks per hop: a slow disk must
                    # not stall the event loop, and each thread hop costs tens of µs.
                    block = await loop.run_in_executor(None, read_block)
                    if not block:
                        break
                    for i in range(0, len(block), CHUNK_SIZE):
                        # publish_async pipelines: acks come back while we send on. The
                        # window bounds memory (chunks in flight) to 64 × 128 KiB.
                        window.append(await self.js.publish_async(chunk_subj, block[i:i + CHUNK_SIZE]))
                        chunks += 1
                        if len(window) >= 64:
                            await self._acked(window.pop(0))
            while window:
                await self._acked(window.pop(0))
            if h.hexdigest() != ref.key:
                raise ArtifactCorrupt(f"{describe(ref)} changed on disk while uploading")
            info = api.ObjectInfo(
                name=ref.key,
                bucket=self.bucket,
                nuid=nuid,
                size=ref.size,
                chunks=chunks,
                mtime=datetime.now(timezone.utc).isoformat(),
                digest="SHA-256=" + base64.urlsafe_b64encode(h.digest()).decode(),
                options=api.ObjectMetaOptions(max_chunk_size=CHUNK_SIZE),
            )
            meta_subj = f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(ref.key.encode()).decode()}"
            await self.js.publish(
                meta_subj,
                json.dumps(info.as_dict()).encode(),
                headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT},
            )
        except BaseException:
            for fut in window:
                fut.cancel()
            with contextlib.suppress(Exception):
                await self.js.purge_stream(self.stream, subject=chunk_subj)
            raise
        if existing is not None:
            # A torn earlier upload under the same key: its chunks are garbage now.
            with contextlib.suppress(Exception):
                await self.js.purge_stream(self.stream, subject=f"$O.{self.bucket}.C.{existing.nuid}")

    # ---- get ----------------------------------------------------------------------------

    async def get(self, ref: ArtifactRef, dest_dir: Path | None = None) -> Path:
        """A local path holding the artifact's bytes; treat it as read-only.

        Without `dest_dir` that is the file in this host's local root. With `dest_dir`, it
        is `dest_dir/<sanitised ref.name>` (a hardlink to the root file, else a copy), for
        tools that care about the file name; an existing file of that name is replaced.
        """
        path = self.local_path(ref)
        if path is None:
            path = await self._fetch(ref)
        if dest_dir is not None:
            return await asyncio.to_thread(self._materialise, path, Path(dest_dir), ref.name)
        return path

    async def _fetch(self, ref: ArtifactRef) -> Path:
        where = f"this host's artifact root ({self.root})"
        if not ref.in_object_store:
            raise ArtifactMissing(
                f"{describe(ref)} is not in {where} and was never uploaded to the object store "
                f"(it was made on host {ref.origin_host!r} with local artifacts only; "
                "run every host with CAPTIONBUS_ARTIFACTS=object to share artifacts over NATS)"
            )
        if self.js is None:
            raise ArtifactMissing(f"{describe(ref)} is not in {where}, and there is no bus to fetch it from")
        info = await self._object_info(ref.key)
        if info is None:
            raise ArtifactMissing(f"{describe(ref)} is not in {where} nor in object store bucket {self.bucket!r}")
        if info.size != ref.size or _digest_hex(info) != ref.key:
            raise ArtifactCorrupt(
                f"{describe(ref)}: the object store holds other bytes under this key "
                f"({info.size} bytes, sha256 {(_digest_hex(info) or '?')[:12]}…)"
            )
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
        with _DiskSink(tmp) as sink:
            if info.size == 0:
                return sink.finish()
            for attempt in range(5):
                reader = _ChunkReader(self, info, sink, written, last_sseq)
                try:
                    await reader.run()
                    return sink.finish()
                except _Resume as r:
                    written, last_sseq = reader.written, reader.last_sseq
                    log.warning("artifact fetch resuming", key=ref.key, at=written, reason=str(r), attempt=attempt)
        raise ArtifactError(f"{describe(ref)}: fetch from the object store kept stalling; giving up")


class _DiskSink:
    """Hash and write fetched chunks, inline on the event loop.

    Measured on 2 cores shared with nats-server: handing each chunk to a writer thread
    made `get` 2-3x slower (GIL hand-offs), and handing 4 MiB blocks to a thread was
    still ~1.5x slower than this. A 128 KiB write plus hash is ~0.15 ms, so the loop
    stays responsive. Worth re-measuring on a box with idle cores.
    """

    def __init__(self, path: Path):
        self.h = hashlib.sha256()
        self.file = open(path, "wb")  # buffered: write() never returns short

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.h.update(data)

    def finish(self) -> str:
        self.file.flush()
        return self.h.hexdigest()

    def __enter__(self) -> "_DiskSink":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class _Resume(Exception):
    pass


class _ChunkReader:
    """One consumer's worth of a fetch (see ArtifactStore._read_chunks)."""

    def __init__(self, store: ArtifactStore, info: api.ObjectInfo, sink: _DiskSink, written: int, last_sseq: int):
        self.store = store
        self.js = store.js
        self.nc = store.js._nc  # raw subscription: nats-py's JS subscribe wraps FC in a 0.25 s poll
        self.info = info
        self.sink = sink
        self.written = written
        self.last_sseq = last_sseq
        self.expect_dseq = 1
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.progress = 0

    def _finish(self, exc: BaseException | None = None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)

    async def _on_msg(self, msg: Msg) -> None:
        if self.done.done():
            return
        try:
            if not msg.data and msg.headers and msg.headers.get(api.Header.STATUS) == "100":
                # Flow control (reply set) or idle heartbeat (maybe naming a stalled FC reply).
                # Callbacks run in order: everything before this is written already, so a
                # slow disk slows the server down rather than filling our memory.
                reply = msg.reply or msg.headers.get(api.Header.CONSUMER_STALLED)
                if reply:
                    await self.nc.publish(reply)
                return
            meta = msg.metadata
            if meta.sequence.consumer != self.expect_dseq:
                raise _Resume(f"expected chunk {self.expect_dseq}, got {meta.sequence.consumer}")
            self.expect_dseq += 1
            data = msg.data
            self.sink.write(data)
            self.written += len(data)
            self.last_sseq = meta.sequence.stream
            self.progress += 1
            if self.written > self.info.size:
                raise ArtifactCorrupt(f"object {self.info.name} has more than its {self.info.size} bytes")
            if self.written == self.info.size:
                self._finish()
            elif meta.num_pending == 0:  # the last chunk, and short: fail now, not after stalls
                raise ArtifactCorrupt(
                    f"object {self.info.name} ends after {self.written} of its {self.info.size} bytes"
                )
        except BaseException as e:  # nats-py would swallow it; the fetch must see it
            self._finish(e)

    async def run(self) -> None:
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(
            inbox, cb=self._on_msg,
            # Flow control bounds what is in flight; these only stop nats-py dropping it.
            pending_msgs_limit=64 * 1024, pending_bytes_limit=1024 * 1024 * 1024,
        )
        consumer = None
        try:
            config = api.ConsumerConfig(
                deliver_subject=inbox,
                filter_subject=f"$O.{self.store.bucket}.C.{self.info.nuid}",
                ack_policy=api.AckPolicy.NONE,
                max_deliver=1,
                flow_control=True,
                idle_heartbeat=1.0,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=30.0,  # the server cleans up if we vanish
            )
            if self.last_sseq:
                config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = self.last_sseq + 1
            else:
                config.deliver_policy = api.DeliverPolicy.ALL
            consumer = (await self.js.add_consumer(self.store.stream, config)).name
            while True:
                seen = self.progress
                try:
                    await asyncio.wait_for(asyncio.shield(self.done), self.store.stall_timeout)
                    return
                except asyncio.TimeoutError:
                    if self.progress == seen:
                        if self.written == 0 and self.last_sseq == 0:
                            raise ArtifactMissing(
                                f"object {self.info.name}: no chunks arrived within {self.store.stall_timeout}s "
                                "(deleted or replaced while reading?)"
                            ) from None
                        raise _Resume(f"no chunk for {self.store.stall_timeout}s") from None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if consumer:
                with contextlib.suppress(Exception):
                    await self.js.delete_consumer(self.store.stream, consumer)
