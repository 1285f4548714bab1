"""A model-based test of the whole stack (issue 19): a seeded random sequence of operations —
submit through the CLI (`captionbus submit`) and the gateway (`POST /v1/jobs`), jobs that complete
and jobs that fail; cancel and retry through the gateway and the CLI; kill -9 of a worker
(restarted as a supervisor would); restarts of the coordinator, the gateway and the dashboard;
pauses — on a local stack with two hosts' worth of services (CAPTIONBUS_HOST_ID alpha and beta,
noop with 2 replicas on alpha). At each quiet point (every job terminal, every webhook record
done) it asserts:

- no job is non-terminal past its deadline (QUIET_S after the last operation);
- the job lists of the CLI, the gateway and the dashboard equal the KV;
- every job's events are identical across CLI, SSE, webhook deliveries and the job page, with
  none missing or doubled (tests/system/stack.py: history_agrees);
- the worker lists of the CLI, the dashboard (/api/workers, /api/queues) and /metrics are equal;
- each job's status and its counts of cancel_requested / retry_requested / started events are
  what the model of the operations allows (a cancel may lose the race to the job's own end).

CI runs the seeds in CAPTIONBUS_MODEL_SEEDS (default 1,2) with CAPTIONBUS_MODEL_OPS operations
each (default 10). `benchmarks/model.py` runs the same model for >= 300 operations and prints
the table of invariant checks and violations (`run_model` below is shared by both).

The test workflow `pair` is written to a config dir of the test's (CAPTIONBUS_CONFIG for the
CLI, captionbus.core.settings.USER_CONFIG_DIR for the in-process gateway), so both doors check a job
against it as they check a real one."""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from captionbus.core import settings as core_settings
from captionbus.core.tasks import await_stack
from tests.integration.test_gateway_webhook_state import SECRET, receiver  # noqa: F401  (a fixture)
from tests.system.stack import LocalStack, until, webhook_log

SEEDS = [int(s) for s in os.environ.get("CAPTIONBUS_MODEL_SEEDS", "1,2").split(",") if s.strip()]
OPS = int(os.environ.get("CAPTIONBUS_MODEL_OPS", "10"))
# Quiet points: every CHECK_EVERY operations and at the end. Between them a quiet point compares
# the histories of the jobs the operations touched since the last one (and of HISTORY_SAMPLE
# others); the last compares every job's (a long run stays linear in its jobs).
CHECK_EVERY = int(os.environ.get("CAPTIONBUS_MODEL_CHECK_EVERY", "0")) or max(OPS // 2, 1)
HISTORY_SAMPLE = 3
REPORT = os.environ.get("CAPTIONBUS_MODEL_REPORT")  # a file for the invariant table (benchmarks/model.py)
QUIET_S = 60.0  # a job's deadline: terminal this long after the last operation
ACK_WAIT_S = 5.0  # a killed worker's request (and an event a coordinator held) comes back this soon
STUCK_S = 120.0  # one step (an operation, a quiet point) longer than this: the watchdog says where
STUCK_FAIL_S = 300.0  # ... and longer than this: the watchdog ends the run, and the test fails with the stacks
FLEET = [("alpha", "noop", 0), ("alpha", "noop", 1), ("beta", "noop", 0)]
WORKFLOWS = {"pair": {"name": "pair", "nodes": {
    "first": {"stage": "noop", "inputs": {"media": "job.input"}, "outputs": ["media"], "params": {"sleep_s": 3}},
    "second": {"stage": "noop", "inputs": {"media": "first.media"}, "outputs": ["media"], "params": {"sleep_s": 0.3}}},
    "outputs": {"media": "second.media"}}}
FAIL = {"noop": {"fail": "bad_input"}}
OPERATIONS = {  # name: weight (cancel and retry only when a job is in a state that takes them)
    "submit": 4, "cancel": 2, "retry": 2, "kill": 1, "restart-coordinator": 1, "restart-gateway": 1,
    "restart-dashboard": 1, "pause": 1,
}
INVARIANTS = {
    "deadline": "no job non-terminal QUIET_S after the last operation",
    "webhooks": "every job's webhook records done",
    "job lists": "CLI jobs, gateway /v1/jobs, dashboard /api/jobs = KV",
    "workers": "CLI workers, dashboard workers/queues, /metrics = the fleet",
    "history": "a job's events: CLI = SSE = webhook deliveries = job page",
    "model": "a job's status and cancel/retry/started counts as the model allows",
}


@dataclass
class Job:
    """What the model knows of one job: how it ends on its own, and what was asked of it."""

    job_id: str
    natural: str  # completed, or failed for a job whose noop nodes fail
    allowed: set[str] = field(default_factory=set)
    counts: Counter = field(default_factory=Counter)  # accepted cancel / retry requests

    def __post_init__(self) -> None:
        self.allowed = {self.natural}


@dataclass
class Tally:
    """Checks made and violations found, per invariant; the table benchmarks/model.py prints."""

    checks: Counter = field(default_factory=Counter)
    violations: dict[str, list[str]] = field(default_factory=dict)

    def record(self, invariant: str, error: AssertionError | None) -> None:
        self.checks[invariant] += 1
        if error is not None:
            self.violations.setdefault(invariant, []).append(str(error)[:2000])

    def table(self, header: str) -> str:
        lines = [header, f"{'invariant':<11} {'checks':>7} {'violations':>10}  what"]
        for name, what in INVARIANTS.items():
            lines.append(f"{name:<11} {self.checks[name]:>7} {len(self.violations.get(name, [])):>10}  {what}")
        return "\n".join(lines)


def write_workflow_config(root: Path) -> Path:
    """A config dir holding the test workflow, as an operator's CAPTIONBUS_CONFIG would."""
    (root / "workflows").mkdir(parents=True, exist_ok=True)
    (root / "workflows" / "pair.yaml").write_text(json.dumps(WORKFLOWS["pair"]))  # JSON is YAML
    return root


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_operations_keep_every_surface_true(nats_server, tmp_path, receiver, seed, monkeypatch):  # noqa: F811
    hooks, rec = receiver
    config = write_workflow_config(tmp_path / "config")
    monkeypatch.setattr(core_settings, "USER_CONFIG_DIR", config)  # the in-process gateway's validate_job
    rng = random.Random(seed)
    jobs: dict[str, Job] = {}
    touched: set[str] = set()  # jobs an operation changed since the last quiet point
    log: list[str] = []
    tally = Tally()
    started = time.monotonic()

    step = ["starting the stack", time.monotonic()]  # what main() awaits now, since when
    stuck: list[str] = []  # what the watchdog found stuck past STUCK_FAIL_S, with the task stacks

    async def watchdog(main_task: asyncio.Task):
        """Says where main() waits when one step takes over STUCK_S, and ends the run when it takes
        over STUCK_FAIL_S: one full run (7 December 2026, 1170 tests) spent 751 s here, silent,
        then passed (the 750 s wait_for's cancellation was swallowed by stack.py's _cancelled).
        It came back in 1 of 20 runs since, and the watchdog's stacks showed it: restart-dashboard
        waited for the dashboard's Board.stop, whose worker poll had lost its cancellation
        (fixed: captionbus.core.tasks). The stacks of every task go to stuck-<seed>.txt beside the test's logs and a
        warning names the step (pytest's warnings summary shows it even when the test passes);
        past STUCK_FAIL_S main() is cancelled and the test fails with those stacks, whether or not
        something swallows the cancellation."""
        reported = None
        while True:
            await asyncio.sleep(5)
            what, since = step
            waited = time.monotonic() - since
            if waited > STUCK_S and (reported != (what, since) or (waited > STUCK_FAIL_S and not stuck)):
                reported = (what, since)
                stacks = "\n".join(await_stack(task) for task in asyncio.all_tasks())
                path = tmp_path / f"stuck-{seed}.txt"
                path.write_text(f"{what}: {waited:.0f} s\nlog: {log}\n{stacks}\n")
                warnings.warn(f"test_model seed {seed}: {what!r} has taken over {STUCK_S:.0f} s; "
                              f"task stacks in {path}", stacklevel=1)
                if waited > STUCK_FAIL_S:
                    stuck.append(f"{what} took over {STUCK_FAIL_S:.0f} s ({path}):\n{path.read_text()[:20000]}")
                    main_task.cancel()

    async def main():
        guard = asyncio.create_task(watchdog(asyncio.current_task()))
        try:
            async with LocalStack(nats_server, tmp_path, fleet=FLEET, workflows=WORKFLOWS, hooks=hooks,
                                  secret=SECRET, ack_wait=ACK_WAIT_S) as stack:
                stack.env.update(CAPTIONBUS_CONFIG=str(config), CAPTIONBUS_ARTIFACTS_MODE="object")
                for n in range(OPS):
                    step[:] = [f"operation {n} (after {log[-1:]})", time.monotonic()]
                    await operate(stack, n)
                    if (n + 1) % CHECK_EVERY == 0 and n + 1 < OPS:
                        step[:] = [f"quiet point after operation {n}", time.monotonic()]
                        await check(stack, final=False)
                step[:] = ["the final quiet point", time.monotonic()]
                await check(stack, final=True)
                step[:] = ["stopping the stack", time.monotonic()]
        finally:
            guard.cancel()

    async def submit(stack: LocalStack, n: int, via_cli: bool) -> None:
        fails = rng.random() < 0.25
        media = tmp_path / f"clip{n}.wav"
        media.write_bytes(b"RIFF" + rng.randbytes(500))
        if via_cli:
            args = ["submit", str(media), "-w", "pair", "--json"] + (["-o", "noop.fail=bad_input"] if fails else [])
            job_id = json.loads(await stack.cli(*args))["job_id"]
        else:
            answer = await stack.gw.post("/v1/jobs", files={"file": (media.name, media.read_bytes())},
                                         data={"workflow": "pair", **({"options": json.dumps(FAIL)} if fails else {})})
            assert answer.status_code == 201, answer.text
            job_id = answer.json()["id"]
        jobs[job_id] = Job(job_id, "failed" if fails else "completed")
        touched.add(job_id)
        log.append(f"submit {job_id} via {'cli' if via_cli else 'gateway'}{' (fails)' if fails else ''}")

    async def operate(stack: LocalStack, n: int) -> None:
        states = {job_id: state.status.value for job_id, state in (await stack.kv_states()).items()}
        running = sorted(j for j, s in states.items() if s == "running" and j in jobs)
        ended = sorted(j for j, s in states.items() if s in ("failed", "cancelled") and j in jobs)
        weights = {**OPERATIONS, "cancel": OPERATIONS["cancel"] if running else 0,
                   "retry": OPERATIONS["retry"] if ended else 0}
        choice = rng.choices(list(weights), weights=list(weights.values()))[0]
        via_cli = rng.random() < 0.5
        if choice == "submit":
            await submit(stack, n, via_cli)
        elif choice in ("cancel", "retry"):
            job = jobs[rng.choice(running if choice == "cancel" else ended)]
            if via_cli:
                accepted = (await asyncio.to_thread(stack.cli_sync_status, choice, job.job_id)) == 0
            else:
                accepted = (await stack.gw.post(f"/v1/jobs/{job.job_id}/{choice}")).status_code == 202
            if accepted:
                job.counts[choice] += 1
                touched.add(job.job_id)
                # a cancel may lose the race to the job's own end; a retry runs it to its end again
                job.allowed = {"cancelled", job.natural} if choice == "cancel" else {job.natural}
            log.append(f"{choice} {job.job_id} via {'cli' if via_cli else 'gateway'}: "
                       f"{'accepted' if accepted else 'refused'}")
        elif choice == "kill":
            index = rng.randrange(len(FLEET))
            old = stack.services[index].process.pid
            new = await stack.kill_and_restart(index)
            log.append(f"kill -9 {'/'.join(map(str, FLEET[index]))} pid {old}, restarted as pid {new.process.pid}")
        elif choice.startswith("restart-"):
            await getattr(stack, choice.replace("-", "_"))()
            log.append(choice)
        else:
            log.append("pause")
        await asyncio.sleep(rng.uniform(0.1, 1.0))

    async def verify(invariant: str, check) -> None:
        try:
            await check()
        except AssertionError as e:
            tally.record(invariant, e)
        else:
            tally.record(invariant, None)

    async def check(stack: LocalStack, final: bool) -> None:
        async def deadline():
            async def all_terminal():
                states = await stack.kv_states()
                return all(states[j].status.finished for j in jobs if j in states) and set(jobs) <= set(states)
            try:
                await until(all_terminal, QUIET_S, "every job to be terminal")
            except AssertionError:
                states = await stack.kv_states()
                late = {j: states[j].status.value if j in states else "missing" for j in jobs
                        if j not in states or not states[j].status.finished}
                raise AssertionError(f"jobs not terminal {QUIET_S:.0f} s after the last operation: {late}; "
                                     f"ops: {log[-20:]}") from None

        async def webhooks():
            async def done():
                for job_id in jobs:
                    records = (await stack.gw.get(f"/v1/jobs/{job_id}/webhooks")).json()["data"]
                    if not records or not all(r["done"] for r in records):
                        return False
                return True
            await until(done, 30, "every webhook record to be done")

        statuses: dict[str, str] = {}

        async def job_lists():
            statuses.update(await stack.jobs_agree())

        await verify("deadline", deadline)
        await verify("webhooks", webhooks)
        await verify("job lists", job_lists)
        await verify("workers", stack.workers_agree)
        if not statuses:
            statuses.update({j: s.status.value for j, s in (await stack.kv_states()).items()})
        others = sorted(set(jobs) - touched)
        compared = sorted(jobs) if final else sorted(touched) + rng.sample(others, min(HISTORY_SAMPLE, len(others)))
        for job_id in compared:
            job, events = jobs[job_id], []

            async def history(job_id=job_id, events=events):
                events.extend(await stack.history_agrees(job_id, webhook_log(rec)))

            async def model(job=job, events=events):
                kinds = Counter(e["kind"] for e in events)
                status = statuses.get(job.job_id)
                assert status in job.allowed, (job, status, log[-20:])
                assert kinds["cancel_requested"] == job.counts["cancel"], (job, kinds)
                assert kinds["retry_requested"] == job.counts["retry"], (job, kinds)
                # every accepted retry is of a finished job, so the coordinator applies it: a restart
                assert kinds["started"] == 1 + job.counts["retry"], (job, kinds)
                assert events[-1]["kind"] == status, (job, events[-1]["kind"])

            await verify("history", history)
            if events:
                await verify("model", model)
        touched.clear()
        print(f"seed {seed}: quiet point after {len(log)} operations, {len(jobs)} jobs "
              f"({dict(Counter(statuses.values()))}), {len(compared)} histories compared, "
              f"{sum(len(v) for v in tally.violations.values())} violations so far "
              f"({time.monotonic() - started:.0f} s)", flush=True)

    try:
        asyncio.run(asyncio.wait_for(main(), 600 + 15 * OPS))  # ~7 s an operation measured at load 12-14
    except asyncio.CancelledError:
        if not stuck:
            raise
    if stuck:
        pytest.fail(f"test_model seed {seed} hung: {stuck[0]}")
    ops = Counter(" ".join([o.split()[0], *re.findall(r"via (cli|gateway)", o)]) for o in log)
    header = (f"seed {seed}: {len(log)} operations ({dict(ops)}; {sum('accepted' in o for o in log)} cancels/retries "
              f"accepted), {len(jobs)} jobs, {time.monotonic() - started:.0f} s")
    table = tally.table(header)
    print(table)
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(table + "\n\n")
    assert not tally.violations, {k: v[:3] for k, v in tally.violations.items()}
