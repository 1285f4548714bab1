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
as the data before it is on disk, and hash while writing. Even so, nats-py's receive path
(five copies of every byte, all on the event loop) capped that at ~250 MB/s, so by default
the chunks are read by `_DirectReader`: a plain NATS connection of its own, parsed in a
thread that hashes and writes slices of its receive buffer (see benchmarks/artifacts.py).
The upload side follows the same object store protocol as nats-py (chunks on the chunk
subject, then a rollup meta message) with 1 MiB chunks instead of 128 KiB, and pipelines
the chunk publishes instead of waiting for each ack in turn.

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
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from nats.js.kv import MSG_ROLLUP_SUBJECT

from contracts.artifacts import ArtifactRef
from contracts.subjects import ARTIFACTS_BUCKET
from core.settings import Settings

log = structlog.get_logger("captionbus.artifacts")

# Upload chunk size, capped by the server's max_payload. nats-py writes 128 KiB chunks;
# chunk size is per object (readers just concatenate), so any client reads ours and we
# read theirs. 8x fewer messages than 128 KiB: reading through nats-py's connection went
# from ~300 to ~400 MB/s wire-only; the direct reader is ~800 MB/s either way.
CHUNK_SIZE = 1024 * 1024
IO_BUFFER = 1024 * 1024  # local hashing/copying
UPLOAD_BLOCK = 4 * 1024 * 1024  # read per thread hop when uploading
UPLOAD_WINDOW_BYTES = 8 * 1024 * 1024  # chunk bytes published but not yet acknowledged
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
        # Fetch over a connection of our own in a thread (_DirectReader); False, or a
        # connection it cannot speak (TLS, nkeys/JWT), reads through nats-py (_ChunkReader).
        self.direct_fetch = True
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

    async def exists(self, ref: ArtifactRef) -> bool:
        """Whether `get(ref)` can succeed from here: on this host's root, or in the object store."""
        if self.local_path(ref) is not None:
            return True
        if self.js is None:
            return False
        info = await self._object_info(ref.key)
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
        key, size, local = await asyncio.to_thread(self._ingest, path, copy)
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

    def _chunk_size(self) -> int:
        max_payload = self.js._nc.max_payload or CHUNK_SIZE
        # UPLOAD_BLOCK must split into whole chunks: a power of two no larger than max_payload.
        size = CHUNK_SIZE
        while size > max_payload and size > 1024:
            size //= 2
        return size

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
        chunk_size = self._chunk_size()
        window_len = max(1, UPLOAD_WINDOW_BYTES // chunk_size)
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
                    for i in range(0, len(block), chunk_size):
                        # publish_async pipelines: acks come back while we send on. The
                        # window bounds what is in flight to UPLOAD_WINDOW_BYTES.
                        window.append(await self.js.publish_async(chunk_subj, block[i:i + chunk_size]))
                        chunks += 1
                        if len(window) >= window_len:
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
                options=api.ObjectMetaOptions(max_chunk_size=chunk_size),
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
            direct = self.direct_fetch
            for attempt in range(5):
                reader = None
                if direct:
                    try:
                        reader = _DirectReader(self, info, sink, written, last_sseq)
                    except _DirectUnavailable as e:
                        log.debug("direct fetch not possible; reading through nats-py", reason=str(e))
                        direct = False
                if reader is None:
                    reader = _ChunkReader(self, info, sink, written, last_sseq)
                try:
                    await reader.run()
                    return sink.finish()
                except _DirectUnavailable as e:
                    log.debug("direct fetch not possible; reading through nats-py", reason=str(e))
                    direct = False
                    written, last_sseq = reader.written, reader.last_sseq
                except _Resume as r:
                    written, last_sseq = reader.written, reader.last_sseq
                    log.warning("artifact fetch resuming", key=ref.key, at=written, reason=str(r), attempt=attempt)
        raise ArtifactError(f"{describe(ref)}: fetch from the object store kept stalling; giving up")


def _consumer_config(store: ArtifactStore, info: api.ObjectInfo, inbox: str, last_sseq: int) -> api.ConsumerConfig:
    """An ephemeral flow-controlled push consumer on the object's chunks, from last_sseq on."""
    config = api.ConsumerConfig(
        deliver_subject=inbox,
        filter_subject=f"$O.{store.bucket}.C.{info.nuid}",
        ack_policy=api.AckPolicy.NONE,
        max_deliver=1,
        flow_control=True,
        idle_heartbeat=1.0,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=30.0,  # the server cleans up if we vanish
    )
    if last_sseq:
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = last_sseq + 1
    else:
        config.deliver_policy = api.DeliverPolicy.ALL
    return config


class _DiskSink:
    """Hash and write fetched chunks in the caller's thread: `_DirectReader`'s own thread,
    or inline on the event loop for `_ChunkReader` (a 1 MiB chunk is ~1.5 ms there).

    Measured on 2 cores shared with nats-server: handing each chunk from the event loop to
    a writer thread made `get` 2-3x slower (GIL hand-offs), and 4 MiB blocks were still
    ~1.5x slower than writing inline; the direct reader avoids the hand-off altogether.
    """

    def __init__(self, path: Path):
        self.h = hashlib.sha256()
        # Unbuffered: writes come in chunk-sized pieces (often memoryviews of a reader's
        # receive buffer) that a buffer would only copy once more.
        self.file = open(path, "wb", buffering=0)

    def write(self, data) -> None:
        self.h.update(data)
        view = memoryview(data)
        while view:
            view = view[self.file.write(view):]

    def finish(self) -> str:
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
            config = _consumer_config(self.store, self.info, inbox, self.last_sseq)
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


class _DirectUnavailable(Exception):
    """This connection's options are beyond the direct reader (TLS, nkeys/JWT, websocket)."""


def _direct_endpoint(nc) -> tuple[str, int, bytes]:
    """Host, port and CONNECT line for a second plain-TCP connection like `nc`'s."""
    uri = nc.connected_url
    if uri is None or uri.scheme not in ("nats", ""):
        raise _DirectUnavailable(f"scheme {getattr(uri, 'scheme', None)!r}")
    info = getattr(nc, "_server_info", {}) or {}
    if nc.options.get("tls") is not None or info.get("tls_required") or info.get("tls_available") and uri.scheme == "tls":
        raise _DirectUnavailable("TLS")
    if getattr(nc, "_signature_cb", None) is not None or getattr(nc, "_user_jwt_cb", None) is not None:
        raise _DirectUnavailable("nkey/JWT auth")
    # nats-py's own CONNECT line: same user/password/token, no signature (none configured).
    connect_line = nc._connect_command()
    return uri.hostname or "127.0.0.1", uri.port or 4222, connect_line


class _DirectReader:
    """One consumer's worth of a fetch over a connection of its own, read in a thread.

    Why: through nats-py each byte is copied five times before our callback sees it
    (StreamReader buffer, 32 KiB reads, the parser's bytearray, a slice, bytes()), all on
    the event loop with the hashing and the write. Here one thread `recv_into`s a fixed
    buffer, parses the few protocol lines itself, and hashes and writes memoryview slices
    of that buffer: hashlib and file writes release the GIL, so the event loop (heartbeats,
    other fetches) keeps running, and the copies are the kernel's. Same consumer, same
    checks and resume points as `_ChunkReader`, which stays the fallback for connections
    this reader does not speak (TLS, nkeys/JWT, websocket).
    """

    # Tests set this to a method (self, reply) -> bool: True loses that data message, as a
    # dropped message would be lost.
    _drop_hook = None

    def __init__(self, store: ArtifactStore, info: api.ObjectInfo, sink: "_DiskSink", written: int, last_sseq: int):
        self.store = store
        self.js = store.js
        self.nc = store.js._nc
        self.host, self.port, self.connect_line = _direct_endpoint(self.nc)
        self.info = info
        self.sink = sink
        self.written = written
        self.last_sseq = last_sseq
        self.expect_dseq = 1
        self.stop = False
        self.sock: socket.socket | None = None
        # Room for the largest message the server may send, and a few more behind it.
        self.bufsize = max(4 * 1024 * 1024, 2 * (self.nc.max_payload or 0) + 64 * 1024)

    async def run(self) -> None:
        inbox = self.nc.new_inbox()
        ready = asyncio.get_running_loop().create_future()
        consumer = None
        loop = asyncio.get_running_loop()
        # A thread of its own, not the default executor: a long fetch must not hold a pool
        # worker that put's hashing (asyncio.to_thread) and others wait for.
        task = loop.create_future()
        threading.Thread(
            target=self._thread, args=(inbox, ready, task, loop), name="artifact-fetch", daemon=True
        ).start()
        try:
            await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                await task  # connect failed: raises
            config = _consumer_config(self.store, self.info, inbox, self.last_sseq)
            consumer = (await self.js.add_consumer(self.store.stream, config)).name
            await asyncio.shield(task)
        finally:
            self.stop = True
            sock = self.sock
            if sock is not None and not task.done():
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            # The thread writes into the sink: it must be done before anyone closes it.
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)
            if consumer:
                with contextlib.suppress(Exception):
                    await self.js.delete_consumer(self.store.stream, consumer)

    # ---- the thread -----------------------------------------------------------------

    def _thread(self, inbox: str, ready: asyncio.Future, task: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        def signal_ready() -> None:
            if not ready.done():
                ready.set_result(None)

        def settle(exc: BaseException | None) -> None:
            if not task.done():
                task.set_result(None) if exc is None else task.set_exception(exc)

        def call(fn, *args) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(fn, *args)

        try:
            self._connect_and_read(inbox, lambda: call(signal_ready))
        except BaseException as e:  # handed to the awaiting coroutine
            call(settle, e)
        else:
            call(settle, None)

    def _connect_and_read(self, inbox: str, on_subscribed) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.store.stall_timeout)
        except OSError as e:
            raise _DirectUnavailable(f"cannot connect to {self.host}:{self.port}: {e}") from e
        self.sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            self._loop(sock, inbox, on_subscribed)
        finally:
            self.sock = None
            sock.close()

    def _loop(self, sock: socket.socket, inbox: str, on_subscribed) -> None:
        buf = bytearray(self.bufsize)
        view = memoryview(buf)
        start = end = 0  # unparsed bytes are buf[start:end]
        handshake = 0  # 0: want INFO, 1: want PONG to CONNECT, 2: want PONG to SUB, 3: streaming
        size = self.info.size
        sink = self.sink
        stall = self.store.stall_timeout
        last_progress = time.monotonic()
        sock.settimeout(min(1.0, stall))
        while True:
            # Parse every complete protocol line / message in buf[start:end].
            while True:
                nl = buf.find(b"\r\n", start, end)
                if nl < 0:
                    if end - start > 64 * 1024:  # INFO lines can be long; nothing else is
                        raise ArtifactError("NATS protocol: control line too long")
                    break
                line = bytes(view[start:nl])
                if line.startswith(b"MSG ") or line.startswith(b"HMSG "):
                    parts = line.split()
                    if parts[0] == b"MSG":
                        hsize, total = 0, int(parts[-1])
                    else:
                        hsize, total = int(parts[-2]), int(parts[-1])
                    reply = parts[3] if len(parts) == (5 if parts[0] == b"MSG" else 6) else b""
                    body = nl + 2
                    if body + total + 2 > end:
                        break  # the rest of it is not here yet
                    start = body + total + 2
                    if hsize:
                        headers = bytes(view[body:body + hsize])
                        if headers.startswith(b"NATS/1.0 100"):
                            # Flow control (reply set) or idle heartbeat (maybe naming a
                            # stalled FC reply). Everything before it is written already,
                            # so a slow disk slows the server down, not our memory.
                            target = reply or _header(headers, b"Nats-Consumer-Stalled")
                            if target:
                                sock.sendall(b"PUB " + target + b" 0\r\n\r\n")
                            continue
                        if headers.startswith(b"NATS/1.0 "):
                            continue  # other status (e.g. 409 consumer deleted): ignore; stall logic decides
                    if not reply.startswith(b"$JS.ACK."):
                        continue
                    tokens = reply.split(b".")
                    if len(tokens) == 9:
                        sseq, dseq, pending = int(tokens[5]), int(tokens[6]), int(tokens[8])
                    elif len(tokens) >= 11:
                        sseq, dseq, pending = int(tokens[7]), int(tokens[8]), int(tokens[10])
                    else:
                        raise ArtifactError(f"NATS protocol: unexpected reply subject {reply[:80]!r}")
                    if self._drop_hook is not None and self._drop_hook(reply):
                        continue
                    if dseq != self.expect_dseq:
                        raise _Resume(f"expected chunk {self.expect_dseq}, got {dseq}")
                    self.expect_dseq += 1
                    n = total - hsize
                    if self.written + n > size:
                        raise ArtifactCorrupt(f"object {self.info.name} has more than its {size} bytes")
                    if n:
                        sink.write(view[body + hsize:body + total])
                    self.written += n
                    self.last_sseq = sseq
                    last_progress = time.monotonic()
                    if self.written == size:
                        return
                    if pending == 0:  # the last chunk, and short: fail now, not after stalls
                        raise ArtifactCorrupt(
                            f"object {self.info.name} ends after {self.written} of its {size} bytes"
                        )
                    continue
                start = nl + 2
                if line.startswith(b"PING"):
                    sock.sendall(b"PONG\r\n")
                elif line.startswith(b"INFO "):
                    if handshake == 0:
                        info = json.loads(line[5:])
                        if info.get("tls_required"):
                            raise _DirectUnavailable("server requires TLS")
                        sock.sendall(self.connect_line + b"PING\r\n")
                        handshake = 1
                elif line.startswith(b"PONG"):
                    if handshake == 1:
                        sock.sendall(f"SUB {inbox} 1\r\nPING\r\n".encode())
                        handshake = 2
                    elif handshake == 2:
                        handshake = 3  # the server has our SUB: the consumer may start
                        last_progress = time.monotonic()
                        on_subscribed()
                elif line.startswith(b"-ERR"):
                    raise ArtifactError(f"NATS server refused the fetch connection: {line.decode(errors='replace')}")
                # +OK and anything else: ignore
            # Need more bytes: make room, then read.
            if start == end:
                start = end = 0
            elif len(buf) - end < 64 * 1024:
                pending_len = end - start
                view[:pending_len] = bytes(view[start:end])  # at most one message; may overlap
                start, end = 0, pending_len
            if end == len(buf):
                raise ArtifactError("NATS protocol: message larger than the read buffer")
            try:
                n = sock.recv_into(view[end:])
            except TimeoutError:
                n = None
            except OSError:
                if self.stop:
                    return
                raise
            if self.stop:
                return
            if n == 0:
                if self.stop:
                    return
                raise _Resume("the server closed the fetch connection")
            if n:
                end += n
            elif time.monotonic() - last_progress > stall:
                if handshake < 3:
                    raise ArtifactError(f"no answer from the NATS server at {self.host}:{self.port} within {stall}s")
                if self.written == 0 and self.last_sseq == 0:
                    raise ArtifactMissing(
                        f"object {self.info.name}: no chunks arrived within {stall}s "
                        "(deleted or replaced while reading?)"
                    )
                raise _Resume(f"no chunk for {stall}s")


def _header(block: bytes, name: bytes) -> bytes:
    for line in block.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name.lower():
            return value.strip()
    return b""
