"""Two coordinators on one bus (issue 22): `captionbus coordinator` twice, as real processes, on one
stream of `chunked` jobs (3-minute films: 6 asr chunks each, fanned out) answered by simulated
stage workers (benchmarks/fleet_sim.py's, which
take requests from the stage consumers exactly as real replicas do), one coordinator killed -9
mid-run. Every job must complete, each with one terminal event, every stage request taken once
at attempt 1 (no job advanced twice), and both coordinators must have done part of the work."""
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
        jobs = Jobs(nc, js, "chunked")
        await jobs.start()
        workers = SimWorkers(nc, {stage: 2 for stage in stage_outputs(graphs)}, stage_outputs(graphs),
                             0.05, jobs.minutes)
        await workers.start()

        for n in range(JOBS):
            await jobs.submit(minutes=3)
            await asyncio.sleep(0.05)
            if n == JOBS // 2:  # jobs in flight at every stage: the first coordinator dies
                first.send_signal(signal.SIGKILL)
                first.wait(10)
        deadline = time.monotonic() + 90
        while len(jobs.finished) < JOBS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert second.poll() is None, second_log.read_text()[-2000:]

        kv = await js.key_value(subjects.JOBS_BUCKET)
        states = {job: await whole_record(js, JobState.model_validate_json((await kv.get(job)).value))
                  for job in jobs.submitted}
        terminal = await terminal_events(js)
        await workers.stopped()
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

    try:
        asyncio.run(asyncio.wait_for(main(), 180))
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(20)
