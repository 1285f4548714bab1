"""JetStream drops a message whose `Nats-Msg-Id` it saw in the last two minutes, whatever its
subject. Event ids that anyone can predict (`<job>.<node>.<attempt>.completed`, `<job>.completed`)
let a writer on *any* event subject it may use publish junk under the id of a result or a job
event that is about to come, and the real one is then dropped as a duplicate: the worker's
result is lost (the job waits for its deadline), the job's `completed` event never reaches
followers and webhooks. The ids of results and of the coordinator's events are bound to a
secret the attacker lacks (the request's token, the coordinator's key), so this must fail."""
from __future__ import annotations

import asyncio

from nats.js.api import ConsumerConfig, DeliverPolicy

from captionbus.contracts import subjects
from captionbus.core.tenancy import named
from tests.security.attacks import predictable_ids
from tests.security.fleet import secured_fleet, start_worker


def test_predictable_event_ids_cannot_be_taken_first(tmp_path):
    async def main():
        async with secured_fleet(tmp_path, worker=False) as fleet:
            from captionbus.client import submit
            from captionbus.core.artifacts import ArtifactStore
            media = tmp_path / "in.wav"
            media.write_bytes(b"RIFF" + bytes(range(256)) * 400)
            store = ArtifactStore(fleet.settings("client", "submitter"), fleet.js["client"])
            await submit(fleet.js["client"], store, media, workflow="made", job_id="job-ids")
            await fleet.wait("job-ids", "running")
            taken = []
            for role, subject, msg_id in predictable_ids("job-ids", "noop"):
                ack = await fleet.js[role].publish(subject, b"{}", headers={"Nats-Msg-Id": msg_id})
                taken.append(not ack.duplicate)
            async with start_worker(fleet):
                done = await fleet.wait("job-ids", "completed", timeout=30)
            sub = await fleet.js["client"].subscribe(  # named: deploy/nats/roles.conf
                subjects.job_events("job-ids"), ordered_consumer=True,
                config=named(ConsumerConfig(deliver_policy=DeliverPolicy.ALL)))
            kinds = []
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except Exception:
                    break
                kinds.append(msg.subject.rsplit(".", 1)[1])
            await sub.unsubscribe()
            return taken, done, kinds

    taken, done, kinds = asyncio.run(asyncio.wait_for(main(), 90))
    assert all(taken)  # the junk was stored under those ids ...
    assert done.status.value == "completed"  # ... and the worker's result still applied
    assert "stage_completed" in kinds and "completed" in kinds, kinds  # every follower sees both
