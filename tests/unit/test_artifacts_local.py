"""Artifacts on one host: the local root only, no server."""
import asyncio
import errno
import hashlib
import os
from pathlib import Path

import pytest

from captionbus.contracts import ArtifactRef
from captionbus.core import artifacts
from captionbus.core.artifacts import ArtifactError, ArtifactMissing, ArtifactStore, safe_name
from captionbus.core.settings import Settings


def _store(tmp_path: Path, host: str = "h1") -> ArtifactStore:
    return ArtifactStore(Settings(home=tmp_path / host, host_id=host), None, use_object_store=False)


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_put_keys_by_sha256_and_hardlinks_into_the_root(tmp_path):
    store = _store(tmp_path)
    src = _file(tmp_path / "in" / "clip.wav", b"RIFF....some audio")
    ref = asyncio.run(store.put(src))
    assert ref.key == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (ref.name, ref.size, ref.media_type) == ("clip.wav", src.stat().st_size, "audio/x-wav")
    assert ref.origin_host == "h1" and not ref.in_object_store
    local = store.local_path(ref)
    assert local == store.root / ref.key[:2] / ref.key
    assert os.path.samefile(local, src)  # same filesystem: no bytes copied
    assert asyncio.run(store.get(ref)) == local
    assert not any((store.root / ".tmp").iterdir())  # no temp files left behind


def test_put_copies_when_hardlinks_fail(tmp_path, monkeypatch):
    store = _store(tmp_path)
    src = _file(tmp_path / "in" / "a.bin", os.urandom(3 * artifacts.IO_BUFFER + 17))

    def no_link(*_a, **_k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    ref = asyncio.run(store.put(src))
    local = store.local_path(ref)
    assert not os.path.samefile(local, src)
    assert local.read_bytes() == src.read_bytes()
    assert ref.key == hashlib.sha256(src.read_bytes()).hexdigest()


def test_same_content_twice_is_one_file(tmp_path):
    store = _store(tmp_path)
    a = _file(tmp_path / "in" / "a.txt", b"same")
    b = _file(tmp_path / "in" / "b.txt", b"same")
    ra, rb = asyncio.run(store.put(a)), asyncio.run(store.put(b))
    assert ra.key == rb.key and ra.name == "a.txt" and rb.name == "b.txt"
    assert len(list(store.root.glob("??/*"))) == 1


def test_empty_file(tmp_path):
    store = _store(tmp_path)
    ref = asyncio.run(store.put(_file(tmp_path / "in" / "empty", b"")))
    assert ref.key == artifacts.EMPTY_SHA256 and ref.size == 0
    assert asyncio.run(store.get(ref)).read_bytes() == b""


@pytest.mark.parametrize(
    "raw, safe",
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\system32", "system32"),
        ("..", "artifact"),
        (".", "artifact"),
        ("", "artifact"),
        ("a\x00b\nc.srt", "abc.srt"),
        ("x" * 300 + ".mkv", "x" * 196 + ".mkv"),
    ],
)
def test_safe_name(raw, safe):
    assert safe_name(raw) == safe
    ArtifactRef(key="0" * 64, name=safe_name(raw), size=0)  # always a valid ref name


def test_path_like_names_never_escape(tmp_path):
    store = _store(tmp_path)
    src = _file(tmp_path / "in" / "x.srt", b"1\n00:00:00,000 --> 00:00:01,000\nhi\n")
    ref = asyncio.run(store.put(src, name="../../etc/passwd"))
    assert ref.name == "passwd"
    # A ref from another process is untrusted: one built without validation must not
    # steer get() outside dest_dir either.
    evil = ArtifactRef.model_construct(**{**ref.model_dump(), "name": "../../../escape"})
    dest = tmp_path / "work" / "job"
    got = asyncio.run(store.get(evil, dest))
    assert got == dest / "escape" and got.read_bytes() == src.read_bytes()
    assert not (tmp_path / "escape").exists()
    bad_key = ArtifactRef.model_construct(key="../" * 21 + "x", name="a", size=1)
    with pytest.raises(ArtifactError):
        store.local_path(bad_key)


def test_get_into_dest_dir_gives_a_named_view(tmp_path):
    store = _store(tmp_path)
    src = _file(tmp_path / "in" / "clip.wav", b"abc")
    ref = asyncio.run(store.put(src))
    got = asyncio.run(store.get(ref, tmp_path / "work"))
    assert got == tmp_path / "work" / "clip.wav" and got.read_bytes() == b"abc"
    assert asyncio.run(store.get(ref, tmp_path / "work")) == got  # idempotent


def test_missing_artifact_names_it_and_says_why(tmp_path):
    producer, consumer = _store(tmp_path, "h1"), _store(tmp_path, "h2")
    ref = asyncio.run(producer.put(_file(tmp_path / "in" / "speech.wav", b"x" * 10)))
    with pytest.raises(ArtifactMissing) as e:
        asyncio.run(consumer.get(ref))
    msg = str(e.value)
    assert "speech.wav" in msg and ref.key[:12] in msg and "CAPTIONBUS_ARTIFACTS=object" in msg
    assert isinstance(e.value, FileNotFoundError)
    in_store = ref.model_copy(update={"in_object_store": True})
    with pytest.raises(ArtifactMissing, match="no bus"):
        asyncio.run(consumer.get(in_store))


def test_a_local_file_with_the_wrong_size_is_not_trusted(tmp_path):
    store = _store(tmp_path)
    ref = asyncio.run(store.put(_file(tmp_path / "in" / "a.bin", b"0123456789")))
    local = store.local_path(ref)
    os.unlink(local)
    local.write_bytes(b"01234")  # torn
    assert store.local_path(ref) is None and not local.exists()
    with pytest.raises(ArtifactMissing):
        asyncio.run(store.get(ref))


def test_object_store_needs_a_bus(tmp_path):
    with pytest.raises(ArtifactError):
        ArtifactStore(Settings(home=tmp_path, host_id="h"), None, use_object_store=True)


def test_put_refuses_non_files(tmp_path):
    with pytest.raises(ArtifactError):
        asyncio.run(_store(tmp_path).put(tmp_path))


def test_put_from_another_filesystem_copies(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a writable /dev/shm on another filesystem")
    src = shm / f"captionbus-test-{os.getpid()}.bin"
    try:
        _file(src, os.urandom(100_000))
        store = _store(tmp_path)
        ref = asyncio.run(store.put(src))
        local = store.local_path(ref)
        assert local.read_bytes() == src.read_bytes() and not os.path.samefile(local, src)
    finally:
        src.unlink(missing_ok=True)


def test_old_temp_files_are_swept(tmp_path):
    store = _store(tmp_path)
    tmp_dir = store.root / ".tmp"
    tmp_dir.mkdir(parents=True)
    old, fresh = tmp_dir / "old.part", tmp_dir / "fresh.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (0, 0))
    _store(tmp_path)  # a new process on this host
    assert not old.exists() and fresh.exists()


def test_put_with_copy_keeps_the_store_independent_of_the_source(tmp_path):
    import asyncio

    from captionbus.core.artifacts import ArtifactStore
    from captionbus.core.settings import Settings

    store = ArtifactStore(Settings(home=tmp_path / "home", nats_url=None, artifacts_mode="local", host_id="h"), None)
    source = tmp_path / "film.mp4"
    source.write_bytes(b"original bytes")
    ref = asyncio.run(store.put(source, copy=True))
    with open(source, "r+b") as f:  # the user edits their file in place after submitting
        f.write(b"EDITED")
    assert store.local_path(ref).read_bytes() == b"original bytes"
    assert not os.path.samefile(source, store.local_path(ref))
