"""The stage runtime against a real nats-server: ack / nak / term, heartbeats, max_deliver,
poison messages, cancel, $SRV info, graceful stop, and kill -9 of a service process."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from captionbus.contracts import JobCancelled, StageRequest, WorkerInfo, WorkerState, parse_event, subjects
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import BusError, StagePolicy, connect, provision, publish_event
from captionbus.core.settings import PROJECT_ROOT, Settings
from captionbus.services.noop.stage import STAGE as NOOP
from captionbus.services.runtime import StageDefinition
from captionbus.services.runtime.serve import info_subject, serve


def counting(definition: StageDefinition = NOOP, name: str = "probe") -> tuple[StageDefinition, list]:
    """`definition` renamed, recording (job_id, delivery) for every handler call."""
    calls: list[tuple[str, int]] = []
    lock = threading.Lock()

    def handle(request, ctx):
        with lock:
            calls.append((request.job_id, ctx.delivery))
        return definition.handle(request, ctx)

    return dataclasses.replace(definition, name=name, handle=handle), calls


class Bus:
    def __init__(self, url: str, home: Path):
        self.url = url
        self.settings = Settings(home=home, nats_url=None, artifacts_mode="local", host_id="testhost")
        self.events: list[Any] = []
        self._services: list[tuple[asyncio.Task, asyncio.Event]] = []

    async def __aenter__(self) -> "Bus":
        self.nc = await connect(self.url, "test")
        self.js = self.nc.jetstream()
        await provision(self.js)
        self.store = ArtifactStore(self.settings, self.js)
        self._events_sub = await self.js.subscribe(subjects.EVENTS_WILDCARD, ordered_consumer=True,
                                                   cb=self._on_event)
        return self

    async def __aexit__(self, *exc) -> None:
        for task, stop in self._services:
            stop.set()
        for task, _ in self._services:
            try:
                await asyncio.wait_for(task, 15)
            except Exception:
                task.cancel()
        await self.nc.close()

    async def _on_event(self, msg) -> None:
        self.events.append(parse_event(msg.data))

    async def start(self, definition: StageDefinition = NOOP, *, ack_wait: float = 2.0, max_deliver: int = 3,
                    **kwargs) -> tuple[asyncio.Task, asyncio.Event]:
        stop, ready = asyncio.Event(), asyncio.Event()
        kwargs.setdefault("retry_delay_s", 0.1)
        task = asyncio.create_task(serve(
            definition, self.settings, self.url, env_name="test", stop=stop, ready=ready,
            policy=StagePolicy(ack_wait=ack_wait, max_deliver=max_deliver), **kwargs,
        ))
        await asyncio.wait({task, asyncio.ensure_future(ready.wait())}, timeout=20,
                           return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what serve() raised
        assert ready.is_set(), "service did not become ready"
        self._services.append((task, stop))
        return task, stop

    async def request(self, job_id: str, stage: str = "noop", *, node: str | None = None, attempt: int = 1,
                      **fields) -> StageRequest:
        request = StageRequest(job_id=job_id, stage=stage, node=node or stage, attempt=attempt, **fields)
        await self.js.publish(subjects.stage_request(stage), request.model_dump_json().encode(),
                              headers={"Nats-Msg-Id": request.key})
        return request

    async def wait_for(self, kind: str, job_id: str | None = None, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.kind == kind and (job_id is None or event.job_id == job_id):
                    return event
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {kind} event for {job_id} in {timeout}s; saw {[e.kind for e in self.events]}")

    def of_kind(self, kind: str, job_id: str | None = None) -> list[Any]:
        return [e for e in self.events if e.kind == kind and (job_id is None or e.job_id == job_id)]

    async def pending_requests(self) -> int:
        return (await self.js.stream_info(subjects.REQUESTS_STREAM)).state.messages

    async def consumer(self, stage: str) -> Any:
        return await self.js.consumer_info(subjects.REQUESTS_STREAM, subjects.stage_consumer(stage))

    async def srv(self, verb: str, stage: str) -> dict:
        reply = await self.nc.request(f"$SRV.{verb}.{subjects.micro_service_name(stage)}", b"", timeout=2)
        return json.loads(reply.data)


def run(url: str, home: Path, body, timeout: float = 60):
    async def main():
        async with Bus(url, home) as bus:
            await asyncio.wait_for(body(bus), timeout)

    asyncio.run(main())


def test_success_publishes_completion_then_acks(nats_server, tmp_path):
    async def body(bus: Bus):
        await bus.start()
        request = await bus.request("job1", params={"sleep_s": 0.8, "warn": "took a shortcut"})
        done = await bus.wait_for("stage_completed", "job1")
        assert (done.stage, done.node, done.attempt) == ("noop", "noop", 1)
        assert {"worker_id", "env", "python", "host", "pid", "pkg.pydantic"} <= set(done.worker)
        # The event reaches the job's tenant whole (SSE, webhooks): no host path in it.
        assert "interpreter" not in done.worker and sys.executable not in done.model_dump_json()
        assert done.worker["env"] == "test" and done.metrics["delivery"] == 1.0
        out = await bus.store.get(done.outputs["out"])
        assert out.read_text() == f"{request.key}\n"
        progress = bus.of_kind("stage_progress", "job1")
        assert 1 <= len(progress) <= 6  # rate-limited: ~4/s over 0.8 s
        assert bus.of_kind("stage_warning", "job1")[0].message == "took a shortcut"
        await asyncio.sleep(0.2)
        assert await bus.pending_requests() == 0  # acked: the work-queue message is gone
        assert not list((bus.settings.work_dir).glob("job1/*"))  # work dir cleaned

    run(nats_server, tmp_path, body)


def test_inputs_are_fetched_and_passed_through(nats_server, tmp_path):
    async def body(bus: Bus):
        await bus.start()
        src = tmp_path / "speech.wav"
        src.write_bytes(b"RIFF" + bytes(1000))
        ref = await bus.store.put(src, name="speech.wav")
        await bus.request("job2", inputs={"audio": ref})
        done = await bus.wait_for("stage_completed", "job2")
        assert done.outputs["audio"].key == ref.key

    run(nats_server, tmp_path, body)


def test_bad_input_fails_once_and_is_terminated(nats_server, tmp_path):
    probe, calls = counting()

    async def body(bus: Bus):
        await bus.start(probe)
        await bus.request("job3", "probe", params={"fail": "bad_input"})
        failed = await bus.wait_for("stage_failed", "job3")
        assert failed.retryable is False and failed.error_type == "bad_input"
        assert failed.reason == "noop was asked to fail: bad input"
        await asyncio.sleep(2.5)  # longer than ack_wait: a redelivery would have happened
        assert calls == [("job3", 1)]
        assert await bus.pending_requests() == 0
        assert len(bus.of_kind("stage_failed", "job3")) == 1

    run(nats_server, tmp_path, body)


def test_params_outside_the_stage_model_are_bad_input_before_the_handler(nats_server, tmp_path):
    """The runtime validates request params against StageDefinition.params (a model in
    captionbus/contracts/declarations/<folder>.py): an unknown key or a wrong value fails the request once, with one
    line naming the stage's keys, and the handler never runs."""
    probe, calls = counting()

    async def body(bus: Bus):
        await bus.start(probe)
        await bus.request("job3a", "probe", params={"sleep_s": "banana"})
        await bus.request("job3b", "probe", params={"sleep": 1, "source_language": "en"})
        await bus.request("job3c", "probe", params={"sleep_s": 0.1, "source_language": "en", "cache": False})
        bad_value = await bus.wait_for("stage_failed", "job3a")
        unknown = await bus.wait_for("stage_failed", "job3b")
        await bus.wait_for("stage_completed", "job3c")  # the coordinator's params are the model's too
        for failed in (bad_value, unknown):
            assert failed.retryable is False and failed.error_type == "bad_input"
            assert "\n" not in failed.reason and "(probe params: sleep_s, fail, fail_times, warn, write_bytes, cache)" in failed.reason
        assert bad_value.reason.startswith("bad probe params: sleep_s='banana': Input should be a valid number")
        assert unknown.reason.startswith("bad probe params: unknown param 'sleep'")
        await asyncio.sleep(0.5)
        assert calls == [("job3c", 1)]
        assert await bus.pending_requests() == 0

    run(nats_server, tmp_path, body)


def test_an_output_the_stage_does_not_declare_fails_the_request(nats_server, tmp_path):
    """StageDefinition.outputs holds the handler to its declaration: returning another name is a
    stage bug, retried and then failed like any crash, never published as a completion."""
    def handle(request, ctx):
        out = ctx.work_dir / "x.txt"
        out.write_text("x")
        return {"surprise": out}

    declared = dataclasses.replace(NOOP, name="declared", handle=handle, outputs=("out",))

    async def body(bus: Bus):
        await bus.start(declared, max_deliver=2)
        await bus.request("job3d", "declared")
        failed = await bus.wait_for("stage_failed", "job3d")
        assert "returned output(s) surprise that stage declared does not declare (its outputs: out)" in failed.reason
        assert not bus.of_kind("stage_completed", "job3d")

    run(nats_server, tmp_path, body)


def test_retryable_error_is_redelivered_and_succeeds(nats_server, tmp_path):
    probe, calls = counting()

    async def body(bus: Bus):
        await bus.start(probe)
        await bus.request("job4", "probe", params={"fail": "retryable", "fail_times": 1})
        done = await bus.wait_for("stage_completed", "job4")
        assert done.metrics["delivery"] == 2.0
        assert calls == [("job4", 1), ("job4", 2)]
        assert not bus.of_kind("stage_failed", "job4")

    run(nats_server, tmp_path, body)


def test_always_failing_request_stops_after_max_deliver(nats_server, tmp_path):
    probe, calls = counting()

    async def body(bus: Bus):
        await bus.start(probe, max_deliver=3)
        await bus.request("job5", "probe", params={"fail": "crash"})
        failed = await bus.wait_for("stage_failed", "job5")
        assert failed.reason == "probe failed on all 3 attempts: RuntimeError: noop was asked to crash"
        assert "Traceback" not in failed.reason and failed.retryable is False
        await asyncio.sleep(2.5)
        assert calls == [("job5", 1), ("job5", 2), ("job5", 3)]
        assert len(bus.of_kind("stage_failed", "job5")) == 1
        assert await bus.pending_requests() == 0

    run(nats_server, tmp_path, body)


def test_heartbeats_keep_a_slow_handler_from_being_redelivered(nats_server, tmp_path):
    probe, calls = counting()

    async def body(bus: Bus):
        await bus.start(probe, ack_wait=1.0)
        await bus.request("job6", "probe", params={"sleep_s": 3.5})  # 3.5x ack_wait
        done = await bus.wait_for("stage_completed", "job6", timeout=15)
        assert done.metrics["delivery"] == 1.0
        assert calls == [("job6", 1)]
        assert (await bus.consumer("probe")).num_redelivered == 0

    run(nats_server, tmp_path, body)


def test_poison_messages_are_terminated_once(nats_server, tmp_path):
    probe, calls = counting()

    async def body(bus: Bus):
        await bus.start(probe)
        await bus.js.publish(subjects.stage_request("probe"), b"\x00not json")
        # Readable ids, invalid body: the job hears about it.
        bad = {"job_id": "job7", "stage": "probe", "node": "probe", "attempt": 1, "params": "nope"}
        await bus.js.publish(subjects.stage_request("probe"), json.dumps(bad).encode())
        failed = await bus.wait_for("stage_failed", "job7")
        assert failed.error_type == "bad_request" and "params" in failed.reason
        await asyncio.sleep(2.5)
        info = await bus.consumer("probe")
        assert info.num_redelivered == 0 and info.num_ack_pending == 0
        assert await bus.pending_requests() == 0
        assert calls == []

    run(nats_server, tmp_path, body)


def test_requests_of_finished_jobs_are_dropped(nats_server, tmp_path):
    probe, calls = counting()

    async def body(bus: Bus):
        kv = await bus.js.key_value(subjects.JOBS_BUCKET)
        await kv.put("job8", json.dumps({"status": "cancelled"}).encode())
        # A retried job: the coordinator publishes attempt 2 before it writes the job back to
        # running, so the worker may still read `cancelled` at attempt 1. That request runs.
        await kv.put("job7", json.dumps({"status": "cancelled", "nodes": {"probe": {"attempt": 1}}}).encode())
        await bus.start(probe)
        await bus.request("job8", "probe")
        await bus.request("job7", "probe", attempt=1)  # the cancelled attempt itself: dropped
        await bus.request("job9", "probe")  # no state at all: runs
        await bus.wait_for("stage_completed", "job9")
        await bus.request("job7", "probe", attempt=2)
        await bus.wait_for("stage_completed", "job7")
        assert calls == [("job9", 1), ("job7", 1)]  # (job, delivery): job7 ran once, for attempt 2
        assert [e.attempt for e in bus.of_kind("stage_completed", "job7")] == [2]
        assert not bus.of_kind("stage_completed", "job8")
        assert await bus.pending_requests() == 0

    run(nats_server, tmp_path, body)


def test_a_job_cancelled_mid_request_stops_its_running_handler(nats_server, tmp_path):
    probe, calls = counting()

    async def body(bus: Bus):
        await bus.start(probe, ack_wait=1.0)
        await bus.request("job10", "probe", params={"sleep_s": 30})
        await bus.wait_for("stage_progress", "job10")
        kv = await bus.js.key_value(subjects.JOBS_BUCKET)
        await kv.put("job10", json.dumps({"status": "cancelled"}).encode())
        started = time.monotonic()
        while await bus.pending_requests() and time.monotonic() - started < 10:
            await asyncio.sleep(0.1)
        assert await bus.pending_requests() == 0
        assert time.monotonic() - started < 5  # a heartbeat or two, not the 30 s of work
        assert not bus.of_kind("stage_completed", "job10") and not bus.of_kind("stage_failed", "job10")
        assert calls == [("job10", 1)] and (await bus.consumer("probe")).num_redelivered == 0

    run(nats_server, tmp_path, body)


async def _acked_after(bus: Bus, started: float, limit: float = 10.0) -> float:
    """Seconds from `started` until no request is left in the work queue (acked)."""
    while await bus.pending_requests() and time.monotonic() - started < limit:
        await asyncio.sleep(0.02)
    assert await bus.pending_requests() == 0, "the request was not acked"
    return time.monotonic() - started


def test_a_cancel_stops_a_running_stage_within_two_seconds(nats_server, tmp_path):
    """ack_wait 30 s (the default): the heartbeat's state read comes every 10 s, so only the
    job-end subscription (JobEndWatch) can stop the work this fast."""
    probe, calls = counting()

    async def body(bus: Bus):
        await bus.start(probe, ack_wait=30.0)
        await bus.request("job20", "probe", params={"sleep_s": 30})
        await bus.wait_for("stage_progress", "job20")
        started = time.monotonic()
        await publish_event(bus.js, JobCancelled(job_id="job20"))  # what the coordinator publishes
        elapsed = await _acked_after(bus, started)
        assert elapsed < 2.0, f"the cancelled request was acked after {elapsed:.2f} s"
        await asyncio.sleep(0.3)  # progress posted before the cancel may still be on its way
        reports = len(bus.of_kind("stage_progress", "job20"))
        await asyncio.sleep(1.0)
        assert len(bus.of_kind("stage_progress", "job20")) == reports, "the handler kept reporting"
        assert not bus.of_kind("stage_completed", "job20") and not bus.of_kind("stage_failed", "job20")
        assert calls == [("job20", 1)] and (await bus.consumer("probe")).num_redelivered == 0
        print(f"cancel -> request acked: {elapsed * 1000:.0f} ms")

    run(nats_server, tmp_path, body)


def test_a_cancelled_handler_that_never_reports_is_let_go_but_keeps_its_slot(nats_server, tmp_path):
    """A handler that never calls progress() cannot be interrupted (a thread); the request is
    acked at once and the worker takes no other request until the thread returns."""
    ran: list[tuple[str, float, float]] = []

    def quiet(request, ctx):
        begun = time.monotonic()
        time.sleep(3.0)
        ran.append((request.job_id, begun, time.monotonic()))
        out = ctx.work_dir / "out.txt"
        out.write_text("done")
        return {"out": out}

    async def body(bus: Bus):
        await bus.start(dataclasses.replace(NOOP, name="quiet", handle=quiet, setup=None), ack_wait=30.0)
        await bus.request("job21", "quiet")
        await _until_running(bus, "job21")
        started = time.monotonic()
        await publish_event(bus.js, JobCancelled(job_id="job21"))
        await bus.request("job22", "quiet")  # waits for job21's thread: one slot
        done = await bus.wait_for("stage_completed", "job22", timeout=15)
        assert done is not None
        [(_, begun21, end21), (_, begun22, _)] = sorted(ran)
        assert begun22 >= end21 - 0.05, "a second handler ran beside the abandoned one"
        assert not bus.of_kind("stage_completed", "job21")
        assert time.monotonic() - started < 10

    run(nats_server, tmp_path, body)


async def _until_running(bus: Bus, job_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [endpoint] = (await bus.srv("STATS", "quiet"))["endpoints"]
        if any(c["job_id"] == job_id for c in endpoint["data"]["current"]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job_id} never ran")


def test_slots_bound_concurrent_handlers(nats_server, tmp_path):
    probe, calls = counting()
    probe.slots = 2

    async def body(bus: Bus):
        await bus.start(probe)
        started = time.monotonic()
        for n in range(4):
            await bus.request(f"job-s{n}", "probe", params={"sleep_s": 1})
        for n in range(4):
            await bus.wait_for("stage_completed", f"job-s{n}")
        elapsed = time.monotonic() - started
        assert 1.9 < elapsed < 3.5  # two at a time: two rounds of one second

    run(nats_server, tmp_path, body)


def test_worker_info_over_srv_and_info_endpoint(nats_server, tmp_path):
    async def body(bus: Bus):
        await bus.start(replica_id="r1")
        info = await bus.srv("INFO", "noop")
        meta = info["metadata"]
        assert info["name"] == "captionbus-noop"
        assert meta["stage"] == "noop" and meta["env"] == "test"
        assert meta["interpreter"] == sys.executable and meta["pid"] == str(os.getpid())
        # host, stage, replica, process: one identity per worker (contracts.worker_identity)
        assert meta["worker_id"] == f"testhost/noop/r1/{os.getpid()}" and meta["replica"] == "r1"
        assert meta["host"] == "testhost"  # CAPTIONBUS_HOST_ID, not the machine's hostname
        assert meta["pkg.pydantic"] and meta["pkg.nats-py"] == "2.16.0"
        assert any(k.startswith("hw.") for k in meta)
        reply = await bus.nc.request(info_subject("noop"), b"", timeout=2)
        answered = WorkerInfo.model_validate_json(reply.data)
        assert answered.worker_id == meta["worker_id"] and answered.model == "none"
        [endpoint] = (await bus.srv("STATS", "noop"))["endpoints"]
        state = WorkerState.model_validate(endpoint["data"])
        assert (state.state, state.model, state.jobs_done, state.current) == ("idle", "none", 0, [])

    run(nats_server, tmp_path, body)


def test_stop_finishes_running_request_and_abandons_after_grace(nats_server, tmp_path):
    probe, calls = counting()

    async def body(bus: Bus):
        # Within the grace period: the running request completes before serve() returns.
        task, stop = await bus.start(probe, ack_wait=30)
        await bus.request("job10", "probe", params={"sleep_s": 0.8})
        await bus.wait_for("stage_progress", "job10")
        stop.set()
        await asyncio.wait_for(task, 10)
        assert bus.of_kind("stage_completed", "job10")

        # Past it: the request is nak'ed, so the next replica gets it now, not after ack_wait.
        task, stop = await bus.start(probe, ack_wait=30, grace_s=0.3)
        await bus.request("job11", "probe", params={"sleep_s": 3})
        await bus.wait_for("stage_progress", "job11")
        stop.set()
        await asyncio.wait_for(task, 10)
        started = time.monotonic()
        await bus.start(probe, ack_wait=30)
        done = await bus.wait_for("stage_completed", "job11", timeout=10)
        assert done.metrics["delivery"] == 2.0 and time.monotonic() - started < 8

    run(nats_server, tmp_path, body)


def _service_process(url: str, home: Path, replica: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "NATS_URL": url, "CAPTIONBUS_HOME": str(home), "CAPTIONBUS_ENV": "proc",
           "CAPTIONBUS_ARTIFACTS": "local", "CAPTIONBUS_ACK_WAIT": "2", "CAPTIONBUS_HOST_ID": "testhost",
           "PYTHONPATH": str(PROJECT_ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "captionbus.services", "serve", "noop", "--replica-id", replica],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(home))


async def _until_pinged(bus: Bus, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "service process exited"
        with suppress(Exception):
            ping = await bus.srv("PING", "noop")
            if ping["metadata"]["pid"] == str(proc.pid):
                return
        await asyncio.sleep(0.2)
    raise AssertionError("service process never answered $SRV.PING")


def test_kill_9_mid_request_is_redelivered_to_another_process(nats_server, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    procs: list[subprocess.Popen] = []

    async def body(bus: Bus):
        first = _service_process(nats_server, home, "a", tmp_path / "a.log")
        procs.append(first)
        await _until_pinged(bus, first)
        await bus.request("job12", params={"sleep_s": 2})
        await bus.wait_for("stage_progress", "job12", timeout=10)
        first.kill()  # SIGKILL mid-request: no nak, no goodbye
        first.wait()
        killed_at = time.monotonic()

        second = _service_process(nats_server, home, "b", tmp_path / "b.log")
        procs.append(second)
        done = await bus.wait_for("stage_completed", "job12", timeout=20)
        assert done.worker["worker_id"] == f"testhost/noop/b/{second.pid}" and done.worker["env"] == "proc"
        # Delivery 2: the killed process's copy came back once its ack_wait (2 s) ran out.
        assert done.metrics["delivery"] == 2.0
        assert time.monotonic() - killed_at < 15

        second.send_signal(signal.SIGTERM)  # graceful stop: exits 0
        assert await asyncio.to_thread(second.wait, 15) == 0
        assert b'"interpreter"' in (tmp_path / "b.log").read_bytes()

    try:
        run(nats_server, home, body, timeout=90)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_a_second_worker_follows_the_existing_consumers_policy(nats_server, tmp_path):
    """The consumer, not the process, decides redelivery: a replica started with another
    StagePolicy heartbeats at the consumer's ack_wait and counts exhaustion by its max_deliver."""
    probe, calls = counting()
    probe.slots = 2  # a free slot keeps a pull waiting: an expired ack_wait would redeliver to it

    async def body(bus: Bus):
        task, stop = await bus.start(probe, ack_wait=1.0, max_deliver=2)  # creates the consumer
        stop.set()
        await asyncio.wait_for(task, 10)
        await bus.start(probe, ack_wait=30.0, max_deliver=5)  # its own policy is not applied
        config = (await bus.consumer("probe")).config
        assert (config.ack_wait, config.max_deliver) == (1.0, 2)

        # Heartbeats every 30/3 s would let the 1 s ack_wait run out three times over.
        await bus.request("slow", "probe", params={"sleep_s": 3.5})
        done = await bus.wait_for("stage_completed", "slow", timeout=15)
        assert done.metrics["delivery"] == 1.0
        assert (await bus.consumer("probe")).num_redelivered == 0
        assert calls == [("slow", 1)]

        # Exhausted after the consumer's 2 deliveries; counting to 5 would never fail it.
        await bus.request("crash", "probe", params={"fail": "crash"})
        failed = await bus.wait_for("stage_failed", "crash")
        assert failed.reason == "probe failed on all 2 attempts: RuntimeError: noop was asked to crash"
        assert [c for c in calls if c[0] == "crash"] == [("crash", 1), ("crash", 2)]

    run(nats_server, tmp_path, body)


def test_worker_without_streams_exits_with_one_clear_line(nats_server, tmp_path):
    """Workers bind; they never provision. Before the coordinator (or `up`) has created the
    streams a worker stops at once, saying so, instead of creating them with its own settings."""
    async def in_process():
        stop = asyncio.Event()
        try:
            await serve(NOOP, Bus(nats_server, tmp_path).settings, nats_server, env_name="test", stop=stop)
        except BusError as e:
            return str(e)

    assert asyncio.run(asyncio.wait_for(in_process(), 20)) == (
        "stream CB_REQUESTS missing: start the coordinator or `captionbus up` first"
    )

    home = tmp_path / "home"
    home.mkdir()
    proc = _service_process(nats_server, home, "a", tmp_path / "a.log")
    assert proc.wait(30) == 2
    log = (tmp_path / "a.log").read_text()
    assert "stage service cannot start" in log
    assert "stream CB_REQUESTS missing: start the coordinator or `captionbus up` first" in log

    async def nothing_created():
        nc = await connect(nats_server, "test")
        streams = await nc.jetstream().streams_info()
        await nc.close()
        return streams

    assert asyncio.run(nothing_created()) == []


SETUP_REASON = "cannot load model 'x': not in the local cache and no network; set CAPTIONBUS_X_MODEL"


def test_a_stage_whose_setup_fails_fails_its_requests_with_the_reason(nats_server, tmp_path):
    """A model that cannot load used to leave the job `running` forever: now setup is tried a
    bounded number of times and the replica answers requests with setup's one-line reason."""
    from captionbus.core.retry import RetryPolicy

    async def body(bus: Bus):
        started = time.monotonic()
        await bus.start(options={"fail_setup": SETUP_REASON}, replica_id="broken",
                        setup_retry=RetryPolicy(initial_s=0.2, max_attempts=2))
        [endpoint] = (await bus.srv("STATS", "noop"))["endpoints"]
        assert endpoint["data"]["state"] == "setup_failed"
        assert endpoint["data"]["setup_error"] == f"RuntimeError: {SETUP_REASON}"
        await bus.request("job-unservable")
        failed = await bus.wait_for("stage_failed", "job-unservable")
        assert failed.reason == f"noop cannot be served on host testhost: RuntimeError: {SETUP_REASON}"
        assert failed.retryable is False and failed.error_type == "setup_failed"
        assert time.monotonic() - started < 15
        # The runtime terms the request right after publishing the failure: the stream lets it go
        # a moment after the event arrives (seen once under load); 5 s is a generous bound.
        deadline = time.monotonic() + 5
        while await bus.pending_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await bus.pending_requests() == 0
        assert not bus.of_kind("stage_completed", "job-unservable")

    run(nats_server, tmp_path, body)


def test_a_tenants_job_is_told_the_failure_without_this_hosts_paths_and_the_log_keeps_them(nats_server, tmp_path,
                                                                                          capfd):
    """A bus tenant reads its jobs' records and events: a failure reason that names this host's
    folders (a model folder, the artifact root) reaches it with each path cut to its last part
    and where the whole line is (core.text.without_paths); a job of no tenant, the operator's
    own (`run` names the folder to fix), keeps it. The worker's log has the whole line."""
    from captionbus.contracts.ids import new_job_id
    from captionbus.core.retry import RetryPolicy

    reason = "no CTranslate2 model at /srv/cb-models/whisper-large-v3 (model.bin missing)"
    tenants, operators = new_job_id("acme"), new_job_id()

    async def body(bus: Bus):
        await bus.start(options={"fail_setup": reason}, setup_retry=RetryPolicy(initial_s=0.1, max_attempts=1))
        await bus.request(tenants)
        await bus.request(operators)
        told = (await bus.wait_for("stage_failed", tenants)).reason
        assert told == ("noop cannot be served on host testhost: RuntimeError: no CTranslate2 model at "
                        "…/whisper-large-v3 (model.bin missing) (paths in the noop worker's log on host testhost)")
        assert (await bus.wait_for("stage_failed", operators)).reason == \
            f"noop cannot be served on host testhost: RuntimeError: {reason}"

    run(nats_server, tmp_path, body)
    assert "/srv/cb-models/whisper-large-v3" in capfd.readouterr().out


def test_a_tenants_job_is_warned_without_this_hosts_paths_and_the_log_keeps_them(nats_server, tmp_path, capfd):
    """A handler's warning (ctx.warn) reaches a tenant's job cut as its failures are
    (_for_the_job); the operator's own job keeps the whole line, and so does the worker's log."""
    from captionbus.contracts.ids import new_job_id

    warning = "used the fallback model at /srv/cb-models/whisper-small: the asked one is missing"
    tenants, operators = new_job_id("acme"), new_job_id()

    async def body(bus: Bus):
        await bus.start()
        await bus.request(tenants, params={"warn": warning})
        await bus.request(operators, params={"warn": warning})
        assert (await bus.wait_for("stage_warning", tenants)).message == (
            "used the fallback model at …/whisper-small: the asked one is missing "
            "(paths in the noop worker's log on host testhost)")
        assert (await bus.wait_for("stage_warning", operators)).message == warning
        await bus.wait_for("stage_completed", tenants)

    run(nats_server, tmp_path, body)
    assert "/srv/cb-models/whisper-small" in capfd.readouterr().out


def test_a_replica_whose_setup_failed_leaves_requests_to_a_healthy_one(nats_server, tmp_path):
    from captionbus.core.retry import RetryPolicy

    async def body(bus: Bus):
        await bus.start(replica_id="healthy", max_deliver=5)
        await bus.start(options={"fail_setup": SETUP_REASON}, replica_id="broken",
                        setup_retry=RetryPolicy(initial_s=0.1, max_attempts=1), max_deliver=5)
        for n in range(4):
            await bus.request(f"job-h{n}")
        for n in range(4):
            done = await bus.wait_for("stage_completed", f"job-h{n}", timeout=30)
            assert done.worker["worker_id"] == f"testhost/noop/healthy/{os.getpid()}"
        assert not bus.of_kind("stage_failed")

    run(nats_server, tmp_path, body)


class _FlakyStore:
    """The real artifact store, whose first `failures` uploads fail as during a network cut."""

    def __init__(self, real: ArtifactStore, failures: int):
        self.real, self.failures, self.calls = real, failures, 0

    async def put(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError("object store unavailable (503) during a network cut")
        return await self.real.put(*args, **kwargs)

    def scoped(self, tenant, restricted: bool = False):
        """The runtime asks for the job's tenant's store; a job of no tenant gets the same store."""
        real = self.real.scoped(tenant, restricted)
        assert real is self.real, "these jobs have no tenant"
        return self

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_finished_attempt_whose_upload_fails_is_not_recomputed(nats_server, tmp_path, monkeypatch):
    """The upload after the work failed transiently: it is retried; the handler runs once."""
    from captionbus.services.runtime import serve as serve_mod

    monkeypatch.setattr(serve_mod, "RESULT_RETRY", dataclasses.replace(serve_mod.RESULT_RETRY, initial_s=0.1))
    probe, calls = counting()

    async def body(bus: Bus):
        store = _FlakyStore(bus.store, failures=2)
        await bus.start(probe, store=store)
        await bus.request("job-upload", "probe")
        done = await bus.wait_for("stage_completed", "job-upload")
        assert calls == [("job-upload", 1)] and store.calls == 3
        assert done.metrics["result_retries"] == 2.0 and done.metrics["delivery"] == 1.0
        assert (await bus.consumer("probe")).num_redelivered == 0

    run(nats_server, tmp_path, body)


async def _stats(bus: Bus, stage: str = "noop") -> WorkerState:
    [endpoint] = (await bus.srv("STATS", stage))["endpoints"]
    return WorkerState.model_validate(endpoint["data"])


async def _until_state(bus: Bus, want, timeout: float = 20.0) -> WorkerState:
    deadline = time.monotonic() + timeout
    while True:
        with suppress(Exception):
            state = await _stats(bus)
            if want(state):
                return state
        assert time.monotonic() < deadline, "worker never reached the state"
        await asyncio.sleep(0.05)


def test_worker_state_loading_busy_idle_and_loading_progress(nats_server, tmp_path):
    """A worker answers $SRV while its model loads (state `loading`), takes a request then and
    says "loading model" on the job's progress; once loaded it is `busy` on that job (node,
    attempt, since), then `idle` with the job counted; a failed request is its last error."""
    async def body(bus: Bus):
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(NOOP, bus.settings, bus.url, env_name="test", stop=stop, ready=ready,
                                         options={"setup_s": 3}, policy=StagePolicy(ack_wait=2, max_deliver=3)))
        bus._services.append((task, stop))
        loading = await _until_state(bus, lambda s: s.state == "loading")
        assert loading.model is None and not ready.is_set()
        await bus.request("job-slow", params={"sleep_s": 1.5})
        waiting = await _until_state(bus, lambda s: s.current)
        assert waiting.state == "loading" and waiting.current[0].job_id == "job-slow"
        progress = await bus.wait_for("stage_progress", "job-slow")
        assert (progress.fraction, progress.message) == (0.0, "loading model")
        busy = await _until_state(bus, lambda s: s.state == "busy", timeout=30)
        assert [(c.job_id, c.node, c.attempt) for c in busy.current] == [("job-slow", "noop", 1)]
        assert ready.is_set() and busy.model == "none"
        await bus.wait_for("stage_completed", "job-slow", timeout=30)
        idle = await _until_state(bus, lambda s: s.state == "idle")
        assert idle.jobs_done == 1 and idle.current == [] and idle.since >= busy.since
        await bus.request("job-bad", params={"fail": "bad_input"})
        await bus.wait_for("stage_failed", "job-bad")
        failed = await _until_state(bus, lambda s: s.jobs_failed == 1)
        assert failed.last_error == "noop was asked to fail: bad input" and failed.jobs_done == 1

    run(nats_server, tmp_path, body)
