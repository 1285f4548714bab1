"""Artifacts across hosts: upload to and fetch from one JetStream object store bucket.

Objects follow nats-py's object store layout (chunks on `$O.<bucket>.C.<nuid>`, then a meta
message on `$O.<bucket>.M.<name>`; object name = artifact key), so nats-py reads what we write
and we read what it writes; chunk size is per object.

**Nobody but gc removes an object** (issue 18). The bucket's stream refuses rollups
(`allow_rollup_hdrs: false`, set by captionbus.core.bus.provision): with them, any user allowed to publish
one meta message could send `Nats-Rollup: all` and purge every object, and publish rights
cannot stop a header. Without rollups a meta message cannot replace an earlier one, so an
object is what its **first** meta message says (`located`): the first one on its subject that
is live (not a `deleted` marker), names this key, claims the key's digest, and whose chunk
subject holds its chunks. Later meta messages — a `deleted` tombstone, another nuid, junk —
change nothing for readers. A refresh (an object stored again, for gc's grace period) appends
a copy with a new mtime. Only the gc user may purge (roles.conf), and `delete` is that purge:
the meta subject up to the sequence gc read, then the chunks. Writers no longer send rollup
headers, so nats-py's `ObjectStore.put`/`delete` (which do) are refused on this bucket;
nats-py's `get` still reads our objects.

Upload: 1 MiB chunks instead of nats-py's 128 KiB, the chunk publishes pipelined
(`publish_async` in a bounded window) instead of waiting for each ack in turn.

Fetch, and why not nats-py's `ObjectStore.get`: it measured ~6 MB/s here. Its ordered consumer
answers the server's flow-control requests from a task that polls every 0.25 s, and without
`writeinto` it concatenates bytes (quadratic). `ChunkReader` reads the chunk subject with an
ephemeral flow-controlled push consumer of its own on a plain subscription of nats-py's
connection, answers flow control as soon as the data before it is on disk, and hashes while
writing. It is the reader for every connection; `captionbus.core.artifacts.direct` is a faster one for
plain-TCP connections with the nats-py version it was written against (numbers there).

Nothing here holds a whole file in memory.

**Tenants** (deploy/README.md, "Tenancy on the bus"): the artifacts of a tenant's jobs live in a
namespace of the same bucket, `$O.<bucket>.M.<tenant>.<name>` and `$O.<bucket>.C.<tenant>.<nuid>`
(their meta's `nuid` is `<tenant>.<nuid>`, so `chunk_subject(info.nuid)` and gc's chunk sets need
no other change), so the auth callout can grant a tenant's client its namespace and nothing else.
That client reads `restricted`: only through consumers created on the filtered-create subject
(metadata oldest first, chunk counts, chunks), never `STREAM.MSG.GET` (a sequence in the body
reads any message) nor `STREAM.INFO` (`subjects_filter` lists every object). Trusted readers
(workers, gc, the dashboards) read every namespace as before, with `scoped(tenant)`.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from nats.nuid import NUID

from captionbus.contracts.artifacts import ArtifactRef
from captionbus.contracts.ids import NO_TENANT
from captionbus.contracts.jobs import utcnow
from captionbus.contracts.subjects import ARTIFACTS_BUCKET
from captionbus.core.artifacts.errors import ArtifactCorrupt, ArtifactError, ArtifactMissing, ArtifactStoreFull, describe
from captionbus.core.tenancy import connection, held

# Upload chunk size, capped by the server's max_payload. nats-py writes 128 KiB chunks;
# readers just concatenate, so any client reads ours and we read theirs. 8x fewer messages
# than 128 KiB: reading through nats-py's connection went from ~300 to ~400 MB/s wire-only.
CHUNK_SIZE = 1024 * 1024
UPLOAD_BLOCK = 4 * 1024 * 1024  # read per thread hop when uploading
UPLOAD_WINDOW_BYTES = 8 * 1024 * 1024  # chunk bytes published but not yet acknowledged
# JetStream's answers that mean "no room": the stream's max_bytes (10077 maximum bytes exceeded),
# the account's or server's storage (10023 insufficient resources, 10047 insufficient storage).
STORE_FULL_CODES = frozenset({10077, 10023, 10047})
STORE_FULL_WORDS = ("maximum bytes", "insufficient resources", "insufficient storage", "no space")


def store_full_reason(error: BaseException) -> str | None:
    """The server's words when `error` says the store is full, else None."""
    code = getattr(error, "err_code", None)
    text = (getattr(error, "description", None) or str(error)).strip()
    if code in STORE_FULL_CODES or any(w in text.lower() for w in STORE_FULL_WORDS):
        return text
    return None


WRONG_LAST_SEQUENCE = 10071  # JetStream: "wrong last sequence" (an expected-sequence publish lost the race)
REFRESH_AFTER_S = 600.0  # an existing object stored again older than this gets a fresh mtime


def timestamp(value) -> float | None:
    """Seconds since the epoch from a datetime or an RFC 3339 string such as nats-server writes
    (nanoseconds, which `fromisoformat` before Python 3.11 refuses, are cut to microseconds)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    text = str(value).strip().replace("Z", "+00:00")
    if "." in text:
        head, _, tail = text.partition(".")
        digits = "".join(c for c in tail if c.isdigit())
        text = f"{head}.{digits[:6]}{tail[len(digits):]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def _age_s(mtime) -> float:
    written = timestamp(mtime)
    return float("inf") if written is None else utcnow().timestamp() - written


def digest_hex(info: api.ObjectInfo) -> str | None:
    """The object store's "SHA-256=<base64url>" digest as hex, comparable to a key."""
    digest = info.digest or ""
    if not digest.upper().startswith("SHA-256="):
        return None
    try:
        return base64.urlsafe_b64decode(digest[len("SHA-256="):]).hex()
    except ValueError:
        return None


META_READ = 64  # meta messages read per object before giving up finding a readable one
_HEX = frozenset("0123456789abcdef")


def _meta(data: bytes, key: str) -> api.ObjectInfo | None:
    """A meta message's object if it can describe `key`'s bytes: parses, is live, names `key`
    and a chunk set; for a sha256 key, claims that digest. Else None (junk, a tombstone)."""
    try:
        info = api.ObjectInfo.from_response(json.loads(data))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if info.deleted or info.name != key or not info.nuid or (info.chunks or 0) < 0:
        return None
    if len(key) == 64 and set(key) <= _HEX and digest_hex(info) != key:
        return None
    return info


class _Stored:
    """A meta message read through a consumer, as `_meta_messages` yields them (data, seq)."""

    def __init__(self, data: bytes, seq: int):
        self.data, self.seq = data, seq


class ObjectBucket:
    """One object store bucket, spoken to directly on its stream (see the module docstring)."""

    def __init__(self, js: JetStreamContext, name: str = ARTIFACTS_BUCKET, *, tenant: str | None = None,
                 restricted: bool = False):
        self.js = js
        self.nc = connection(js)
        self.name = name
        self.stream = f"OBJ_{name}"
        # the namespace objects are written to and looked up in (None: the bucket's own, as before)
        self.tenant = tenant if tenant and tenant != NO_TENANT else None
        self.restricted = restricted  # a tenant's client: consumers on its namespace only
        # How long a fetch may go without receiving a chunk before it is resumed/fails.
        self.stall_timeout = 10.0
        self.ack_timeout = 10.0
        self._nuid = NUID()

    def scoped(self, tenant: str | None, restricted: bool = False) -> ObjectBucket:
        """This bucket as seen in `tenant`'s namespace (None or NO_TENANT: the bucket's own)."""
        bucket = ObjectBucket(self.js, self.name, tenant=tenant, restricted=restricted)
        bucket.stall_timeout, bucket.ack_timeout = self.stall_timeout, self.ack_timeout
        return bucket

    def _meta_subject(self, key: str) -> str:
        name = base64.urlsafe_b64encode(key.encode()).decode()
        return f"$O.{self.name}.M.{self.tenant}.{name}" if self.tenant else f"$O.{self.name}.M.{name}"

    async def _consumed(self, subject: str, *, last: bool = False, limit: int = META_READ,
                        count_only: bool = False) -> tuple[list[Msg], int]:
        """(messages, count) of `subject` through a consumer on the filtered-create subject
        (captionbus.core.tenancy.held), the restricted reader's only way: the first `limit` (or
        the last one) and how many the subject holds. count_only reads none."""
        return await held(self.js, self.stream, subject,
                          deliver_policy=api.DeliverPolicy.LAST if last else api.DeliverPolicy.ALL,
                          headers_only=count_only, limit=0 if count_only else 1 if last else limit,
                          timeout=self.stall_timeout)

    def chunk_subject(self, nuid: str) -> str:
        return f"$O.{self.name}.C.{nuid}"

    async def info(self, key: str) -> api.ObjectInfo | None:
        """The object `key` as its first live meta message says (`located`), or None."""
        found = await self.located(key)
        return found[0] if found else None

    async def located(self, key: str, held: dict[str, int] | None = None) -> tuple[api.ObjectInfo, int] | None:
        """The first meta message of `key` that describes a readable object, and its sequence:
        live, naming `key`, claiming its digest (for a sha256 key), its chunk subject holding at
        least its chunks (`held`: nuid -> chunk messages, from `chunk_sets`, else asked). Earlier
        ones that fail (a tombstone or a bogus meta published before the real upload) are
        passed over; later ones are never read. None: no such message (gone, or never stored)."""
        async for msg in self._meta_messages(self._meta_subject(key)):
            info = _meta(msg.data, key)
            # its chunks in its own namespace only: a meta pointing into another tenant's (`<other>.<nuid>`)
            # would have readers follow, and gc purge (`delete`), what is not this namespace's
            if info is not None and info.nuid.rpartition(".")[0] != (self.tenant or ""):
                continue
            if info is not None and await self._chunks_held(info, held) >= (info.chunks or 0):
                return info, msg.seq
        return None

    async def _meta_messages(self, subject: str, after: int = 0):
        """The subject's meta messages, oldest first, at most META_READ of them."""
        if self.restricted:
            for msg in (await self._consumed(subject))[0]:
                if msg.metadata.sequence.stream > after:
                    yield _Stored(msg.data, msg.metadata.sequence.stream)
            return
        for _ in range(META_READ):
            try:
                msg = await self.js.get_msg(self.stream, seq=after + 1, next=True, subject=subject)
            except NotFoundError:
                return
            yield msg
            after = msg.seq

    async def _chunks_held(self, info: api.ObjectInfo, held: dict[str, int] | None = None) -> int:
        if held is not None:
            return held.get(info.nuid, 0)
        subject = self.chunk_subject(info.nuid)
        return (await self._subjects(subject)).get(subject, 0) if info.chunks else 0

    async def _last_seq(self, subject: str) -> int | None:
        if self.restricted:
            msgs, _ = await self._consumed(subject, last=True)
            return msgs[0].metadata.sequence.stream if msgs else None
        try:
            return (await self.js.get_last_msg(self.stream, subject)).seq
        except NotFoundError:
            return None

    def chunk_size(self) -> int:
        max_payload = self.nc.max_payload or CHUNK_SIZE
        # UPLOAD_BLOCK must split into whole chunks: a power of two no larger than max_payload.
        size = CHUNK_SIZE
        while size > max_payload and size > 1024:
            size //= 2
        return size

    async def _acked(self, fut: asyncio.Future, ref: ArtifactRef | None = None, chunk_subj: str = "") -> None:
        # nats-py's publish_async futures never time out on their own (a lost ack would hang).
        try:
            await asyncio.wait_for(fut, self.ack_timeout)
        except TimeoutError:
            if ref is not None:
                await self._probe_full(ref, chunk_subj)
            raise ArtifactError(f"object store did not acknowledge a chunk within {self.ack_timeout}s") from None
        except Exception as e:
            if ref is not None and (reason := store_full_reason(e)):
                raise self._full(ref, reason) from None
            raise

    def _full(self, ref: ArtifactRef, reason: str, used: int | None = None, limit: int | None = None) -> ArtifactStoreFull:
        where = f" ({used} of {limit} bytes used)" if limit else ""
        return ArtifactStoreFull(
            f"artifact store full: object store {self.name!r} refused {describe(ref)}: {reason}{where}; "
            "free space with `captionbus gc` or raise the bucket's max_bytes")

    async def check_room(self, ref: ArtifactRef) -> None:
        """Refuse at once an upload that cannot fit under the bucket's max_bytes (the server would
        refuse its chunks one by one; nats-py 2.16 leaves such an ack future unresolved, a 503
        whose empty body it fails to parse). Another writer may still fill it meanwhile:
        `_probe_full` names that case when an ack never comes."""
        if self.restricted:  # may not ask (stream info lists every object): the server says no if it must
            return
        try:
            info = await self.js.stream_info(self.stream)
        except Exception:  # no rights to ask, or a blink: the server still says no if it must
            return
        limit = info.config.max_bytes or -1
        if limit > 0 and info.state.bytes + ref.size > limit:
            raise self._full(ref, "maximum bytes exceeded", info.state.bytes, limit)

    async def _probe_full(self, ref: ArtifactRef, chunk_subj: str) -> None:
        """An ack that never came: ask once with a synchronous publish, which does raise the
        server's reason. Raises ArtifactStoreFull when the store is full; returns otherwise (the
        probe chunk, if stored, is purged with the torn upload)."""
        try:
            # As large as a chunk: a smaller probe may fit where the chunk did not.
            await self.js.publish(chunk_subj, bytes(self.chunk_size()), timeout=self.ack_timeout)
        except Exception as e:
            if reason := store_full_reason(e):
                raise self._full(ref, reason) from None

    async def upload(self, local: Path, ref: ArtifactRef) -> None:
        """Upload `local` as object `ref.key`, unless an object with these bytes is there."""
        existing = await self.info(ref.key)
        if existing is not None and existing.size == ref.size and await self._refreshed(existing):
            return
        await self.check_room(ref)
        nuid = self._nuid.next().decode()
        if self.tenant:  # its chunks in the namespace too; the meta names them by `<tenant>.<nuid>`
            nuid = f"{self.tenant}.{nuid}"
        chunk_size = self.chunk_size()
        window_len = max(1, UPLOAD_WINDOW_BYTES // chunk_size)
        chunk_subj = self.chunk_subject(nuid)
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
                            await self._acked(window.pop(0), ref, chunk_subj)
            while window:
                await self._acked(window.pop(0), ref, chunk_subj)
            if h.hexdigest() != ref.key:
                raise ArtifactCorrupt(f"{describe(ref)} changed on disk while uploading")
            # Anyone who may write objects may publish on this chunk subject; its name is listed
            # in stream info while we upload. Chunks added before the meta message would be read
            # as ours (readers take the subject's first chunks): refuse to name them. Added after
            # it, they come after our chunks and no reader reaches them.
            held = (await self._subjects(chunk_subj)).get(chunk_subj, 0)
            if held != chunks:
                raise ArtifactError(f"{describe(ref)}: its chunk subject holds {held} messages, not the "
                                    f"{chunks} uploaded (another writer published on it); store it again")
            info = api.ObjectInfo(
                name=ref.key,
                bucket=self.name,
                nuid=nuid,
                size=ref.size,
                chunks=chunks,
                mtime=utcnow().isoformat(),
                digest="SHA-256=" + base64.urlsafe_b64encode(h.digest()).decode(),
                options=api.ObjectMetaOptions(max_chunk_size=chunk_size),
            )
            try:
                await self.js.publish(self._meta_subject(ref.key), json.dumps(info.as_dict()).encode())
            except Exception as e:
                if reason := store_full_reason(e):
                    raise self._full(ref, reason) from None
                raise
        except BaseException:
            for fut in window:
                fut.cancel()
            await self._purge_chunks(chunk_subj)
            raise
        if existing is not None:
            # A torn earlier upload under the same key: its chunks are garbage now.
            await self._purge_chunks(self.chunk_subject(existing.nuid))

    async def _refreshed(self, existing: api.ObjectInfo) -> bool:
        """Content addressing: an object under this key is these bytes. An old one gets a fresh
        mtime (a copy of its meta message), so gc's grace period covers it until the job storing
        it again references it (captionbus/core/gc.py). The copy is published only if the subject's last
        message is still the one seen before the object was found again: if gc purged it in
        between, no meta naming purged chunks is written. False: gone, the caller uploads it."""
        if _age_s(existing.mtime) <= REFRESH_AFTER_S:
            return True
        subject = self._meta_subject(existing.name)
        last = await self._last_seq(subject)
        if last is None or await self.located(existing.name) is None:
            return False
        fresh = api.ObjectInfo.from_response({**existing.as_dict(), "mtime": utcnow().isoformat()})
        try:
            await self.js.publish(subject, json.dumps(fresh.as_dict()).encode(),
                                  headers={api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)})
        except Exception as e:  # noqa: BLE001 - a refresh is best effort, but for the one answer below
            if getattr(e, "err_code", None) == WRONG_LAST_SEQUENCE:  # written or purged since: look again
                return await self.info(existing.name) is not None
            pass  # could not refresh (a blink): the object is there all the same
        return True

    async def _purge_chunks(self, chunk_subject: str) -> None:
        """Best effort: drop a torn upload's chunks. Under the fleet's worker and client roles
        (deploy/nats/roles.conf) a purge is refused: NATS permissions cannot limit a purge to
        one subject, and an unfiltered purge would empty every job's artifacts. There the
        chunks stay, unreferenced, for a role allowed to collect them; on an open local bus
        they go now. Bounded, as a refused request gets no reply."""
        if self.restricted:  # a tenant's client may not purge (and would wait 2 s to hear it)
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.js.purge_stream(self.stream, subject=chunk_subject), 2)

    # ---- garbage collection (captionbus/core/gc.py; needs a role allowed to purge the bucket) -------------

    async def _subjects(self, pattern: str) -> dict[str, int]:
        if self.restricted:  # one literal subject (a chunk set): counted by a consumer
            return {pattern: (await self._consumed(pattern, count_only=True))[1]}
        info = await self.js.stream_info(self.stream, subjects_filter=pattern)
        return dict(info.state.subjects or {})

    async def list_objects(self) -> list[tuple[api.ObjectInfo, int]]:
        """Every object as `located` finds it, with the mtime of its latest refresh (a later
        live copy with the same nuid: the object stored again) and the sequence of its
        subject's last meta message, which `delete` takes. Subjects with no readable object
        (tombstones only, junk) are left out; their chunks are nobody's."""
        held = await self.chunk_sets()
        found = []
        for subject, count in (await self._subjects(f"$O.{self.name}.M.>")).items():
            if (one := await self.object_at(subject, held, count)) is not None:
                found.append(one)
        return found

    async def object_at(self, subject: str, held: dict[str, int], count: int = 2) -> tuple[api.ObjectInfo, int] | None:
        """One meta subject as gc must see it (`list_objects`): the object `located` finds there,
        its mtime that of its latest refresh, and the subject's last sequence (for `delete`);
        None when no message there describes a readable object. `held`: `chunk_sets()`;
        `count`: the subject's messages, if known (1 spares a lookup). Bus errors propagate."""
        prefix = f"$O.{self.name}.M."
        tenant, _, name = subject[len(prefix):].rpartition(".")  # `<tenant>.<name>` in a tenant's namespace
        try:
            key = base64.urlsafe_b64decode(name).decode()
        except ValueError:
            return None
        with contextlib.suppress(NotFoundError):  # purged meanwhile
            located = await self.scoped(tenant or None).located(key, held)
            if located is None:
                return None
            info, seq = located
            if count > 1:
                last = await self.js.get_last_msg(self.stream, subject)
                later = _meta(last.data, key)
                if later is not None and later.nuid == info.nuid and (timestamp(later.mtime) or 0) > (timestamp(info.mtime) or 0):
                    info.mtime = later.mtime
                seq = last.seq
            return info, seq
        return None

    async def chunk_sets(self) -> dict[str, int]:
        """nuid -> stored chunk messages, for every chunk subject in the bucket (live or torn)."""
        prefix = f"$O.{self.name}.C."
        return {s[len(prefix):]: n for s, n in (await self._subjects(f"{prefix}>")).items()}

    async def first_chunk_time(self, nuid: str):
        """When the first chunk of `nuid` was stored (a datetime or an ISO string), or None."""
        try:
            msg = await self.js.get_msg(self.stream, seq=1, next=True, subject=self.chunk_subject(nuid))
        except NotFoundError:
            return None
        return msg.time

    async def delete(self, info: api.ObjectInfo, meta_seq: int) -> bool:
        """Delete one object (gc; a purge, which only the gc user may make), unless it was
        stored again after its meta subject was read up to `meta_seq`: then False, and the
        object stays readable. The meta messages up to `meta_seq` go first; if a readable
        object remains on the subject (a refresh or a new upload published since), that is
        the "stored again" case and the chunks stay. Else what is left there (tombstones, junk
        read just now) goes, never a message published after that read, then the chunks."""
        where = self.scoped(info.nuid.rpartition(".")[0] or None)  # a tenant's object: its namespace
        subject = where._meta_subject(info.name)
        await self.js.purge_stream(self.stream, subject=subject, seq=meta_seq + 1)
        last = await self._last_seq(subject)
        if last is not None:
            if await where.located(info.name) is not None:
                return False
            await self.js.purge_stream(self.stream, subject=subject, seq=last + 1)
        await self.js.purge_stream(self.stream, subject=self.chunk_subject(info.nuid))
        return True

    async def purge_chunk_set(self, nuid: str) -> None:
        await self.js.purge_stream(self.stream, subject=self.chunk_subject(nuid))

    def consumer_config(self, info: api.ObjectInfo, inbox: str, last_sseq: int) -> api.ConsumerConfig:
        """An ephemeral flow-controlled push consumer on the object's chunks, from last_sseq on."""
        config = api.ConsumerConfig(
            deliver_subject=inbox,
            filter_subject=self.chunk_subject(info.nuid),
            ack_policy=api.AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=1.0,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=30.0,  # the server cleans up if we vanish
        )
        if self.restricted:  # created on the filtered-create subject, the only one a tenant may use
            config.name = self._nuid.next().decode()
        if last_sseq:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = last_sseq + 1
        else:
            config.deliver_policy = api.DeliverPolicy.ALL
        return config


class DiskSink:
    """Hash and write fetched chunks in the caller's thread: inline on the event loop for
    `ChunkReader` (a 1 MiB chunk is ~1.5 ms there), the direct reader's own thread for it.

    Measured on 2 cores shared with nats-server: handing each chunk from the event loop to
    a writer thread made `get` 2-3x slower (GIL hand-offs), and 4 MiB blocks were still
    ~1.5x slower than writing inline.
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

    def __enter__(self) -> DiskSink:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class Resume(Exception):
    """A chunk went missing or the stream stalled: go on with a fresh consumer from the
    reader's `last_sseq`."""


class ChunkReader:
    """One consumer's worth of a fetch on nats-py's connection (see ArtifactStore._read_chunks).

    `written` and `last_sseq` say where a previous reader stopped; they advance as chunks land.
    """

    def __init__(self, bucket: ObjectBucket, info: api.ObjectInfo, sink: DiskSink, written: int, last_sseq: int):
        self.bucket = bucket
        self.js = bucket.js
        self.nc = bucket.nc  # raw subscription: nats-py's JS subscribe wraps FC in a 0.25 s poll
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
                raise Resume(f"expected chunk {self.expect_dseq}, got {meta.sequence.consumer}")
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
        stall = self.bucket.stall_timeout
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(
            inbox, cb=self._on_msg,
            # Flow control bounds what is in flight; these only stop nats-py dropping it.
            pending_msgs_limit=64 * 1024, pending_bytes_limit=1024 * 1024 * 1024,
        )
        consumer = None
        try:
            config = self.bucket.consumer_config(self.info, inbox, self.last_sseq)
            consumer = (await self.js.add_consumer(self.bucket.stream, config)).name
            while True:
                seen = self.progress
                try:
                    await asyncio.wait_for(asyncio.shield(self.done), stall)
                    return
                except TimeoutError:
                    if self.progress == seen:
                        if self.written == 0 and self.last_sseq == 0:
                            raise ArtifactMissing(
                                f"object {self.info.name}: no chunks arrived within {stall}s "
                                "(deleted or replaced while reading?)"
                            ) from None
                        raise Resume(f"no chunk for {stall}s") from None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if consumer and not self.bucket.restricted:  # a tenant may not delete (inactive_threshold does)
                with contextlib.suppress(Exception):
                    await self.js.delete_consumer(self.bucket.stream, consumer)
