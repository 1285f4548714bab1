"""The coordinator against a real nats-server -js: fake stage workers answer its requests."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from structlog.testing import capture_logs

from captionbus.client import whole_record
from captionbus.contracts import (
    ArtifactRef,
    JobCancelRequested,
    JobCompleted,
    JobSpec,
    JobState,
    JobStatus,
    JobSubmitted,
    StageCompleted,
    StageRequest,
    parse_event,
    subjects,
)
from captionbus.coordinator.decide import NODE_RETRY, Policy, decide
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import (
    EVENT_RETRY,
    OUTBOX_GRACE_S,
    PUBLISH_TIMEOUT_S,
    REQUEST_RESEND_LIMIT_S,
    Coordinator,
    request_entry,
)
from captionbus.core.bus import StagePolicy, ensure_stage_consumer, provision

# The bus adapter is tested on a linear graph (demux -> asr -> subtitle_gen -> mux) under the name
# jobs default to; the real transcribe graph (with vad) is tested in tests/unit/coordinator.
LINEAR_PATH = Path(__file__).parents[1] / "unit" / "coordinator" / "linear.yaml"
GRAPHS = {"transcribe": Workflow.from_dict({**yaml.safe_load(LINEAR_PATH.read_text()), "name": "transcribe"},
                                           str(LINEAR_PATH))}
FANOUT = Workflow.from_dict(yaml.safe_load((LINEAR_PATH.parent / "fanout.yaml").read_text()),
                            str(LINEAR_PATH.parent / "fanout.yaml"))
# The fake workers produce exactly what the graph declares.
STAGE_OUTPUTS = {node.stage_name(name): node.outputs for name, node in GRAPHS["transcribe"].nodes.items()}
INPUT = ArtifactRef(key="0" * 64, name="film.mp4", size=10)
POLICY = Policy(retry=replace(NODE_RETRY, max_attempts=2, initial_s=0.2))


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
    """Answers one stage's requests with a StageCompleted, like captionbus/services/runtime would."""

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
        return Coordinator(nc or self.nc, graphs=GRAPHS, policy=POLICY, tick_interval_s=0.2)

    async def state_when(self, job_id: str, predicate, timeout: float = 15.0) -> JobState:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                state = await whole_record(self.js, JobState.model_validate_json((await self.kv.get(job_id)).value))
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


def test_a_job_of_publishers_before_job_ownership_completes_through_their_consumer(nats_server, monkeypatch):
    """A bus being upgraded (deploy/README.md, *Job ownership among coordinators*): workers and
    clients not yet upgraded publish events without the partition token, which no partition's
    consumer matches; while the consumer `coordinator` the older coordinators shared exists, a
    new coordinator consumes it too, and such a job completes."""
    from nats.js.api import ConsumerConfig

    async def scenario(bus: Bus):
        await bus.js.add_consumer(subjects.EVENTS_STREAM, ConsumerConfig(
            durable_name=subjects.COORDINATOR_CONSUMER, filter_subjects=subjects.legacy_coordinator_filters(),
            ack_policy="explicit", deliver_policy="new", ack_wait=30.0))
        monkeypatch.setattr(subjects, "job_event", subjects.legacy_job_event)  # every publisher here is old
        try:
            async with bus.coordinator():
                await submit(bus.js, "job-old")
                await bus.answer("demux", "asr", "subtitle_gen", "mux")
                state = await bus.finished("job-old")
            held = (await bus.js.stream_info(subjects.EVENTS_STREAM, subjects_filter="captionbus.job.job-old.*")).state
        finally:
            await bus.js.delete_consumer(subjects.EVENTS_STREAM, subjects.COORDINATOR_CONSUMER)
        assert state.status == JobStatus.completed
        assert held.messages >= 5  # its events, in the old layout

    on_bus(nats_server, scenario)


def test_a_coordinator_that_wrote_none_of_a_records_parts_reads_it_whole(nats_server):
    """The record is a head naming a part per completed node: a coordinator with none of them in
    memory (a new process taking a job over) reads them from the KV, and gets the state the one
    that wrote them held; a part the KV does not hold is an error that names it, not a state
    short of a node."""
    from captionbus.contracts.jobs import MissingParts

    async def scenario(bus: Bus):
        async with bus.coordinator() as first:
            await submit(bus.js, "job-p")
            await bus.answer("demux", "asr")
            await bus.state_when("job-p", lambda s: s.nodes["subtitle_gen"].status.value == "requested")
            held, _ = first._remembered("job-p") or await first.read_state("job-p")
        head = JobState.model_validate_json((await bus.kv.get("job-p")).value)
        assert head.parts == {"demux": held.nodes["demux"].part, "asr": held.nodes["asr"].part}
        fresh = bus.coordinator()
        fresh.kv = bus.kv
        read, _ = await fresh.read_state("job-p")
        assert read.model_dump_json() == held.model_dump_json() and read.nodes["asr"].worker == held.nodes["asr"].worker
        await bus.kv.purge(subjects.job_part_key("job-p", head.parts["asr"]))
        other = bus.coordinator()
        other.kv = bus.kv
        try:
            await other.read_state("job-p")
        except MissingParts as e:
            assert e.names == [subjects.job_part_key("job-p", head.parts["asr"])]
        else:
            raise AssertionError("a record whose part is gone read as a state")

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


def test_deliveries_exhausted_while_no_coordinator_runs_still_fail_the_job(nats_server):
    async def scenario(bus: Bus):
        async with bus.coordinator():
            await submit(bus.js, "job4b")
            await bus.state_when("job4b", lambda s: s.nodes["demux"].status.value == "requested")
        # The coordinator is down while every delivery of the request crashes.
        crashing = FakeWorker(bus.js, "demux", StagePolicy(ack_wait=0.5, max_deliver=2))
        await crashing.answer(count=2, ack=False, linger_s=2.0)
        stored = await bus.js.stream_info(subjects.ADVISORIES_STREAM)
        assert stored.state.messages >= 1  # the advisory was kept for whoever comes next
        async with bus.coordinator():
            state = await bus.finished("job4b")
        assert state.status == JobStatus.failed
        assert "crashed or timed out on every one of 2 deliveries" in state.error
        assert (await bus.js.stream_info(subjects.REQUESTS_STREAM)).state.messages == 0

    on_bus(nats_server, scenario)


def test_a_stage_result_that_overtakes_its_trigger_is_applied_later(nats_server, monkeypatch):
    monkeypatch.setattr("captionbus.coordinator.service.EARLY_RESULT_RETRY_S", 0.3)

    async def scenario(bus: Bus):
        async with bus.coordinator():
            await submit(bus.js, "job4c")
            await bus.state_when("job4c", lambda s: s.nodes["demux"].status.value == "requested")
            # asr's result arrives while this state has not requested asr yet (its request went
            # out from a coordinator that died before writing; the demux completion is late).
            outputs = {o: artifact(f"job4c.asr.1.{o}") for o in STAGE_OUTPUTS["asr"]}
            await publish_event(bus.js, StageCompleted(job_id="job4c", stage="asr", node="asr", attempt=1,
                                                      outputs=outputs))
            await asyncio.sleep(1.0)
            await bus.answer("demux")
            state = await bus.state_when("job4c", lambda s: s.nodes["asr"].status.value == "completed")
        assert state.nodes["asr"].attempt == 1 and state.nodes["asr"].outputs == outputs

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
        async with Coordinator(bus.nc, graphs=GRAPHS, policy=POLICY, tick_interval_s=0.1, clock=lambda: clock[0]):
            await submit(bus.js, "job6")
            [silent] = await FakeWorker(bus.js, "demux").answer(ack=False)  # takes it, never answers
            clock[0] += timedelta(seconds=1800)  # linear.yaml: demux deadline_s 1800
            await bus.state_when("job6", lambda s: s.nodes["demux"].status.value == "retry_wait")
            clock[0] += timedelta(seconds=POLICY.retry.initial_s)
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


async def event_when(js, job_id: str, kind: str, timeout: float = 15.0):
    """The first event of `kind` in the job's history, waiting for it to be published."""
    sub = await js.subscribe(subjects.job_events(job_id), ordered_consumer=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                event = parse_event((await sub.next_msg(timeout=0.2)).data)
                if event.kind == kind:
                    return event
    finally:
        await sub.unsubscribe()
    raise AssertionError(f"no {kind} event for job {job_id}")


def test_a_failed_ack_does_not_stop_the_event_loop(nats_server, monkeypatch):
    from nats.aio.msg import Msg

    real_ack = Msg.ack
    failed_acks: list[str] = []

    async def ack(msg):
        if subjects.event_partition(msg.subject) is not None and not failed_acks:
            # the coordinator's first ack of an event is lost in a reconnect
            failed_acks.append(msg.subject)
            raise nats.errors.ConnectionReconnectingError()
        return await real_ack(msg)

    monkeypatch.setattr(Msg, "ack", ack)

    async def scenario(bus: Bus):
        coordinator = bus.coordinator()
        async with coordinator:
            await submit(bus.js, "job7")
            await bus.answer("demux", "asr", "subtitle_gen", "mux")
            state = await bus.finished("job7")
            assert not coordinator.failed.done()
        assert failed_acks == [subjects.job_event("job7", "submitted")]
        assert state.status == JobStatus.completed

    on_bus(nats_server, scenario)


def test_a_dead_task_is_reported_and_run_coordinator_raises(nats_server, monkeypatch):
    from captionbus.coordinator.service import CoordinatorTaskDied, run_coordinator

    async def broken_event_loop(self):
        raise RuntimeError("bug in the event loop")

    monkeypatch.setattr(Coordinator, "_event_loop", broken_event_loop)

    async def scenario(bus: Bus):
        coordinator = bus.coordinator()
        async with coordinator:
            try:
                await asyncio.wait_for(coordinator.wait_failed(), 5)
            except CoordinatorTaskDied as e:
                assert "coordinator-events died: RuntimeError('bug in the event loop')" in str(e)
            else:
                raise AssertionError("wait_failed returned while the coordinator ran")
            assert coordinator.failed.done()

        # The runner awaits run_coordinator: it must end, not hang with nothing advancing.
        stop = asyncio.Event()
        task = asyncio.create_task(run_coordinator(bus.nc, stop_event=stop, policy=POLICY))
        done, _ = await asyncio.wait({task}, timeout=5)
        stop.set()
        assert done, "run_coordinator kept running after its event loop died"
        assert isinstance(task.exception(), CoordinatorTaskDied)

    on_bus(nats_server, scenario)


def test_a_clean_stop_resolves_failed_with_none(nats_server):
    async def scenario(bus: Bus):
        coordinator = bus.coordinator()
        async with coordinator:
            waiting = asyncio.create_task(coordinator.wait_failed())
            await asyncio.sleep(0.3)
            assert not waiting.done()
        assert await asyncio.wait_for(waiting, 5) is None

    on_bus(nats_server, scenario)


def test_a_deadline_failure_that_loses_the_write_is_never_announced(nats_server):
    """A tick decides `failed` (deadline, no attempts left) while the completion lands first,
    applied by a second coordinator on the same bus (one coordinator handles one job's events and
    ticks one at a time): the tick's write loses the race, so its `failed` must not reach the
    events stream."""
    clock = [datetime.now(timezone.utc)]
    policy = Policy(retry=replace(NODE_RETRY, max_attempts=1, initial_s=0.2))

    async def scenario(bus: Bus):
        coordinator = Coordinator(bus.nc, graphs=GRAPHS, policy=policy, tick_interval_s=3600, clock=lambda: clock[0])
        async with coordinator:
            await submit(bus.js, "job8")
            [late] = await FakeWorker(bus.js, "demux").answer(ack=False)
            await bus.state_when("job8", lambda s: s.nodes["demux"].status.value == "requested")
            real_update = coordinator.kv.update
            raced: list[str] = []

            async def update(key, value, last=None, **kw):
                if JobState.model_validate_json(value).status == JobStatus.failed and not raced:
                    raced.append(key)  # the completion gets in between the tick's read and write
                    other = Coordinator(bus.nc, graphs=GRAPHS, policy=policy, clock=lambda: clock[0])
                    other.kv = await bus.js.key_value(subjects.JOBS_BUCKET)
                    await other.apply(completion_for(late))
                    await bus.state_when("job8", lambda s: s.nodes["demux"].status.value == "completed")
                return await real_update(key, value, last=last, **kw)

            coordinator.kv.update = update
            clock[0] += timedelta(seconds=1800)  # demux's deadline
            await coordinator.tick_once()
            assert raced == ["job8"]
            await bus.answer("asr", "subtitle_gen", "mux")
            state = await bus.finished("job8")
        assert state.status == JobStatus.completed
        kinds = [e.kind for e in await bus.events("job8")]
        assert "failed" not in kinds and kinds[-1] == "completed"

    on_bus(nats_server, scenario)


def test_a_submission_is_created_unread_and_its_requests_go_out_after_the_create(nats_server):
    """A coordinator handed a job's submission creates the job's state without reading it first
    (one round trip less per job, benchmarks/fleet_sim.py --hops): the create is the check. Its
    requests go out only once the create has landed, so a submission of a job that exists (its
    event handed again to a coordinator that does not remember the job) fails the create, is
    decided on the stored state (already submitted: ignored) and publishes nothing."""
    spec = JobSpec(job_id="jobsub", input=INPUT, source_language="en")

    async def traced(bus: Bus, calls: list[str]) -> Coordinator:
        coordinator = Coordinator(bus.nc, graphs=GRAPHS, policy=POLICY)
        kv = coordinator.kv = await bus.js.key_value(subjects.JOBS_BUCKET)  # one of its own to trace
        def traced_call(name: str):
            real = getattr(kv, name)

            async def call(*args, **kw):
                try:
                    return await real(*args, **kw)
                finally:
                    calls.append(name)
            return call

        for name in ("get", "create", "update"):
            setattr(kv, name, traced_call(name))
        publish = coordinator._publish_request

        async def publish_request(request):
            calls.append(f"publish {request.node}")
            await publish(request)

        coordinator._publish_request = publish_request
        return coordinator

    async def scenario(bus: Bus):
        first_calls: list[str] = []
        first = await traced(bus, first_calls)
        decision = await first.apply(JobSubmitted(job_id="jobsub", spec=spec))
        assert decision.changed and [r.node for r in decision.requests] == ["demux"]
        assert first_calls == ["create", "publish demux"]  # no read; the request after the create

        again_calls: list[str] = []
        again = await traced(bus, again_calls)
        decision = await again.apply(JobSubmitted(job_id="jobsub", spec=spec))
        assert not decision.changed and decision.note == "job already submitted"
        assert again_calls[:2] == ["create", "get"] and not any(c.startswith("publish") for c in again_calls)
        state = JobState.model_validate_json((await bus.kv.get("jobsub")).value)
        assert (state.nodes["demux"].status.value, state.nodes["demux"].attempt) == ("requested", 1)
        [taken] = await bus.answer("demux")  # the one request, from the first coordinator
        assert (taken.node, taken.attempt) == ("demux", 1)

    on_bus(nats_server, scenario)


def test_events_left_in_the_outbox_are_published_by_the_next_coordinator(nats_server):
    async def scenario(bus: Bus):
        # A coordinator wrote the completed state and died before publishing `completed`.
        spec = JobSpec(job_id="job9", input=INPUT, source_language="en")
        done = JobCompleted(event_id="job9.completed", job_id="job9", outputs={"srt": artifact("srt")})
        state = JobState(spec=spec, status=JobStatus.completed, outputs=done.outputs,
                         outbox=[done.model_dump(mode="json")])
        await bus.kv.create("job9", state.model_dump_json().encode())
        async with bus.coordinator():
            published = await event_when(bus.js, "job9", "completed")
            cleared = await bus.state_when("job9", lambda s: not getattr(s, "outbox", ["?"]))
        assert published.event_id == "job9.completed" and published.outputs == done.outputs
        assert cleared.status == JobStatus.completed

    on_bus(nats_server, scenario)


def test_a_request_left_in_the_outbox_is_published_by_the_next_coordinator(nats_server):
    async def scenario(bus: Bus):
        # A coordinator wrote the state that requests demux (the request in its outbox, sent at
        # the same time as the write) and died before the request was stored, OUTBOX_GRACE_S ago
        # (a younger one is left to its writer, which takes it out of the outbox at its next tick).
        spec = JobSpec(job_id="job9r", input=INPUT, source_language="en")
        decision = decide(None, JobSubmitted(job_id="job9r", spec=spec), GRAPHS["transcribe"],
                          datetime.now(timezone.utc) - timedelta(seconds=OUTBOX_GRACE_S), POLICY)
        [request] = decision.requests
        state = decision.state.model_copy(update={"outbox": [request_entry(request)]})
        await bus.kv.create("job9r", state.model_dump_json().encode())
        async with bus.coordinator():
            [taken] = await bus.answer("demux")
            await bus.answer("asr", "subtitle_gen", "mux")
            done = await bus.finished("job9r")
        assert (taken.node, taken.attempt) == ("demux", 1)  # the written attempt, not a retry
        assert done.status == JobStatus.completed and done.nodes["demux"].attempt == 1

    on_bus(nats_server, scenario)


def test_a_request_whose_publish_failed_after_its_write_goes_out_from_the_outbox(nats_server):
    """The write landed, so the decision is done: it is logged, its event acked (one failure
    of the event would give the job up here: max_attempts=1), and the request goes out again
    from the outbox under the same id, without waiting for a tick (30 s here)."""
    async def scenario(bus: Bus):
        coordinator = Coordinator(bus.nc, graphs=GRAPHS, policy=POLICY, tick_interval_s=30,
                                  event_retry=replace(EVENT_RETRY, initial_s=0.05, max_attempts=1))
        publish = coordinator._publish_request
        lost: list[str] = []

        async def lose_the_first(request: StageRequest) -> None:
            if not lost:  # the write lands, the request's ack is lost (a blip, a dying connection)
                lost.append(request.key)
                raise nats.errors.TimeoutError
            await publish(request)

        coordinator._publish_request = lose_the_first
        with capture_logs() as logs:
            async with coordinator:
                await submit(bus.js, "job9p")
                [taken] = await bus.answer("demux")
                await bus.answer("asr", "subtitle_gen", "mux")
                done = await bus.finished("job9p")
        assert lost == ["job9p.demux.1"] and (taken.node, taken.attempt) == ("demux", 1)
        assert done.status == JobStatus.completed and done.nodes["demux"].attempt == 1
        said = [(line["event"], line.get("node")) for line in logs if line.get("job_id") == "job9p"]
        assert ("stage requested", "demux") in said  # the decision is logged like any other
        assert ("stage request not sent; it goes out again from the job's outbox", "demux") in said
        assert ("stage request sent again from the outbox", "demux") in said
        assert not any("fail" in event or "redelivered" in event for event, _ in said), said

    on_bus(nats_server, scenario)


def test_a_job_event_whose_ack_failed_off_the_jobs_lock_is_sent_again(nats_server):
    async def scenario(bus: Bus):
        coordinator = bus.coordinator()
        publish = coordinator.js.publish  # the coordinator's job events go through js.publish
        lost: list[str] = []

        async def lose_the_first_requested(subject: str, payload: bytes = b"", **kw):
            if subject.endswith(".stage_requested") and not lost:  # never sent; its ack fails
                lost.append(subject)
                raise nats.errors.TimeoutError()
            return await publish(subject, payload, **kw)

        coordinator.js.publish = lose_the_first_requested
        async with coordinator:
            await submit(bus.js, "job9e")
            await bus.answer("demux", "asr", "subtitle_gen", "mux")
            await event_when(bus.js, "job9e", "completed")
            done = await bus.state_when("job9e", lambda s: s.status.finished and not s.outbox)
        requested = [e.node for e in await bus.events("job9e") if e.kind == "stage_requested"]
        assert lost == [subjects.job_event("job9e", "stage_requested")]
        assert sorted(requested) == sorted(["demux", "asr", "subtitle_gen", "mux"])  # each once, none lost
        assert done.status == JobStatus.completed

    on_bus(nats_server, scenario)


def test_a_submitted_event_that_never_applies_fails_the_job(nats_server):
    async def scenario(bus: Bus):
        coordinator = Coordinator(bus.nc, graphs=GRAPHS, policy=POLICY, tick_interval_s=0.2,
                                  event_retry=replace(EVENT_RETRY, initial_s=0.05, max_attempts=3))

        async def broken_apply(event):
            raise RuntimeError("state store broken")

        coordinator.apply = broken_apply
        async with coordinator:
            await submit(bus.js, "job10")
            failed = await event_when(bus.js, "job10", "failed")
        assert failed.event_id.startswith("job10.failed.internal.")
        assert failed.reason.startswith("coordinator error: could not apply the submitted event ")
        assert "after 3 tries (RuntimeError: state store broken)" in failed.reason
        assert failed.reason.endswith("see the coordinator log, fix the cause, then submit the job again")

    on_bus(nats_server, scenario)


def test_a_completion_that_never_applies_fails_the_job_and_its_state(nats_server):
    async def scenario(bus: Bus):
        coordinator = Coordinator(bus.nc, graphs=GRAPHS, policy=POLICY, tick_interval_s=0.2,
                                  event_retry=replace(EVENT_RETRY, initial_s=0.05, max_attempts=2))
        apply = coordinator.apply

        async def apply_but_completions(event):
            if event.kind == "stage_completed":
                raise ValueError("cannot apply this completion")
            return await apply(event)

        coordinator.apply = apply_but_completions
        async with coordinator:
            await submit(bus.js, "job11")
            await bus.answer("demux")
            failed = await event_when(bus.js, "job11", "failed")
            state = await bus.finished("job11")
        assert state.status == JobStatus.failed and state.error == failed.reason
        assert state.nodes["demux"].status.value == "cancelled"  # `captionbus retry` reruns it
        assert failed.reason.endswith("fix the cause, then `captionbus retry job11`")

    on_bus(nats_server, scenario)


def test_a_stage_no_worker_serves_fails_its_node_with_the_reason(nats_server):
    """No demux worker at all ($SRV PING unanswered) for unserved_s: the job ends, saying so.
    A registered worker (a $SRV service named for the stage) keeps the node waiting."""
    import nats.micro

    async def scenario(bus: Bus):
        async with Coordinator(bus.nc, policy=POLICY, tick_interval_s=0.2, unserved_s=1.0):
            service = await nats.micro.add_service(bus.nc, name=subjects.micro_service_name("demux"),
                                                   version="0.0.0")
            await submit(bus.js, "job-served")
            await bus.state_when("job-served", lambda s: s.nodes["demux"].status.value == "requested")
            await asyncio.sleep(2.0)  # twice unserved_s, with a "worker" registered: still waiting
            state = await bus.state_when("job-served", lambda s: True)
            assert state.status == JobStatus.running
            await service.stop()
            started = time.monotonic()
            state = await bus.finished("job-served")
            assert time.monotonic() - started < 10
        assert state.status == JobStatus.failed
        assert "no worker serves demux: none has answered for" in state.error
        assert "captionbus serve demux" in state.error and "CAPTIONBUS_UNSERVED_TIMEOUT" in state.error
        assert state.nodes["demux"].failure_class == "unserved"

    on_bus(nats_server, scenario)


def test_the_coordinator_counts_live_workers_of_windowed_stages_by_srv_stats(nats_server):
    """The window of a film's chunks follows the asr replicas answering $SRV STATS (real
    nats.micro services, as captionbus/services/runtime registers them); one whose setup failed takes no
    work and is not counted; a stopped one stays counted through the one ask it misses (a slow
    answer is not a worker gone: core.discovery.Census) and leaves the count at the second."""
    import nats.micro

    from captionbus.coordinator.graph import DEFAULT_WORKFLOWS_DIR, load_workflow

    async def scenario(bus: Bus):
        graphs = {**GRAPHS, "chunked": load_workflow(DEFAULT_WORKFLOWS_DIR / "chunked.yaml")}
        name = subjects.micro_service_name("asr")
        services = [await nats.micro.add_service(bus.nc, name=name, version="1.0.0", metadata=meta)
                    for meta in ({"stage": "asr"}, {"stage": "asr"}, {"stage": "asr", "setup_error": "no model"})]
        # Today's runtime says a failed setup in its STATS data (captionbus/services/runtime/state.py).
        failed = await nats.micro.add_service(bus.nc, name=name, version="1.0.0", metadata={"stage": "asr"},
                                              stats_handler=lambda _e: {"state": "setup_failed"})
        await failed.add_endpoint(name="info", subject="test.asr.info", handler=lambda _r: None)
        services.append(failed)
        # No counts of its own meanwhile (workers_interval_s): the test's counts are the asks.
        async with Coordinator(bus.nc, graphs=graphs, policy=POLICY, workers_interval_s=600,
                               workers_wait_s=0.5) as coordinator:
            assert coordinator._windowed_stages() == ["asr"]
            assert coordinator._workers == {"asr": 2}  # counted before the first job
            await services[0].stop()
            assert await coordinator.count_workers() == {"asr": 2}  # one missed ask
            assert await coordinator.count_workers() == {"asr": 1}
        for service in services[1:]:
            await service.stop()
        async with Coordinator(bus.nc, graphs=GRAPHS, policy=POLICY) as plain:
            assert plain._windowed_stages() == [] and plain._workers == {}  # nothing to size: no pings

    on_bus(nats_server, scenario)


def test_the_coordinator_counts_a_workers_slots(nats_server):
    """One asr process with two decoders sharing its model (`run --replicas 2` on a CPU host)
    says slots 2 in its $SRV metadata (WorkerInfo.slots) and counts as two workers, so a film
    still gets two chunks at once; a worker without the field (an older one) counts one, and a
    claim beyond MAX_WORKER_SLOTS or unreadable is held to it / to one."""
    import nats.micro

    from captionbus.coordinator.graph import DEFAULT_WORKFLOWS_DIR, load_workflow
    from captionbus.core.discovery import MAX_WORKER_SLOTS

    async def scenario(bus: Bus):
        graphs = {**GRAPHS, "chunked": load_workflow(DEFAULT_WORKFLOWS_DIR / "chunked.yaml")}
        name = subjects.micro_service_name("asr")
        services = [await nats.micro.add_service(bus.nc, name=name, version="1.0.0", metadata=meta)
                    for meta in ({"stage": "asr", "slots": "2"}, {"stage": "asr"})]
        async with Coordinator(bus.nc, graphs=graphs, policy=POLICY) as coordinator:
            assert await coordinator.count_workers() == {"asr": 3}  # a loaded machine answers late
            services.append(await nats.micro.add_service(bus.nc, name=name, version="1.0.0",
                                                         metadata={"stage": "asr", "slots": "100000"}))
            services.append(await nats.micro.add_service(bus.nc, name=name, version="1.0.0",
                                                         metadata={"stage": "asr", "slots": "two"}))
            assert await coordinator.count_workers() == {"asr": 3 + MAX_WORKER_SLOTS + 1}
        for service in services:
            await service.stop()

    on_bus(nats_server, scenario)


def test_a_worker_slow_to_answer_srv_stats_is_counted_and_nothing_answering_is_quick(nats_server):
    """A live asr replica whose $SRV STATS answer takes 0.6 s (its event loop starved, as under
    load average 20-30; here its stats handler blocks its own loop in its own thread) is counted
    by the coordinator's first count and by the next ones, beside a replica that answers at
    once: with a fixed 0.25 s wait it was counted as 0, and a film's chunk window shrank to 1;
    with a count that ended 0.25 s after the known workers had answered, a slow one never
    counted yet was left out beside a quick one every time. The CLI's and the dashboard's reader
    (client.workers, the same core.discovery) lists both. Once they stop, nothing subscribes to
    the stage's subject, the server says so, and the count is 0 at once."""
    import threading

    import nats.micro

    from captionbus.client import workers
    from captionbus.coordinator.graph import DEFAULT_WORKFLOWS_DIR, load_workflow

    slow_s = 0.6
    stop = threading.Event()

    def worker(answer_s: float, registered: threading.Event) -> None:
        async def main() -> None:
            nc = await nats.connect(nats_server)
            service = await nats.micro.add_service(
                nc, name=subjects.micro_service_name("asr"), version="1.0.0", metadata={"stage": "asr"},
                stats_handler=lambda _endpoint: time.sleep(answer_s) or {"state": "idle"})
            await service.add_endpoint(name="work", subject=f"test.asr.w{int(answer_s * 10)}", handler=lambda _r: None)
            registered.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await service.stop()
            await nc.close()
        asyncio.run(main())

    async def scenario(bus: Bus):
        graphs = {**GRAPHS, "chunked": load_workflow(DEFAULT_WORKFLOWS_DIR / "chunked.yaml")}
        threads = []
        for answer_s in (0.0, slow_s):
            registered = threading.Event()
            threads.append(threading.Thread(target=worker, args=(answer_s, registered), daemon=True))
            threads[-1].start()
            assert await asyncio.to_thread(registered.wait, 10)
        try:
            async with Coordinator(bus.nc, graphs=graphs, policy=POLICY, workers_interval_s=600) as coordinator:
                assert coordinator._workers == {"asr": 2}  # the first count, before any job
                for _ in range(2):
                    started = time.monotonic()
                    assert await coordinator.count_workers() == {"asr": 2}
                    waited = time.monotonic() - started
                    print(f"a count of two replicas, one answering in {slow_s} s, took {waited:.2f} s")
                    assert waited >= slow_s
                assert [w["metadata"]["stage"] for w in await workers(bus.nc, stage="asr")] == ["asr", "asr"]
                stop.set()
                for thread in threads:
                    await asyncio.to_thread(thread.join, 10)
                started = time.monotonic()
                assert await coordinator.count_workers() == {"asr": 0}
                assert await workers(bus.nc, stage="asr") == []
                waited = time.monotonic() - started
                print(f"a count and a listing with nothing answering took {waited:.3f} s")
                assert waited < 1.0  # not the 2 s a count waits for a known worker
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)

    on_bus(nats_server, scenario)


def test_job_events_stay_in_order_when_one_fails_to_publish(nats_server):
    """Review of issue 22: a running job's events are confirmed off the job's lock; when one's
    publish failed (here: never sent, its ack times out after a second), the events of the job's
    next decisions went out meanwhile, and the failed one was stored after them. Watchers and
    webhooks read the events stream in order: it must be the order the events were decided in."""
    async def scenario(bus: Bus):
        coordinator = bus.coordinator()
        publish = coordinator.js.publish  # the coordinator's job events go through js.publish
        lost: list[str] = []

        async def lose_the_first_requested(subject: str, payload: bytes = b"", **kw):
            if subject.endswith(".stage_requested") and not lost:  # never sent; no ack for a second
                lost.append(parse_event(payload).node)
                await asyncio.sleep(1.0)
                raise nats.errors.TimeoutError()
            return await publish(subject, payload, **kw)

        coordinator.js.publish = lose_the_first_requested
        async with coordinator:
            await submit(bus.js, "job9o")
            [demux] = await bus.answer("demux")  # answered while demux's `stage_requested` is lost
            await bus.state_when("job9o", lambda s: s.nodes["asr"].status.value == "requested")
            await bus.answer("asr", "subtitle_gen", "mux")
            await event_when(bus.js, "job9o", "completed")
            await bus.state_when("job9o", lambda s: s.status.finished and not s.outbox)
        events = await bus.events("job9o")
        assert lost == ["demux"] and demux.attempt == 1
        announced = [e.kind if e.kind != "stage_requested" else e.node for e in events
                     if e.kind in ("started", "stage_requested", "completed")]
        assert announced == ["started", "demux", "asr", "subtitle_gen", "mux", "completed"]

    on_bus(nats_server, scenario)


def fanout_job(job_id: str, now: datetime) -> tuple[JobState, list[StageRequest]]:
    """A `fanout` job (tests/unit/coordinator/fanout.yaml) whose two translations another
    coordinator requested at `now`: the state it wrote, their requests in its outbox."""
    d = decide(None, JobSubmitted(job_id=job_id, spec=JobSpec(job_id=job_id, input=INPUT, workflow="fanout",
                                                             target_languages=["ta", "hi"])), FANOUT, now, POLICY)
    for node, outputs in (("demux", ["audio"]), ("asr", ["transcript"])):
        d = decide(d.state, StageCompleted(job_id=job_id, stage=node, node=node, attempt=1,
                                           outputs={o: artifact(f"{node}.{o}") for o in outputs}), FANOUT, now, POLICY)
    assert sorted(r.node for r in d.requests) == ["translation-hi", "translation-ta"]
    return d.state.model_copy(update={"outbox": [request_entry(r) for r in d.requests]}), d.requests


def test_another_coordinators_request_is_sent_again_only_once_its_writer_had_time(nats_server):
    """Review of issue 22: on each write of a job a coordinator sent again every request of the
    outbox it had not published itself, under the job's lock: with several coordinators each hop
    paid for a repeat of the other's request. Here another coordinator wrote the two
    translations' requests a second ago; translation-ta's result makes this one write the job
    (it requests subtitle_gen-ta) without sending translation-hi's again, and its tick leaves
    that request in the outbox. Once it is OUTBOX_GRACE_S old (its writer would have taken it
    out by then: it died), the tick loop sends it and takes it out of the outbox."""
    async def scenario(bus: Bus):
        wrote = datetime.now(timezone.utc)
        clock = [wrote + timedelta(seconds=1)]  # stands still: a slow machine does not age the request
        state, requests = fanout_job("job12", wrote)
        await bus.kv.create("job12", state.model_dump_json().encode())
        coordinator = Coordinator(bus.nc, graphs={"fanout": FANOUT}, policy=POLICY, tick_interval_s=0.2,
                                  clock=lambda: clock[0])
        published: list[str] = []
        publish = coordinator._publish_request

        async def spy(request: StageRequest) -> None:
            published.append(request.node)
            await publish(request)

        coordinator._publish_request = spy
        async with coordinator:
            [ta] = [r for r in requests if r.node == "translation-ta"]
            await publish_event(bus.js, StageCompleted(job_id="job12", stage=ta.stage, node=ta.node, attempt=1,
                                                      outputs={"transcript": artifact("ta")}))
            await bus.state_when("job12", lambda s: s.nodes["subtitle_gen-ta"].status.value == "requested")
            # the tick takes ours out of the outbox and keeps the other coordinator's
            await bus.state_when("job12", lambda s: [entry.get("stage_request", {}).get("node")
                                                     for entry in s.outbox] == ["translation-hi"])
            await asyncio.sleep(1.0)  # five more ticks, inside the grace
            assert published == ["subtitle_gen-ta"]
            clock[0] = wrote + timedelta(seconds=OUTBOX_GRACE_S)
            cleared = await bus.state_when("job12", lambda s: not s.outbox)
        assert published == ["subtitle_gen-ta", "translation-hi"]
        assert cleared.nodes["translation-hi"].status.value == "requested"
        taken = await FakeWorker(bus.js, "translation_nllb").answer(ack=False, timeout=5)
        assert [(r.node, r.attempt) for r in taken] == [("translation-hi", 1)]

    on_bus(nats_server, scenario)


def test_a_request_older_than_the_duplicate_window_allows_is_left_to_its_deadline(nats_server):
    """Review of issue 22: a request found unsent in the outbox after an outage longer than the
    requests stream's duplicate window would be stored as a new message, and run twice if the
    first had been stored after all. Past REQUEST_RESEND_LIMIT_S it is not sent again and
    leaves the outbox; the node's deadline fails the attempt and its retry is attempt 2."""
    offset = [timedelta(seconds=REQUEST_RESEND_LIMIT_S + 1)]

    async def scenario(bus: Bus):
        wrote = datetime.now(timezone.utc)
        window = (await bus.js.stream_info(subjects.REQUESTS_STREAM)).config.duplicate_window
        assert window >= REQUEST_RESEND_LIMIT_S + 20
        spec = JobSpec(job_id="job13", input=INPUT, source_language="en")
        decision = decide(None, JobSubmitted(job_id="job13", spec=spec), GRAPHS["transcribe"], wrote, POLICY)
        [request] = decision.requests
        state = decision.state.model_copy(update={"outbox": [request_entry(request)]})
        await bus.kv.create("job13", state.model_dump_json().encode())
        coordinator = Coordinator(bus.nc, graphs=GRAPHS, policy=POLICY, tick_interval_s=0.2,
                                  clock=lambda: datetime.now(timezone.utc) + offset[0])
        published: list[tuple[str, int]] = []
        publish = coordinator._publish_request

        async def spy(request: StageRequest) -> None:
            published.append((request.node, request.attempt))
            await publish(request)

        coordinator._publish_request = spy
        async with coordinator:
            dropped = await bus.state_when("job13", lambda s: not s.outbox)
            assert dropped.nodes["demux"].status.value == "requested" and dropped.nodes["demux"].attempt == 1
            await asyncio.sleep(0.5)
            assert published == []  # not sent again
            offset[0] = dropped.nodes["demux"].deadline_at + timedelta(seconds=1) - datetime.now(timezone.utc)
            [retry] = await bus.answer("demux")
            await bus.answer("asr", "subtitle_gen", "mux")
            done = await bus.finished("job13")
        assert (retry.node, retry.attempt) == ("demux", 2) and published[0] == ("demux", 2)
        assert done.status == JobStatus.completed and done.nodes["demux"].attempt == 2

    on_bus(nats_server, scenario)


def coordinator_tasks(before: set[asyncio.Task]) -> list[str]:
    """The tasks running now that were not before (the test's own left out), by name."""
    return sorted(task.get_name() for task in asyncio.all_tasks() - before - {asyncio.current_task()}
                  if not task.done())


def test_a_stuck_job_event_publish_holds_up_neither_other_jobs_ticks_nor_stop(nats_server):
    """Review of issue 22: the tick loop waited, under each job's lock and one job after the
    other, for the job's sender to finish publishing its events, without a bound of its own; and
    stop() confirmed the senders for 5 s and left those still publishing running. Here every
    publish of job14a's events hangs (each is given up after PUBLISH_TIMEOUT_S): a tick must
    still reach job14b at once (it sends the request another coordinator left in its outbox), and
    stop() must return within its bounds with no task of the coordinator left."""
    async def scenario(bus: Bus):
        coordinator = Coordinator(bus.nc, graphs=GRAPHS, policy=POLICY, tick_interval_s=3600)
        publish = coordinator.js.publish
        hung: Counter = Counter()

        async def hang_job14a(subject: str, payload: bytes = b"", **kw):
            if subject.startswith(subjects.job_events("job14a")[:-1]):
                hung["publishes"] += 1
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    hung["cancelled"] += 1
                    raise
            return await publish(subject, payload, **kw)

        coordinator.js.publish = hang_job14a
        before = set(asyncio.all_tasks())
        await coordinator.start()
        await submit(bus.js, "job14a")
        await bus.state_when("job14a", lambda s: s.nodes["demux"].status.value == "requested")
        assert coordinator._sender_busy("job14a") and hung["publishes"] == 1
        # job14b: another coordinator wrote it with demux's request in the outbox and died
        spec = JobSpec(job_id="job14b", input=INPUT, source_language="en")
        decision = decide(None, JobSubmitted(job_id="job14b", spec=spec), GRAPHS["transcribe"],
                          datetime.now(timezone.utc) - timedelta(seconds=OUTBOX_GRACE_S), POLICY)
        [request] = decision.requests
        await bus.kv.create("job14b", decision.state.model_copy(update={"outbox": [request_entry(request)]})
                            .model_dump_json().encode())
        started = time.monotonic()
        await asyncio.wait_for(coordinator.tick_once(), 2.0)  # job14a first (sorted), then job14b
        ticked_s = time.monotonic() - started
        assert coordinator._sender_busy("job14a")  # still publishing: the tick did not wait for it
        # job14b's request is out; job14a's second decision: its sender waits for the first, then hangs too
        taken = await FakeWorker(bus.js, "demux").answer(count=2, timeout=5)
        assert sorted(r.job_id for r in taken) == ["job14a", "job14b"]
        await bus.state_when("job14a", lambda s: s.nodes["asr"].status.value == "requested")
        started = time.monotonic()
        await coordinator.stop()
        stopped_s = time.monotonic() - started
        assert coordinator_tasks(before) == []
        assert ticked_s < 2.0 and stopped_s < 1.0 + PUBLISH_TIMEOUT_S + 2.0, (ticked_s, stopped_s)
        assert hung["cancelled"] == hung["publishes"] == 2  # the first by its bound, the second by stop()

    on_bus(nats_server, scenario)


def test_a_cancelled_stop_raises_cancelled_error_and_leaves_no_task(nats_server):
    """stop() swallowed its own cancellation (contextlib.suppress(CancelledError) around its
    waits): a caller's timeout around it went unnoticed (the same pattern around the dashboard's
    stop hid tests/system/test_model.py's 751 s hang). A stop cancelled while it waits for the
    loops raises CancelledError, and cancels what it started on its way out."""
    async def scenario(bus: Bus):
        before = set(asyncio.all_tasks())
        coordinator = bus.coordinator()
        await coordinator.start()
        stopping = asyncio.create_task(coordinator.stop())
        await asyncio.sleep(0.1)  # the pull loops end within their 1 s fetch: stop waits for them
        assert not stopping.done()
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        await asyncio.sleep(0.1)
        assert coordinator_tasks(before) == []
        assert coordinator.failed.done() and coordinator.failed.result() is None

    on_bus(nats_server, scenario)


def test_the_events_ack_wait_is_the_coordinators_setting(nats_server, monkeypatch, tmp_path):
    """CAPTIONBUS_EVENT_ACK_WAIT (issue 20: tests wait for a killed coordinator's events; 30 s was
    hard-coded) is the ack wait of the events consumers (one per partition, set by the coordinator
    that takes the partition) and of the advisories consumer (set by each as it starts;
    JetStream updates a consumer's ack wait in place; coordinators of one bus share it)."""
    from captionbus.coordinator.service import run_coordinator

    monkeypatch.setenv("CAPTIONBUS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CAPTIONBUS_EVENT_ACK_WAIT", "3")

    async def scenario(bus: Bus):
        stop = asyncio.Event()
        running = asyncio.create_task(run_coordinator(bus.nc, stop_event=stop, graphs=GRAPHS, policy=POLICY))
        waits = {}
        for _ in range(100):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                waits = {name: (await bus.js.consumer_info(stream, name)).config.ack_wait for stream, name in (
                    (subjects.EVENTS_STREAM, subjects.partition_consumer(0)),
                    (subjects.EVENTS_STREAM, subjects.partition_consumer(subjects.PARTITIONS - 1)),
                    (subjects.ADVISORIES_STREAM, subjects.COORDINATOR_ADVISORY_CONSUMER))}
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(running, 10)
        assert waits == {subjects.partition_consumer(0): 3.0,
                         subjects.partition_consumer(subjects.PARTITIONS - 1): 3.0,
                         subjects.COORDINATOR_ADVISORY_CONSUMER: 3.0}
        async with Coordinator(bus.nc, graphs=GRAPHS, policy=POLICY, event_ack_wait_s=60.0):
            info = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.partition_consumer(5))
        assert info.config.ack_wait == 60.0

    on_bus(nats_server, scenario)
