"""The coordinator against a real nats-server -js: fake stage workers answer its requests."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import nats
from captionbus.bus import StagePolicy, ensure_stage_consumer, provision
from contracts import (
    ArtifactRef,
    JobCancelRequested,
    JobSpec,
    JobState,
    JobStatus,
    JobSubmitted,
    StageCompleted,
    StageRequest,
    parse_event,
    subjects,
)
from coordinator.decide import Policy
from coordinator.graph import DEFAULT_WORKFLOWS_DIR, load_workflow
from coordinator.service import Coordinator

# The fake workers produce exactly what the real graph declares.
STAGE_OUTPUTS = {
    node.stage_name(name): node.outputs
    for name, node in load_workflow(DEFAULT_WORKFLOWS_DIR / "transcribe.yaml").nodes.items()
}
INPUT = ArtifactRef(key="0" * 64, name="film.mp4", size=10)
POLICY = Policy(max_attempts=2, backoff_initial_s=0.2)


def artifact(name: str) -> ArtifactRef:
    return ArtifactRef(key=hashlib.sha256(name.encode()).hexdigest(), name=name, size=1)


def completion_for(request: StageRequest) -> StageCompleted:
    outputs = {o: artifact(f"{request.job_id}.{request.node}.{request.attempt}.{o}") for o in STAGE_OUTPUTS[request.stage]}
    return StageCompleted(job_id=request.job_id, stage=request.stage, node=request.node,
                          attempt=request.attempt, outputs=outputs, worker={"name": "fake"})


async def publish_event(js, event, msg_id: str | None = None) -> None:
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await js.publish(subjects.job_event(event.job_id, event.kind), event.model_dump_json().encode(), headers=headers)


async def submit(js, job_id: str) -> None:
    spec = JobSpec(job_id=job_id, input=INPUT, source_language="en")
    event = JobSubmitted(job_id=job_id, spec=spec)
    await publish_event(js, event, event.event_id)


class FakeWorker:
    """Answers one stage's requests with a StageCompleted, like services/runtime would."""

    def __init__(self, js, stage: str, policy: StagePolicy | None = None):
        self.js, self.stage, self.policy = js, stage, policy or StagePolicy(ack_wait=5)
        self.handled: list[StageRequest] = []

    async def sub(self):
        durable = await ensure_stage_consumer(self.js, self.stage, self.policy)
        return await self.js.pull_subscribe_bind(durable=durable, stream=subjects.REQUESTS_STREAM)

    async def answer(
        self, count: int = 1, timeout: float = 10.0, ack: bool = True, linger_s: float = 0.0
    ) -> list[StageRequest]:
        """Take `count` requests; with ack=False play a worker that dies on each one. `linger_s`
        keeps pulling afterwards (the server redelivers, and gives up, only to a waiting pull)."""
        sub = await self.sub()
        got: list[StageRequest] = []
        deadline = time.monotonic() + timeout
        linger_until = 0.0
        while (len(got) < count or time.monotonic() < linger_until) and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(1, timeout=0.5)
            except asyncio.TimeoutError:
                continue
            for msg in msgs:
                request = StageRequest.model_validate_json(msg.data)
                got.append(request)
                if len(got) == count:
                    linger_until = time.monotonic() + linger_s
                if ack:
                    await publish_event(self.js, completion_for(request), f"{request.key}.completed")
                    await msg.ack()
        await sub.unsubscribe()
        assert len(got) == count, f"{self.stage}: got {len(got)} requests, wanted {count}"
        self.handled += got
        return got


@dataclass
class Bus:
    nc: Any
    js: Any
    kv: Any

    def coordinator(self, nc: Any = None) -> Coordinator:
        return Coordinator(nc or self.nc, policy=POLICY, tick_interval_s=0.2)

    async def state_when(self, job_id: str, predicate, timeout: float = 15.0) -> JobState:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                state = JobState.model_validate_json((await self.kv.get(job_id)).value)
                if predicate(state):
                    return state
            await asyncio.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached the expected state; last: {state and state.status}")

    async def finished(self, job_id: str) -> JobState:
        return await self.state_when(job_id, lambda s: s.status.finished)

    async def answer(self, *stages: str) -> list[StageRequest]:
        return [r for stage in stages for r in await FakeWorker(self.js, stage).answer()]

    async def events(self, job_id: str) -> list:
        sub = await self.js.subscribe(subjects.job_events(job_id), ordered_consumer=True)
        events = []
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                events.append(parse_event((await sub.next_msg(timeout=0.5)).data))
        await sub.unsubscribe()
        return events


def on_bus(url: str, scenario) -> None:
    async def main():
        nc = await nats.connect(url)
        js = nc.jetstream()
        await provision(js)
        try:
            await scenario(Bus(nc, js, await js.key_value(subjects.JOBS_BUCKET)))
        finally:
            await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_transcribe_job_completes_with_fake_workers(nats_server):
    async def scenario(bus: Bus):
        async with bus.coordinator():
            await submit(bus.js, "job1")
            await bus.answer("demux", "asr", "subtitle_gen")
            [mux] = await bus.answer("mux")
            state = await bus.finished("job1")
        assert mux.inputs == {"media": INPUT}
        assert mux.input_lists == {"subtitles": [artifact("job1.subtitle_gen.1.srt")]}
        assert state.status == JobStatus.completed
        assert state.outputs["mkv"] == artifact("job1.mux.1.mkv")
        assert state.outputs["srt"] == artifact("job1.subtitle_gen.1.srt")
        kinds = [e.kind for e in await bus.events("job1")]
        assert kinds.count("stage_requested") == 4 and kinds[-1] == "completed"

    on_bus(nats_server, scenario)


def test_job_survives_coordinator_restart(nats_server):
    async def scenario(bus: Bus):
        first = bus.coordinator()
        await first.start()
        await submit(bus.js, "job2")
        await bus.answer("demux")
        await bus.state_when("job2", lambda s: s.nodes["asr"].status.value == "requested")
        await first.stop()
        # While no coordinator runs, asr finishes: its completion waits in the events stream.
        await bus.answer("asr")
        second_nc = await nats.connect(nats_server)  # as a new process would: its own connection
        try:
            async with bus.coordinator(second_nc):
                await bus.answer("subtitle_gen", "mux")
                state = await bus.finished("job2")
        finally:
            await second_nc.close()
        assert state.status == JobStatus.completed
        assert {n: s.attempt for n, s in state.nodes.items()} == {"demux": 1, "asr": 1, "subtitle_gen": 1, "mux": 1}

    on_bus(nats_server, scenario)


def test_duplicate_completion_is_applied_once(nats_server):
    async def scenario(bus: Bus):
        async with bus.coordinator():
            await submit(bus.js, "job3")
            [request] = await bus.answer("demux")
            # The same event again (a redelivered publish past dedup), and a second worker's own
            # completion of the same attempt (a new event id): both must change nothing.
            again = completion_for(request)
            await publish_event(bus.js, again)
            await publish_event(bus.js, again)
            await publish_event(bus.js, completion_for(request))
            await bus.answer("asr", "subtitle_gen", "mux")
            state = await bus.finished("job3")
            await asyncio.sleep(0.3)
        assert state.status == JobStatus.completed
        requested = Counter(e.node for e in await bus.events("job3") if e.kind == "stage_requested")
        assert requested == {"demux": 1, "asr": 1, "subtitle_gen": 1, "mux": 1}

    on_bus(nats_server, scenario)


def test_request_that_exhausts_its_deliveries_fails_the_job(nats_server):
    async def scenario(bus: Bus):
        async with bus.coordinator():
            await submit(bus.js, "job4")
            crashing = FakeWorker(bus.js, "demux", StagePolicy(ack_wait=0.5, max_deliver=2))
            await crashing.answer(count=2, ack=False, linger_s=2.0)
            state = await bus.finished("job4")
        assert state.status == JobStatus.failed
        assert state.error == (
            "stage demux (demux) failed: stage demux crashed or timed out on every one of 2 deliveries"
        )
        info = await bus.js.stream_info(subjects.REQUESTS_STREAM)
        assert info.state.messages == 0  # the poison request is gone from the work queue

    on_bus(nats_server, scenario)


def test_cancel_over_the_bus(nats_server):
    async def scenario(bus: Bus):
        async with bus.coordinator():
            await submit(bus.js, "job5")
            await bus.state_when("job5", lambda s: s.status == JobStatus.running)
            await publish_event(bus.js, JobCancelRequested(job_id="job5"))
            state = await bus.finished("job5")
        assert state.status == JobStatus.cancelled

    on_bus(nats_server, scenario)


def test_stage_deadline_expires_and_the_tick_loop_requests_again(nats_server):
    clock = [datetime.now(timezone.utc)]  # the coordinator's time, moved by the test: no sleeping

    async def scenario(bus: Bus):
        async with Coordinator(bus.nc, policy=POLICY, tick_interval_s=0.1, clock=lambda: clock[0]):
            await submit(bus.js, "job6")
            [silent] = await FakeWorker(bus.js, "demux").answer(ack=False)  # takes it, never answers
            clock[0] += timedelta(seconds=1800)  # transcribe.yaml: demux deadline_s 1800
            await bus.state_when("job6", lambda s: s.nodes["demux"].status.value == "retry_wait")
            clock[0] += timedelta(seconds=POLICY.backoff_initial_s)
            [second] = await bus.answer("demux")
            await publish_event(bus.js, completion_for(silent))  # the first one wakes up: too late
            await bus.answer("asr", "subtitle_gen", "mux")
            state = await bus.finished("job6")
        assert (silent.attempt, second.attempt) == (1, 2)
        assert state.status == JobStatus.completed
        assert state.nodes["demux"].attempt == 2
        assert state.nodes["demux"].error == "stage demux gave no result within 1800 s (attempt 1)"
        assert state.nodes["demux"].outputs["audio"] == artifact("job6.demux.2.audio")

    on_bus(nats_server, scenario)
