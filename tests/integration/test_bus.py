import asyncio

from captionbus.bus import StagePolicy, connect, ensure_stage_consumer, provision
from contracts import subjects


def test_provision_is_idempotent_and_creates_everything(nats_server):
    async def main():
        nc = await connect(nats_server, "test")
        js = nc.jetstream()
        await provision(js)
        await provision(js)  # a second process doing the same must not fail
        names = {s.config.name for s in await js.streams_info()}
        assert {subjects.REQUESTS_STREAM, subjects.EVENTS_STREAM} <= names
        kv = await js.key_value(subjects.JOBS_BUCKET)
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"
        await js.object_store(subjects.ARTIFACTS_BUCKET)
        durable = await ensure_stage_consumer(js, "demux", StagePolicy())
        durable2 = await ensure_stage_consumer(js, "demux", StagePolicy())
        assert durable == durable2 == "stage-demux"
        await nc.close()

    asyncio.run(main())
