"""Two coordinators on one bus (issue 22): `captionbus coordinator` twice, as real processes, on one
stream of `chunked` jobs (3-minute films: 6 asr chunks each, fanned out) answered by simulated
stage workers (benchmarks/fleet_sim.py's, which
take requests from the stage consumers exactly as real replicas do), one coordinator killed -9
mid-run. Every job must complete, each with one terminal event, every stage request taken once
at attempt 1 (no job advanced twice), and both coordinators must have done part of the work.
Job ownership (captionbus/coordinator/leases.py): every write of every job's state, as the bus
stored it (JobState.written_by, watched on the KV's subjects), is by the one coordinator that
holds the job's partition: a job changes hands at most once, from the killed coordinator to the
survivor, never back; and each partition's consumer on CB_EVENTS holds exactly its jobs' events."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.fleet_sim import Jobs, SimWorkers, load_graphs, stage_outputs, terminal_events
from captionbus.client import whole_record
from captionbus.contracts import JobState, subjects
from captionbus.core.bus import connect, provision
from captionbus.core.settings import PROJECT_ROOT, Settings

JOBS = 24
# The coordinators' CAPTIONBUS_EVENT_ACK_WAIT: a dead coordinator's events go to the other after
# this, not 30 s. (It was set here by creating the events consumer first, but each coordinator sets
# its own ack wait on the consumer as it starts: the dead one's events waited 30 s.)
ACK_WAIT_S = 2.0


def start_coordinator(url: str, home: Path) -> tuple[subprocess.Popen, Path]:
    home.mkdir(parents=True)
    log = home / "coordinator.log"
    env = {**os.environ, "NATS_URL": url, "CAPTIONBUS_HOME": str(home), "CAPTIONBUS_LOG_LEVEL": "INFO",
           "CAPTIONBUS_RESULT_SECRET": "shared-by-both", "CAPTIONBUS_EVENT_ACK_WAIT": str(ACK_WAIT_S),
           "PYTHONPATH": str(PROJECT_ROOT)}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "captionbus", "coordinator"], env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def jobs_decided(log: Path) -> set[str]:
    """Jobs this coordinator requested a stage of (its log's `stage requested` lines)."""
    jobs = set()
    for line in log.read_text(errors="replace").splitlines():
        if "stage requested" in line:
            try:
                jobs.add(json.loads(line)["job_id"])
            except (ValueError, KeyError):
                continue
    return jobs


async def wait_started(logs: list[Path], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all("coordinator started" in log.read_text(errors="replace") for log in logs):
        assert time.monotonic() < deadline, "a coordinator did not start: " + " | ".join(
            log.read_text(errors="replace")[-1000:] for log in logs)
        await asyncio.sleep(0.2)


def coordinator_id(log: Path) -> str:
    """The id a coordinator logged as it started (the one it writes into JobState.written_by)."""
    for line in log.read_text(errors="replace").splitlines():
        if "coordinator started" in line:
            return json.loads(line)["coordinator"]
    raise AssertionError(f"no start in {log}")


async def wait_balanced(js, members: int, timeout: float = 60.0) -> dict[int, str]:
    """partition -> holder, once every partition is held and each of `members` holds its share."""
    kv = await js.key_value(subjects.COORDINATORS_BUCKET)
    deadline = time.monotonic() + timeout
    while True:
        held = {}
        for p in range(subjects.PARTITIONS):
            try:
                held[p] = (await kv.get(subjects.partition_lease_key(p))).value.decode()
            except Exception:
                continue
        counts = Counter(held.values())
        share = -(-subjects.PARTITIONS // members)
        if len(held) == subjects.PARTITIONS and len(counts) == members and max(counts.values()) <= share:
            return held
        assert time.monotonic() < deadline, f"leases never balanced: {held}"
        await asyncio.sleep(0.3)


def test_each_partitions_consumer_holds_exactly_its_jobs_coordinator_events(nats_server, tmp_path):
    """The server's filtering of CB_EVENTS by the partition token (the coordinators' consumers,
    service.partition_consumer_config) hands each partition's consumer the events a coordinator
    acts on of the jobs subjects.job_partition puts there, of no tenant and of a tenant, and
    nothing else: not another kind, not an event in the layout before job ownership. Stored once."""
    from nats.js.api import DeliverPolicy

    from captionbus.coordinator.service import partition_consumer_config

    async def main() -> None:
        nc = await connect(nats_server, "test-partitions", Settings(home=tmp_path / "driver"))
        js = nc.jetstream()
        await provision(js)
        before = (await js.stream_info(subjects.EVENTS_STREAM)).state.messages
        jobs = [f"job-{n}" for n in range(150)] + [f"acme_clip{n}" for n in range(50)]
        for n, job in enumerate(jobs):
            kind = subjects.COORDINATOR_KINDS[n % len(subjects.COORDINATOR_KINDS)]
            await js.publish(subjects.job_event(job, kind), b"{}")
            await js.publish(subjects.job_event(job, "stage_progress"), b"{}")
            await js.publish(subjects.legacy_job_event(job, kind), b"{}")
        pending = {}
        for p in range(subjects.PARTITIONS):
            config = partition_consumer_config(p)
            config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, before + 1
            pending[p] = (await js.add_consumer(subjects.EVENTS_STREAM, config)).num_pending
        stored = (await js.stream_info(subjects.EVENTS_STREAM)).state.messages - before
        await nc.close()
        assert pending == dict(Counter(subjects.job_partition(job) for job in jobs) | {
            p: 0 for p in range(subjects.PARTITIONS) if p not in {subjects.job_partition(j) for j in jobs}})
        assert stored == 3 * len(jobs)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_consume_loop_asks_again_after_idle_expiries_and_holds_at_most_in_hand(nats_server, tmp_path,
                                                                                   monkeypatch):
    """coordinator/consume.py: pull requests that expire idle (the server's 408s) are asked again,
    so events stored after them are handled at once, at most `in_hand` at a time, and after a stop
    every event is either handled (acked) or still the consumer's (none lost)."""
    from captionbus.coordinator import consume
    from captionbus.coordinator.service import partition_consumer_config

    monkeypatch.setattr(consume, "EXPIRES_S", 0.3)

    async def main() -> None:
        nc = await connect(nats_server, "test-consume", Settings(home=tmp_path / "driver"))
        js = nc.jetstream()
        await provision(js)
        p = subjects.PARTITIONS - 1
        config = partition_consumer_config(p)
        config.durable_name = "consume-test"
        await js.add_consumer(subjects.EVENTS_STREAM, config)
        job = next(f"consume-{n}" for n in range(1000) if subjects.job_partition(f"consume-{n}") == p)
        handled, at_once, gate = [], [], asyncio.Event()

        async def handle(msg) -> None:
            at_once.append(len(consumer.running))
            await gate.wait()
            handled.append(msg.subject)
            await msg.ack()

        stop = asyncio.Event()
        consumer = consume.PullConsumer(nc, subjects.EVENTS_STREAM, "consume-test", 4, handle, stop)
        task = asyncio.create_task(consumer.run())
        await asyncio.sleep(1.2)  # several requests expired meanwhile
        for _ in range(10):
            await js.publish(subjects.job_event(job, "stage_completed"), b"{}")
        await asyncio.sleep(0.5)
        assert len(consumer.running) == 4 and not handled  # 4 in hand, the rest waits on the server
        gate.set()
        for _ in range(50):
            if len(handled) == 10:
                break
            await asyncio.sleep(0.1)
        gate.clear()
        await js.publish(subjects.job_event(job, "stage_completed"), b"{}")
        await asyncio.sleep(0.3)
        stop.set()
        gate.set()
        await asyncio.wait_for(task, 5)
        for _ in range(20):  # an ack is a plain publish: the server counts it a moment later
            info = await js.consumer_info(subjects.EVENTS_STREAM, "consume-test")
            if info.num_pending + info.num_ack_pending == 11 - len(handled):
                break
            await asyncio.sleep(0.1)
        await js.delete_consumer(subjects.EVENTS_STREAM, "consume-test")
        await nc.close()
        assert len(handled) >= 10 and max(at_once) <= 4
        assert info.num_pending + info.num_ack_pending == 11 - len(handled), info

    asyncio.run(asyncio.wait_for(main(), 60))


def test_two_coordinators_share_one_stream_of_jobs_and_one_dies(nats_server, tmp_path):
    graphs = load_graphs("chunked")
    processes: list[subprocess.Popen] = []

    async def main() -> None:
        nc = await connect(nats_server, "test-coordinators", Settings(home=tmp_path / "driver"))
        js = nc.jetstream()
        await provision(js)
        (first, first_log), (second, second_log) = (
            start_coordinator(nats_server, tmp_path / name) for name in ("coordinator-a", "coordinator-b"))
        processes.extend([first, second])
        await wait_started([first_log, second_log])
        # Every write of a job's record as the bus stores it (its subjects: `$KV.cb_jobs.<job>`).
        writes: list[tuple[str, str | None]] = []

        async def on_write(msg) -> None:
            if msg.data:
                writes.append((msg.subject.rpartition(".")[2], json.loads(msg.data).get("written_by")))

        watch = await nc.subscribe(f"$KV.{subjects.JOBS_BUCKET}.*", cb=on_write)
        held = await wait_balanced(js, 2)
        killed_at = 0
        jobs = Jobs(nc, js, "chunked")
        await jobs.start()
        workers = SimWorkers(nc, {stage: 2 for stage in stage_outputs(graphs)}, stage_outputs(graphs),
                             0.05, jobs.minutes)
        await workers.start()

        for n in range(JOBS):
            await jobs.submit(minutes=3)
            await asyncio.sleep(0.05)
            if n == JOBS // 2:  # jobs in flight at every stage: the first coordinator dies
                # ... once it has requested a stage (under the whole suite's load it had not yet,
                # and nothing was shared to hand over)
                for _ in range(300):
                    if jobs_decided(first_log):
                        break
                    await asyncio.sleep(0.1)
                first.send_signal(signal.SIGKILL)
                first.wait(10)
                killed_at = len(writes)
        deadline = time.monotonic() + 90
        while len(jobs.finished) < JOBS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert second.poll() is None, second_log.read_text()[-2000:]

        kv = await js.key_value(subjects.JOBS_BUCKET)
        states = {job: await whole_record(js, JobState.model_validate_json((await kv.get(job)).value))
                  for job in jobs.submitted}
        terminal = await terminal_events(js)
        await workers.stopped()
        await watch.unsubscribe()
        await nc.close()

        assert Counter(s.status.value for s in states.values()) == {"completed": JOBS}
        assert all(terminal[job] == 1 for job in jobs.submitted), terminal
        ran = [node for s in states.values() for node in s.nodes.values() if node.status.value != "skipped"]
        assert all(node.status.value == "completed" for node in ran)
        attempts = Counter(node.attempt for node in ran)
        assert set(attempts) == {1}, f"a node was requested again: {attempts}"
        assert workers.executed and max(workers.executed.values()) == 1, "a stage request ran twice"
        assert len(workers.executed) == len(ran) and sum(n.startswith("asr-") for s in states.values()
                                                         for n in s.nodes) == JOBS * 6
        by_first, by_second = jobs_decided(first_log), jobs_decided(second_log)
        assert by_first and by_second, "one coordinator did all the work: nothing was shared"
        assert by_second - by_first, "the surviving coordinator took over no job"
        # One owner at a time: each job's writers, in the order the bus stored them.
        dead, survivor = coordinator_id(first_log), coordinator_id(second_log)
        owners: dict[str, list[str | None]] = {}
        for job, writer in writes:
            if job in jobs.submitted and owners.setdefault(job, [writer])[-1] != writer:
                owners[job].append(writer)
        assert set(owners) == set(jobs.submitted)
        assert all(seq in ([dead], [survivor], [dead, survivor]) for seq in owners.values()), owners
        handed = [job for job, seq in owners.items() if seq == [dead, survivor]]
        assert handed, "no job changed hands when its coordinator died"
        # ... and until the kill each write is by the holder of its job's partition's lease (the
        # leases did not move before: balanced before the first job).
        before = [(job, writer) for job, writer in writes[:killed_at] if job in owners]
        assert before and all(writer == held[subjects.job_partition(job, subjects.PARTITIONS)]
                              for job, writer in before), before

    try:
        asyncio.run(asyncio.wait_for(main(), 180))
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(20)
