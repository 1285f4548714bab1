"""Issue 18, item 1: no ordinary credential can erase, roll up or tombstone data it did not write.

Each attack is one that was made against the secured fleet: a `Nats-Rollup: all` publish on one
object-metadata subject emptied OBJ_cb_artifacts (58 messages / 26.8 MB to 1 message / 85 B) and
a completed job's `fetch` failed; a `deleted` metadata message from worker-asr or a client made
another job's outputs unfetchable. Here every credential that may write to the bus tries them
after a job completed, and the job's input and output must still fetch byte-identically (each
time through the object store, into a fresh local root), also after gc ran over the wreckage."""
from __future__ import annotations

import asyncio
import base64
import json
import os
from datetime import datetime, timezone

from nats.js.api import Header

from captionbus.contracts import subjects
from captionbus.core.artifacts import ArtifactError, ArtifactStore, hash_file, transfer
from captionbus.core.gc import collect
from tests.security.attacks import BUCKET, STREAM, WRITERS, meta_subject, refused, tamper
from tests.security.fleet import secured_fleet


# Roles with no publish rights on the object store (the dashboard's acting role included).
NON_WRITERS = ("gc", "dashboard", "dashboard_downloads", "dashboard_operator")


def test_rollups_are_refused_for_every_writer_and_the_job_outputs_survive(tmp_path):
    """`Nats-Rollup: all` and `sub` on object metadata and chunk subjects (every credential that
    may publish there), on the webhook state (the gateway's KV) and on job events: all refused,
    the streams keep every message, the completed job fetches byte-identically."""

    async def main():
        async with secured_fleet(tmp_path) as fleet:
            state, before = await fleet.run_job("job-kept")
            js = fleet.js
            held = (await js["coordinator"].stream_info(STREAM)).state.messages
            tried = []
            for role in WRITERS:  # the stream refuses them (10111), at once
                for subject in ("$O.cb_artifacts.M.zz", meta_subject(state.outputs["out"].key),
                                f"$O.{BUCKET}.C.zz"):
                    for rollup in ("all", "sub"):
                        tried.append((role, subject, rollup))
                        assert await refused(js[role], subject, headers={Header.ROLLUP: rollup}), (role, subject, rollup)
            for role in NON_WRITERS:  # may not publish there at all (a timeout)
                tried.append((role, "$O.cb_artifacts.M.zz", "all"))
                assert await refused(js[role], "$O.cb_artifacts.M.zz", headers={Header.ROLLUP: "all"}), role
            assert await refused(js["gateway"], "$KV.cb_webhooks.zz", headers={Header.ROLLUP: "all"})
            assert (await js["coordinator"].stream_info(STREAM)).state.messages == held
            # Job events (the stream was never created with rollups): each writer on a subject it may use.
            events = (await js["coordinator"].stream_info(subjects.EVENTS_STREAM)).state.messages
            for role, kind in (("worker", "stage_progress"), ("worker-asr", "stage_warning"),
                               ("client", "cancel_requested"), ("gateway", "retry_requested")):
                assert await refused(js[role], f"captionbus.job.job-kept.{kind}", headers={Header.ROLLUP: "all"}), role
            assert (await js["coordinator"].stream_info(subjects.EVENTS_STREAM)).state.messages == events
            after = await fleet.fetch(state)
            return before, after, tried

    before, after, tried = asyncio.run(asyncio.wait_for(main(), 120))
    assert len(tried) == len(WRITERS) * 3 * 2 + len(NON_WRITERS)
    assert after == before


def test_a_worker_cannot_roll_up_the_stage_cache(tmp_path):
    """worker-asr may write its own stage's cache keys; `Nats-Rollup: all` from there used to empty
    every stage's entries. The bucket refuses rollups (gc deletes entries by filtered purge)."""
    async def main():
        async with secured_fleet(tmp_path, worker=False) as fleet:
            cache = await fleet.js["worker"].key_value(subjects.STAGE_CACHE_BUCKET)
            await cache.put("noop." + "a" * 64, b'{"outputs": {}}')
            said_no = await refused(fleet.js["worker-asr"], f"$KV.{subjects.STAGE_CACHE_BUCKET}.asr.zz",
                                     headers={Header.ROLLUP: "all"})
            return said_no, (await cache.get("noop." + "a" * 64)).value

    said_no, value = asyncio.run(asyncio.wait_for(main(), 60))
    assert said_no and value == b'{"outputs": {}}'


def test_tombstones_bogus_metadata_and_extra_chunks_change_nothing(tmp_path):
    """worker, worker-asr, client and gateway each publish what their rights allow on a
    completed job's objects: a `deleted` tombstone (what nats-py's delete writes), a live meta
    naming other chunks of the same size and digest, junk, and extra chunks on the real chunk
    subject. An object is its first meta message, so readers see the job's bytes. Then gc (the
    only user that may purge) runs over it all, inside retention: it deletes no object and
    collects only the attackers' chunks; the job still fetches byte-identically."""

    async def main():
        async with secured_fleet(tmp_path) as fleet:
            state, before = await fleet.run_job("job-target")
            refs = [state.spec.input, *state.outputs.values()]
            obj = await fleet.js["client"].object_store(BUCKET)
            goods = {ref.key: await obj.get_info(ref.key) for ref in refs}
            junk = 0
            for role in WRITERS:
                js = fleet.js[role]
                for ref in refs:
                    good, subject = goods[ref.key], meta_subject(ref.key)
                    junk += len(await tamper(js, role, good))
                    last = await fleet.js["client"].get_last_msg(STREAM, subject)
                    assert json.loads(last.data)["deleted"]  # what nats-py's get_info reads: "deleted" ...
            after_attacks = await fleet.fetch(state)  # ... captionbus reads the first meta message
            gc = fleet.settings("gc", "gc")
            later = datetime.now(timezone.utc).timestamp() + 2 * 3600  # past the grace, inside retention
            dry = await collect(gc, fleet.js["gc"], dry_run=True, now=later)
            done = await collect(gc, fleet.js["gc"], now=later)
            after_gc = await fleet.fetch(state)
            return before, after_attacks, after_gc, dry, done, junk

    before, after_attacks, after_gc, dry, done, junk = asyncio.run(asyncio.wait_for(main(), 120))
    assert after_attacks == before
    assert after_gc == before
    assert dry.object_store.count == 0 and done.object_store.count == 0
    assert done.torn_uploads.count == dry.torn_uploads.count == junk  # the attackers' chunk sets only


def test_metadata_published_before_an_upload_does_not_hide_it(tmp_path):
    """A writer who knows the hash of bytes someone will store publishes their meta first:
    a tombstone, then a live one naming chunks that do not exist. The upload that follows is
    not skipped as "already there"; the job runs and its input fetches byte-identically."""

    async def main():
        async with secured_fleet(tmp_path) as fleet:
            media = tmp_path / "known.wav"
            media.write_bytes(b"RIFF" + os.urandom(150_000))
            key, size = hash_file(media)
            digest = "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(key)).decode()
            meta = {"name": key, "bucket": BUCKET, "nuid": "NOSUCHCHUNKS", "size": size, "chunks": 2,
                    "digest": digest, "mtime": datetime.now(timezone.utc).isoformat()}
            js = fleet.js["worker-asr"]
            await js.publish(meta_subject(key), json.dumps({**meta, "deleted": True}).encode())
            await js.publish(meta_subject(key), json.dumps(meta).encode())
            store = ArtifactStore(fleet.settings("client", "uploader"), fleet.js["client"])
            ref = await store.put(media)
            fresh = ArtifactStore(fleet.settings("client", "reader"), fleet.js["client"])
            return (await fresh.get(ref)).read_bytes() == media.read_bytes()

    assert asyncio.run(asyncio.wait_for(main(), 60))


def test_chunks_slipped_into_an_upload_fail_it_instead_of_being_named(tmp_path, monkeypatch):
    """The chunk subject of an upload in progress is listed in stream info, and any writer may
    publish on it: worker-asr adds a chunk while the client's upload waits for its acks. The
    upload fails rather than publish a meta naming foreign bytes, nothing is stored under the
    key, and storing it again works."""
    async def main():
        async with secured_fleet(tmp_path, worker=False) as fleet:
            attacker = fleet.js["worker-asr"]
            media = tmp_path / "film.wav"
            media.write_bytes(os.urandom(3 * transfer.CHUNK_SIZE + 11))
            store = ArtifactStore(fleet.settings("client", "uploader"), fleet.js["client"])
            original = transfer.ObjectBucket._acked
            slipped = []

            async def acked(self, fut, ref=None, chunk_subj=""):
                if chunk_subj and not slipped:  # the chunks are out, the meta not yet
                    slipped.append(await attacker.publish(chunk_subj, b"mine"))
                return await original(self, fut, ref, chunk_subj)

            monkeypatch.setattr(transfer.ObjectBucket, "_acked", acked)
            try:
                await store.put(media)
                failed = None
            except ArtifactError as e:
                failed = str(e)
            monkeypatch.setattr(transfer.ObjectBucket, "_acked", original)
            found = await store.objects.info(hash_file(media)[0])
            ref = await store.put(media)
            fresh = ArtifactStore(fleet.settings("client", "reader"), fleet.js["client"])
            return failed, found, (await fresh.get(ref)).read_bytes() == media.read_bytes(), slipped

    failed, found, fetched, slipped = asyncio.run(asyncio.wait_for(main(), 60))
    assert slipped and failed and "another writer published on it" in failed, failed
    assert found is None  # no meta was published for the tainted upload
    assert fetched
