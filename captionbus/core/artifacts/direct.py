"""A faster chunk reader: the fetch's consumer read over a raw socket of its own, in a thread.

A second NATS client, as small as one fetch needs (CONNECT, SUB, PING/PONG, MSG/HMSG, flow
control), written against nats-py 2.16.0: it copies that connection's CONNECT line and checks
its TLS/auth options through private attributes (`_connect_command()`, `_server_info`,
`_signature_cb`, `_user_jwt_cb`). So it is on only where the installed nats-py is that
version (`AVAILABLE`, decided at import); anywhere else, and for connections it does not
speak (TLS, nkeys/JWT, websocket), `ArtifactStore` reads through `transfer.ChunkReader`.

Why keep a second reader: benchmarks/artifacts.py, 200 MB object on loopback, MiB/s best /
median of 5; `get (object)` is this reader, `get (via nats-py)` the chunk reader, both hashing
and writing into the artifact root:

    where (December 2026)                               this reader   chunk reader
    issue 8, the filer's host                             928 / 362     866 / 832
    2 CPUs shared with nats-server (and other work), #1   438 / 327     403 / 384
      #2                                                  793 / 719     507 / 503
      #3                                                  672 / 497     381 / 330
      #4, readers taking turns to go first                611 / 386     323 / 264  (paired 1.57x)
    same host, 10 x 200 MB pairs, alternating: median 1.93x and 2.07x; 12 x 50 MB: 1.68x

Without the disk ("wire only") this reader was 1.3-1.6x the other in every run. With it, on
this 2-core host it won 1.5-2x in every run but the first (a draw); likely because its hashing and
writes run in a thread with the GIL released while nats-py's path does all of it on the event
loop, competing with nats-server for the CPU. On the issue's host the two met at best and
the chunk reader had the steadier median. A clear win where CPU is short, so it stays: here,
on its own, and only with the nats-py it was written for.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from importlib.metadata import PackageNotFoundError, version

from nats.js import api

from captionbus.core.artifacts.errors import ArtifactCorrupt, ArtifactError, ArtifactMissing
from captionbus.core.artifacts.transfer import DiskSink, ObjectBucket, Resume

WRITTEN_FOR = "2.16.0"  # the nats-py whose private attributes direct_endpoint reads
try:
    NATS_PY_VERSION: str | None = version("nats-py")
except PackageNotFoundError:
    NATS_PY_VERSION = None
AVAILABLE = NATS_PY_VERSION == WRITTEN_FOR


class DirectUnavailable(Exception):
    """This connection's options are beyond the direct reader (TLS, nkeys/JWT, websocket)."""


def direct_endpoint(nc) -> tuple[str, int, bytes]:
    """Host, port and CONNECT line for a second plain-TCP connection like `nc`'s."""
    uri = nc.connected_url
    if uri is None or uri.scheme not in ("nats", ""):
        raise DirectUnavailable(f"scheme {getattr(uri, 'scheme', None)!r}")
    info = getattr(nc, "_server_info", {}) or {}
    if nc.options.get("tls") is not None or info.get("tls_required") or info.get("tls_available") and uri.scheme == "tls":
        raise DirectUnavailable("TLS")
    if getattr(nc, "_signature_cb", None) is not None or getattr(nc, "_user_jwt_cb", None) is not None:
        raise DirectUnavailable("nkey/JWT auth")
    # nats-py's own CONNECT line: same user/password/token, no signature (none configured).
    connect_line = nc._connect_command()
    return uri.hostname or "127.0.0.1", uri.port or 4222, connect_line


class DirectReader:
    """One consumer's worth of a fetch over a connection of its own, read in a thread.

    Why: through nats-py each byte is copied five times before our callback sees it
    (StreamReader buffer, 32 KiB reads, the parser's bytearray, a slice, bytes()), all on
    the event loop with the hashing and the write. Here one thread `recv_into`s a fixed
    buffer, parses the few protocol lines itself, and hashes and writes memoryview slices
    of that buffer: hashlib and file writes release the GIL, so the event loop (heartbeats,
    other fetches) keeps running, and the copies are the kernel's. Same consumer, same
    checks and resume points as `ChunkReader`, which stays the fallback for connections
    this reader does not speak (TLS, nkeys/JWT, websocket).
    """

    # Tests set this to a method (self, reply) -> bool: True loses that data message, as a
    # dropped message would be lost.
    _drop_hook = None

    def __init__(self, bucket: ObjectBucket, info: api.ObjectInfo, sink: DiskSink, written: int, last_sseq: int):
        if not AVAILABLE:
            raise DirectUnavailable(f"written for nats-py {WRITTEN_FOR}, this is {NATS_PY_VERSION}")
        self.bucket = bucket
        self.js = bucket.js
        self.nc = bucket.nc
        self.host, self.port, self.connect_line = direct_endpoint(self.nc)
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
            config = self.bucket.consumer_config(self.info, inbox, self.last_sseq)
            consumer = (await self.js.add_consumer(self.bucket.stream, config)).name
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
            if consumer and not self.bucket.restricted:  # a tenant may not delete (inactive_threshold does)
                with contextlib.suppress(Exception):
                    await self.js.delete_consumer(self.bucket.stream, consumer)

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
            sock = socket.create_connection((self.host, self.port), timeout=self.bucket.stall_timeout)
        except OSError as e:
            raise DirectUnavailable(f"cannot connect to {self.host}:{self.port}: {e}") from e
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
        stall = self.bucket.stall_timeout
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
                        raise Resume(f"expected chunk {self.expect_dseq}, got {dseq}")
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
                            raise DirectUnavailable("server requires TLS")
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
                raise Resume("the server closed the fetch connection")
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
                raise Resume(f"no chunk for {stall}s")


def _header(block: bytes, name: bytes) -> bytes:
    for line in block.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name.lower():
            return value.strip()
    return b""
