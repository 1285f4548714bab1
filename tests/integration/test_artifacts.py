"""Artifacts across hosts through a real nats-server's object store.

Two ArtifactStores with different data dirs stand for two hosts: the consumer never sees
the producer's files, only the bus.
"""
import asyncio
import base64
import hashlib
import json
import os
import threading
import time
import tracemalloc
from pathlib import Path

import nats.js.errors
import pytest

from captionbus.contracts import ArtifactRef, subjects
from captionbus.core import artifacts
from captionbus.core.artifacts import ArtifactCorrupt, ArtifactMissing, ArtifactStore, direct, transfer
from captionbus.core.bus import connect, provision
from captionbus.core.settings import Settings

CHUNK = artifacts.CHUNK_SIZE


def _random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
    return path


def run(url: str, tmp_path: Path, body):
    """Run body(js, producer, consumer) on a fresh connection; two hosts, one server."""

    async def main():
        nc = await connect(url, "test-artifacts")
        js = nc.jetstream()
        await provision(js)
        producer = ArtifactStore(Settings(home=tmp_path / "host-a", host_id="host-a"), js, use_object_store=True)
        consumer = ArtifactStore(Settings(home=tmp_path / "host-b", host_id="host-b"), js, use_object_store=True)
        try:
            return await body(js, producer, consumer)
        finally:
            await nc.close()

    return asyncio.run(main())


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * 1000 * 1000])
def test_round_trip_across_hosts(nats_server, tmp_path, size):
    src = _random_file(tmp_path / "input" / "clip.wav", size)

    async def body(js, producer, consumer):
        ref = await producer.put(src)
        assert ref.in_object_store and ref.origin_host == "host-a" and ref.size == size
        got = await consumer.get(ref)
        assert got == consumer.root / ref.key[:2] / ref.key  # landed in host-b's root
        assert got.read_bytes() == src.read_bytes()
        # The next get is local: a store with no bus at all finds it.
        offline = ArtifactStore(consumer.settings, None, use_object_store=False)
        assert await offline.get(ref) == got
        # Objects we write are ordinary object-store objects: nats-py reads them back.
        obj = await js.object_store(subjects.ARTIFACTS_BUCKET)
        assert (await obj.get(ref.key)).data == src.read_bytes()
        assert not any((consumer.root / ".tmp").iterdir())

    run(nats_server, tmp_path, body)


def test_put_skips_an_upload_that_is_already_there(nats_server, tmp_path):
    src = _random_file(tmp_path / "input" / "a.bin", 3 * CHUNK)
    again = tmp_path / "input" / "b.bin"
    again.write_bytes(src.read_bytes())

    async def body(js, producer, consumer):
        obj = await js.object_store(subjects.ARTIFACTS_BUCKET)
        ref = await producer.put(src)
        nuid = (await obj.get_info(ref.key)).nuid
        ref2 = await consumer.put(again)  # another host, same bytes
        assert ref2.key == ref.key and ref2.name == "b.bin" and ref2.origin_host == "host-b"
        assert (await obj.get_info(ref.key)).nuid == nuid  # not uploaded again

    run(nats_server, tmp_path, body)


def test_reads_objects_written_by_nats_py(nats_server, tmp_path):
    """A bucket nats-py wrote before provisioning turned its rollups off (an older fleet): its
    objects stay readable; nats-py's put, which sends a rollup, is refused from then on."""
    data = os.urandom(2 * CHUNK + 5)
    key = hashlib.sha256(data).hexdigest()

    async def body(js, producer, consumer):
        stream = f"OBJ_{subjects.ARTIFACTS_BUCKET}"
        config = (await js.stream_info(stream)).config
        config.allow_rollup_hdrs = True
        await js.update_stream(config)
        obj = await js.object_store(subjects.ARTIFACTS_BUCKET)
        await obj.put(key, data)
        await provision(js)
        assert not (await js.stream_info(stream)).config.allow_rollup_hdrs
        ref = ArtifactRef(key=key, name="x.bin", size=len(data), in_object_store=True)
        assert (await consumer.get(ref)).read_bytes() == data
        with pytest.raises(nats.js.errors.ServerError, match="rollup not permitted"):
            await obj.put("other", b"x")

    run(nats_server, tmp_path, body)


def test_other_bytes_published_under_the_key_later_are_never_served(nats_server, tmp_path):
    src = _random_file(tmp_path / "input" / "a.bin", 2 * CHUNK)

    async def body(js, producer, consumer):
        ref = await producer.put(src)
        # Appended by any writer: the object is its first meta message, so nothing changes.
        await _forge(js, ref, os.urandom(ref.size), replace=False)
        assert (await consumer.get(ref)).read_bytes() == src.read_bytes()

    run(nats_server, tmp_path, body)


def test_an_object_gc_deletes_while_it_is_stored_again_is_uploaded_not_revived(nats_server, tmp_path, monkeypatch):
    """Storing an old object again appends a fresh-mtime copy of its meta (gc's grace period).
    If gc purges the object between that lookup and the copy, the copy must not be written (it
    would name purged chunks): the store uploads the bytes again instead."""
    src = _random_file(tmp_path / "input" / "a.bin", 2 * CHUNK + 3)

    async def body(js, producer, consumer):
        ref = await producer.put(src)
        [(listed, seq)] = await producer.objects.list_objects()  # what a gc run read
        monkeypatch.setattr(transfer, "REFRESH_AFTER_S", -1.0)  # "old": refresh on the next put
        original, purged = producer.objects.located, []

        async def located(key, held=None):
            found = await original(key, held)
            if not purged:  # gc's delete lands right after the uploader's first lookup
                purged.append(await producer.objects.delete(listed, seq))
            return found

        monkeypatch.setattr(producer.objects, "located", located)
        assert await producer.put(src) == ref
        assert purged == [True]
        info = await consumer.objects.info(ref.key)
        assert info is not None and info.nuid != listed.nuid  # uploaded again, not revived
        assert (await consumer.get(ref)).read_bytes() == src.read_bytes()

    run(nats_server, tmp_path, body)


async def _forge(js, ref, data: bytes, *, replace: bool = True) -> None:
    """Put `data` as chunks under ref.key, behind a meta message that still claims ref's size and
    digest (and as many chunks as `data` fills): only checks made while streaming can tell.
    replace: purge the real meta first (the test bus has no users; on a fleet only gc may purge),
    so the forged one is the object's first; else the forged meta is appended, as any writer can."""
    obj = await js.object_store(subjects.ARTIFACTS_BUCKET)
    good = await obj.get_info(ref.key)
    nuid = "FORGED" + good.nuid[6:]
    for i in range(0, len(data), CHUNK):
        await js.publish(f"$O.{subjects.ARTIFACTS_BUCKET}.C.{nuid}", data[i:i + CHUNK])
    forged = {**good.as_dict(), "nuid": nuid, "chunks": -(-len(data) // CHUNK)}
    meta_subj = f"$O.{subjects.ARTIFACTS_BUCKET}.M.{base64.urlsafe_b64encode(ref.key.encode()).decode()}"
    if replace:
        await js.purge_stream(f"OBJ_{subjects.ARTIFACTS_BUCKET}", subject=meta_subj)
    await js.publish(meta_subj, json.dumps(forged).encode())


def test_corrupt_chunks_are_caught_while_streaming(nats_server, tmp_path):
    src = _random_file(tmp_path / "input" / "a.bin", 3 * CHUNK + 7)

    async def body(js, producer, consumer):
        ref = await producer.put(src)
        data = bytearray(src.read_bytes())
        data[CHUNK + 3] ^= 0xFF  # one byte changed, in the second chunk
        await _forge(js, ref, bytes(data))
        with pytest.raises(ArtifactCorrupt, match="hash to"):
            await consumer.get(ref)
        assert consumer.local_path(ref) is None
        assert not any((consumer.root / ".tmp").iterdir())

    run(nats_server, tmp_path, body)


def test_short_object_fails_at_its_last_chunk(nats_server, tmp_path):
    src = _random_file(tmp_path / "input" / "a.bin", 3 * CHUNK)

    async def body(js, producer, consumer):
        ref = await producer.put(src)
        await _forge(js, ref, src.read_bytes()[: 2 * CHUNK])  # a chunk lost, meta unchanged
        t0 = time.perf_counter()
        with pytest.raises(ArtifactCorrupt, match="ends after"):
            await consumer.get(ref)
        assert time.perf_counter() - t0 < consumer.objects.stall_timeout  # no waiting for a stall

    run(nats_server, tmp_path, body)


def test_missing_from_the_object_store_names_the_artifact(nats_server, tmp_path):
    async def body(js, producer, consumer):
        ref = ArtifactRef(key="ab" * 32, name="speech.wav", size=10, in_object_store=True)
        with pytest.raises(ArtifactMissing) as e:
            await consumer.get(ref)
        assert "speech.wav" in str(e.value) and "abababababab" in str(e.value)

    run(nats_server, tmp_path, body)


@pytest.mark.parametrize("use_direct", [True, False], ids=["direct", "nats-py"])
def test_a_dropped_chunk_resumes_where_it_stopped(nats_server, tmp_path, monkeypatch, use_direct):
    src = _random_file(tmp_path / "input" / "a.bin", 10 * CHUNK)
    original = transfer.ChunkReader._on_msg
    dropped = []

    async def lossy(self, msg):
        # Lose the 4th chunk once, as a nats-py slow-consumer drop would.
        if msg.data and not dropped and self.expect_dseq == 4:
            dropped.append(msg.metadata.sequence.stream)
            return
        await original(self, msg)

    def lossy_direct(self, reply):
        if not dropped and self.expect_dseq == 4:
            dropped.append(reply)
            return True
        return False

    monkeypatch.setattr(transfer.ChunkReader, "_on_msg", lossy)
    monkeypatch.setattr(direct.DirectReader, "_drop_hook", lossy_direct)

    async def body(js, producer, consumer):
        consumer.direct_fetch = use_direct
        ref = await producer.put(src)
        assert (await consumer.get(ref)).read_bytes() == src.read_bytes()
        assert dropped

    run(nats_server, tmp_path, body)


def test_concurrent_gets_of_one_artifact(nats_server, tmp_path):
    src = _random_file(tmp_path / "input" / "a.bin", 20 * CHUNK)

    async def body(js, producer, consumer):
        ref = await producer.put(src)
        paths = await asyncio.gather(*(consumer.get(ref) for _ in range(3)))
        assert len(set(paths)) == 1 and paths[0].read_bytes() == src.read_bytes()

    run(nats_server, tmp_path, body)


def test_large_file_is_streamed_not_held_in_memory(nats_server, tmp_path):
    size = 64 * 1024 * 1024
    src = _random_file(tmp_path / "input" / "film.wav", size)
    peaks = {}

    async def body(js, producer, consumer):
        # tracemalloc sees every Python allocation, including nats-py's message buffers.
        tracemalloc.start()
        try:
            ref = await producer.put(src)
            peaks["put"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            got = await consumer.get(ref)
            peaks["get"] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert artifacts.hash_file(got) == (ref.key, size)

    run(nats_server, tmp_path, body)
    print("traced peak bytes", peaks)
    # A small multiple of the flow-control window / publish window, nowhere near 64 MB.
    assert peaks["put"] < 16 * 1024 * 1024, peaks
    assert peaks["get"] < 16 * 1024 * 1024, peaks


def _read_through_nats_py(nats_server, tmp_path, monkeypatch) -> None:
    """A round trip that must go through transfer.ChunkReader (the direct reader is unavailable)."""
    src = _random_file(tmp_path / "input" / "a.bin", 3 * CHUNK + 11)
    used = []
    original = transfer.ChunkReader.run

    async def spy(self):
        used.append(self)
        await original(self)

    monkeypatch.setattr(transfer.ChunkReader, "run", spy)

    async def body(js, producer, consumer):
        ref = await producer.put(src)
        assert (await consumer.get(ref)).read_bytes() == src.read_bytes()
        assert used

    run(nats_server, tmp_path, body)


def test_falls_back_to_nats_py_when_the_direct_reader_cannot_connect(nats_server, tmp_path, monkeypatch):
    """TLS, nkeys/JWT or websocket connections are read through nats-py (transfer.ChunkReader)."""

    def unavailable(nc):
        raise direct.DirectUnavailable("TLS")

    monkeypatch.setattr(direct, "direct_endpoint", unavailable)
    _read_through_nats_py(nats_server, tmp_path, monkeypatch)


def test_the_direct_reader_is_off_for_another_nats_py(nats_server, tmp_path, monkeypatch):
    """It reads private nats-py attributes: any version but the one it was written for
    (checked at import) reads through nats-py instead."""
    assert direct.AVAILABLE == (direct.NATS_PY_VERSION == direct.WRITTEN_FOR)
    monkeypatch.setattr(direct, "AVAILABLE", False)
    monkeypatch.setattr(direct, "NATS_PY_VERSION", "2.99.0")
    with pytest.raises(direct.DirectUnavailable, match="2.99.0"):
        direct.DirectReader(None, None, None, 0, 0)
    _read_through_nats_py(nats_server, tmp_path, monkeypatch)


def test_upload_chunks_fit_the_servers_max_payload(nats_server, tmp_path):
    src = _random_file(tmp_path / "input" / "a.bin", 3 * CHUNK + 1)

    async def body(js, producer, consumer):
        obj = await js.object_store(subjects.ARTIFACTS_BUCKET)
        assert producer.objects.chunk_size() == min(CHUNK, js._nc.max_payload)
        ref = await producer.put(src)
        info = await obj.get_info(ref.key)
        assert info.chunks == 4 and info.options.max_chunk_size == CHUNK
        js._nc._max_payload = 300_000  # a server configured with a smaller max_payload
        assert producer.objects.chunk_size() == 256 * 1024

    run(nats_server, tmp_path, body)


def test_get_keeps_the_event_loop_free_and_cancels_cleanly(nats_server, tmp_path):
    """The direct reader hashes and writes in a thread: heartbeats keep running meanwhile,
    and a cancelled fetch leaves no temp file and no thread writing behind it."""
    src = _random_file(tmp_path / "input" / "a.bin", 48 * 1024 * 1024)

    async def body(js, producer, consumer):
        ref = await producer.put(src)
        gaps = []

        async def ticker():
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        try:
            await consumer.get(ref)
        finally:
            tick.cancel()
        assert gaps and max(gaps) < 0.25, max(gaps)

        other = ArtifactStore(Settings(home=tmp_path / "host-c", host_id="host-c"), js, use_object_store=True)
        fetch = asyncio.create_task(other.get(ref))
        await asyncio.sleep(0.05)
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
        assert other.local_path(ref) is None
        assert not any((other.root / ".tmp").iterdir())
        for t in threading.enumerate():  # done with the file; at most returning now
            if t.name == "artifact-fetch":
                t.join(timeout=1.0)
                assert not t.is_alive()

    run(nats_server, tmp_path, body)
