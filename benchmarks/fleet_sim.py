"""A simulated fleet: how far the coordinator layer goes, without a model in sight (issue 22).

    python benchmarks/fleet_sim.py                         # 2-core defaults: see below
    python benchmarks/fleet_sim.py --coordinators 3 --workers 500 --jobs 10000 --rate 20
    python benchmarks/fleet_sim.py --single-node --coordinators 1 --no-kill
    python benchmarks/fleet_sim.py --hops --baseline HEAD~1     # hops through 1 and 3 coordinators

What runs, all real but the stages: a 3-node JetStream cluster on loopback (benchmarks/chaos.py's
Cluster; streams and the job KV at R3), 1-3 coordinators as their own processes (the real
`Coordinator` with the real `config/workflows/chunked.yaml`), and simulated stage workers in one
process (`SimWorkers`: a stage's replicas are slots of a pool, a request taken from the stage's
durable consumer whenever one is free, as competing real replicas take them) that sleep for the
stage's simulated duration and publish a `stage_completed` with the request's token (the `asr`
workers also answer `$SRV STATS`, so the coordinator sizes each film's window to them as it does
for real ones). Jobs of mixed lengths (`--mix`: `clips`, mostly clips with a tail of films up to
2 hours, or `films`; chunked at 30 s) arrive at `--rate` per second. Mid-run one coordinator is
killed (-9) and then the node that leads the job KV stream (on `--single-node`, the one server),
which comes back 5 s later on its store; the killed coordinator is not restarted (its events must
be handed over to the others, or, with one coordinator, a replacement is started, as systemd
would). A progress line every `--progress-s` gives requests/s and the coordinators' CPU share.
`--max-in-flight N` holds an arriving job at the door while N are in flight (its wait counts in
its latency): uncapped, one coordinator whose backlog passed the 256 states it remembers paid more
a request as the backlog grew and never caught up (README, "The issue's 10,000 jobs");
`--submit-for S` closes the door after S s.

Durations (`stage_seconds`): asr 1.5 s per 30 s chunk, issue 22's figure for a GPU worker (a
30 s chunk every 1-2 s); the stages around it are estimates of their order of size, small next
to asr: per film minute demux 0.03 s, vad 0.25 s, mux 0.05 s; chunk 0.05 s, transcript_join and
subtitle_gen 0.05 s + 0.002 s per chunk. All are multiplied by `--scale` (default 0.02: a chunk
takes 30 ms), so a run measures the coordinator and the bus rather than sleeping; `--scale 1` is
real time. Workers' memory is not simulated (README, "One film across the fleet", has the real
per-service figures).

`--hops`: the hop benchmark instead: jobs of `--hop-count` noop nodes, p50 per hop one job at a
time and hops/s with `--concurrency` jobs in flight, with 1 and then 3 coordinators
(`--hop-coordinators`), and first the same with coordinators of git revision `--baseline REV`.

It prints: jobs per hour, queue wait per stage (request stored -> taken by a worker, p50/p99,
from the stream timestamp of the request and the worker's clock), coordinator CPU seconds per job
and per hop (from /proc), the streams' and KV's sizes at the end, and the checks: every job
terminal, each with exactly one terminal event, none lost, and how many requests ran twice.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

# A coordinator process of `--baseline REV` imports that revision's code (FLEET_TREE).
sys.path.insert(0, os.environ.get("FLEET_TREE") or str(Path(__file__).resolve().parent.parent))

from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

from captionbus.stack import _die_with_parent
from captionbus.contracts import JobSpec, JobSubmitted, StageCompleted, StageRequest, new_job_id, subjects
from captionbus.contracts.artifacts import ArtifactRef
from captionbus.core.bus import StagePolicy, connect, ensure_stage_consumer, provision, publish_event, through_failover
from captionbus.core.logging import configure_logging
from captionbus.core.settings import PROJECT_ROOT, Settings

SECRET = b"fleet-sim-secret"  # every coordinator of a bus shares the result secret
CHUNK_S = 30.0
# (minutes, weight). `clips` (the default): mostly clips, a tail of long chunked films, issue 22's
# publisher fleet: 14.2 chunks, ~20 stage requests a job on average, 2-hour films 2 % of the jobs
# and a third of the chunks. `films`: the mix of the first runs (27.7 chunks a job).
MIXES = {"clips": [(0.5, 70), (2, 12), (10, 8), (30, 5), (60, 3), (120, 2)],
         "films": [(0.5, 40), (3, 25), (10, 15), (30, 10), (60, 6), (120, 4)]}


def chunks_of(minutes: float) -> int:
    return max(1, math.ceil(minutes * 60 / CHUNK_S))


def stage_seconds(stage: str, minutes: float, chunks: int) -> float:
    """Simulated seconds of one request of `stage` for a film of `minutes` (before --scale)."""
    per_minute = {"demux": 0.03, "vad": 0.25, "mux": 0.05}
    if stage in per_minute:
        return per_minute[stage] * minutes
    if stage == "asr":
        return 1.5  # one 30 s chunk on a GPU worker (issue 22: 1-2 s)
    if stage in ("transcript_join", "subtitle_gen"):
        return 0.05 + 0.002 * chunks
    return 0.05  # chunk, noop


def fake_ref(name: str, seed: str) -> ArtifactRef:
    return ArtifactRef(key=hashlib.sha256(seed.encode()).hexdigest(), name=name, size=1)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ----------------------------------------------------------------------------- simulated workers

def stage_outputs(graphs: dict) -> dict[str, list[str]]:
    """stage -> every output name a node of that stage declares, in any of `graphs`."""
    outputs: dict[str, set[str]] = defaultdict(set)
    for graph in graphs.values():
        for name, spec in graph.nodes.items():
            outputs[spec.stage_name(name)].update(spec.outputs)
    return {stage: sorted(names) for stage, names in outputs.items()}


class SimWorkers:
    """`count` simulated replicas of each stage on one connection: a stage's replicas are `count`
    slots of a pool, and up to PULLERS_PER_STAGE waiting pulls (one message each) take a request
    whenever a slot is free, so the stage's durable consumer sees what `count` competing replicas
    would show it (a request is taken only when a replica is free; its queue wait runs until then)
    without `count` subscriptions. Why: with one pull subscription per replica, 500 replicas
    re-sent 500 pull requests a second while idle (1 s fetch timeouts) and each its own inbox; py-spy
    on that driver at 500 workers / 300 jobs, 114 requests/s: 52 % of a core, a quarter of it in
    socket writes of pull requests, 13 % in fetch timeouts (`fleet_sim.py`'s README figures)."""

    def __init__(self, nc, counts: dict[str, int], outputs: dict[str, list[str]], scale: float,
                 minutes: dict[str, float]):
        self.nc, self.js = nc, nc.jetstream()
        self.counts, self.outputs, self.scale = counts, outputs, scale
        self.minutes = minutes  # job id -> film minutes (the driver's, same process)
        self.executed: Counter[str] = Counter()
        self.waits: dict[str, list[float]] = defaultdict(list)
        self.busy: dict[str, int] = Counter()  # replicas of a stage working now
        self.peak: dict[str, int] = Counter()
        self.tasks: list[asyncio.Task] = []
        self.running: set[asyncio.Task] = set()
        self.stop = asyncio.Event()

    async def start(self) -> None:
        for stage, count in self.counts.items():
            durable = await through_failover(
                lambda stage=stage: ensure_stage_consumer(self.js, stage, StagePolicy(ack_wait=10.0, max_deliver=20)),
                "stage consumer")
            slots = asyncio.Semaphore(count)
            for _ in range(min(count, PULLERS_PER_STAGE)):
                sub = await self.js.pull_subscribe_bind(durable=durable, stream=subjects.REQUESTS_STREAM)
                self.tasks.append(asyncio.create_task(self._pull(stage, sub, slots)))
            if stage == "asr":
                await self._answer_stats(stage, count)

    async def stopped(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, *self.running, return_exceptions=True)

    async def _answer_stats(self, stage: str, count: int) -> None:
        replies = [json.dumps({"id": f"sim-{stage}-{i}", "endpoints": [{"data": {"state": "ready"}}]}).encode()
                   for i in range(count)]

        async def on_stats(msg) -> None:
            for reply in replies:
                await self.nc.publish(msg.reply, reply)

        await self.nc.subscribe(f"$SRV.STATS.{subjects.micro_service_name(stage)}", cb=on_stats)
        await self.nc.subscribe(f"$SRV.PING.{subjects.micro_service_name(stage)}", cb=on_stats)

    async def _pull(self, stage: str, sub, slots: asyncio.Semaphore) -> None:
        """Take one request whenever one of the stage's replicas is free."""
        while not self.stop.is_set():
            await slots.acquire()
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except Exception as e:
                slots.release()
                if not isinstance(e, asyncio.TimeoutError):
                    await asyncio.sleep(0.05)
                continue
            # fetch also returns what an earlier timed-out pull left in the inbox: each its replica
            for extra in msgs[1:]:
                await slots.acquire()
            for msg in msgs:
                task = asyncio.create_task(self._replica(stage, msg, slots))
                self.running.add(task)
                task.add_done_callback(self.running.discard)

    async def _replica(self, stage: str, msg, slots: asyncio.Semaphore) -> None:
        self.busy[stage] += 1
        self.peak[stage] = max(self.peak[stage], self.busy[stage])
        try:
            with contextlib.suppress(Exception):  # an ack lost in a failover: redelivered
                await self._handle(stage, msg)
        finally:
            self.busy[stage] -= 1
            slots.release()

    async def _handle(self, stage: str, msg) -> None:
        taken = time.time()
        request = StageRequest.model_validate_json(msg.data)
        stored = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else taken
        minutes = self.minutes.get(request.job_id, 1.0)
        chunks = chunks_of(minutes)
        await asyncio.sleep(stage_seconds(stage, minutes, chunks) * self.scale)
        self.executed[request.key] += 1
        self.waits[stage].append(max(0.0, taken - stored))
        outputs = {name: fake_ref(f"{name}.json", f"{request.key}.{name}") for name in self.outputs[stage]}
        items = {"chunks": chunks} if stage == "chunk" else {}
        event = StageCompleted(job_id=request.job_id, stage=stage, node=request.node, attempt=request.attempt,
                               token=request.token, outputs=outputs, items=items,
                               metrics={"queue_s": max(0.0, taken - stored), "delivery": float(msg.metadata.num_delivered)})
        await through_failover(lambda: publish_event(self.js, event, f"{request.key}.completed"), "result")
        await msg.ack_sync()


PULLERS_PER_STAGE = 8  # waiting pulls per stage: requests taken in parallel when many replicas are free


# ----------------------------------------------------------------------------- coordinators

def load_graphs(which: str) -> dict:
    """`chunked` (config/workflows/chunked.yaml) or `hops:K` (K noop nodes in a row)."""
    if which.startswith("hops:"):
        from benchmarks.stage_hops import hops_workflow

        return {"hops": hops_workflow(int(which.split(":", 1)[1]))}
    from captionbus.coordinator.graph import load_workflow

    return {which: load_workflow(PROJECT_ROOT / "config" / "workflows" / f"{which}.yaml")}


async def coordinator_main(url: str, graphs: str) -> None:
    """One coordinator process until SIGTERM (SIGKILL is the fault)."""
    from captionbus.coordinator.decide import Policy
    from captionbus.coordinator.service import Coordinator

    nc = await connect(url, f"fleet-coordinator-{os.getpid()}")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    coordinator = Coordinator(nc, graphs=load_graphs(graphs), policy=Policy(result_secret=SECRET), unserved_s=None)
    await coordinator.start()
    print("ready", flush=True)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(coordinator.wait_failed())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    await coordinator.stop()
    if os.environ.get("FLEET_STATS"):  # messages this coordinator sent and received, to its log
        print(f"connection stats {json.dumps(dict(nc.stats))}", file=sys.stderr, flush=True)
    await nc.close()


def export_tree(rev: str, into: Path) -> Path:
    """The packages a coordinator imports, as they are at git revision `rev`, under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(PROJECT_ROOT), "archive", rev, "captionbus", "config", "benchmarks"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CoordinatorProcess:
    def __init__(self, url: str, graphs: str, home: Path, index: int, tree: Path | None = None):
        home.mkdir(parents=True, exist_ok=True)
        tree = tree or PROJECT_ROOT
        env = {**os.environ, "NATS_URL": url, "CAPTIONBUS_HOME": str(home), "PYTHONPATH": str(tree),
               "FLEET_TREE": str(tree), "CAPTIONBUS_LOG_LEVEL": os.environ.get("FLEET_LOG_LEVEL", "WARNING")}
        self.log = home / "coordinator.log"
        self.index = index
        self.cpu_at_death: float | None = None
        self.process = subprocess.Popen(
            [sys.executable, str(tree / "benchmarks" / "fleet_sim.py"), "_coordinator", url, graphs],
            stdout=subprocess.PIPE, stderr=open(self.log, "ab"), env=env, start_new_session=True,
            preexec_fn=_die_with_parent)  # a driver that crashes leaves no coordinator behind

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline()  # blocks until "ready" or exit
        if not line.startswith(b"ready") or time.monotonic() > deadline:
            raise RuntimeError(f"coordinator {self.index} did not start: {self.log.read_text()[-2000:]}")

    def cpu_s(self) -> float:
        if self.cpu_at_death is not None:
            return self.cpu_at_death
        return cpu_of(self.process.pid)

    def kill(self) -> None:
        self.cpu_at_death = self.cpu_s()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.cpu_at_death = self.cpu_s()
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(20)
            if self.process.poll() is None:  # stuck in its stop: the fault it was not meant to have
                self.process.kill()
                self.process.wait()


# ----------------------------------------------------------------------------- the bus

class Bus:
    """A 3-node cluster (R3) or one embedded server (R1), for the length of a `with`."""

    def __init__(self, root: Path, single: bool):
        self.root, self.single = root, single
        self.cluster = self.server = None

    def __enter__(self) -> "Bus":
        if self.single:
            from captionbus.server import EmbeddedServer

            self.server = EmbeddedServer(self.root / "nats")
            self.server.start()
            self.url = self.server.url
        else:
            from benchmarks.chaos import Cluster

            self.cluster = Cluster(self.root)
            self.cluster.start()
            self.url = self.cluster.url()
        os.environ["CAPTIONBUS_REPLICAS"] = "1" if self.single else "3"
        return self

    def describe(self) -> str:
        return "1 nats-server (R1)" if self.single else "3-node JetStream cluster (R3, sync_interval always)"

    def servers_cpu_s(self) -> float:
        """CPU seconds the nats-server processes have used (a restarted node counts from its start)."""
        processes = [self.server.process] if self.single else [n.process for n in self.cluster.nodes]
        return sum(cpu_of(p.pid) for p in processes if p is not None and p.poll() is None)

    def __exit__(self, *exc) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self.server is not None:
            self.server.stop()

    async def provisioned(self, name: str):
        nc = await connect(self.url, name, Settings(home=self.root / "driver"))
        js = nc.jetstream()
        deadline = time.monotonic() + 90
        while True:  # a fresh cluster may still be electing its meta leader
            try:
                await provision(js, replicas=1 if self.single else 3)
                return nc, js
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def kill_leader_of(self, js, stream: str) -> str | None:
        """SIGKILL of the node leading `stream` (on one server, of that server); it comes back 5 s
        later (as systemd would) on its own store."""
        if self.cluster is None:  # the one server: killed, and started again on its store and port
            node, name = self.server, "the nats-server"
        else:
            from benchmarks.chaos import stream_leader

            node = self.cluster.by_name(await stream_leader(js, stream))
            if node is None:
                return None
            name = node.name
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(10)

        async def restart() -> None:
            await asyncio.sleep(5)
            await asyncio.get_running_loop().run_in_executor(None, node.start)

        asyncio.get_running_loop().create_task(restart())
        return name


async def sizes(js) -> dict[str, tuple[int, int]]:
    out = {}
    for stream in (subjects.EVENTS_STREAM, subjects.REQUESTS_STREAM, f"KV_{subjects.JOBS_BUCKET}"):
        info = await through_failover(lambda stream=stream: js.stream_info(stream), "stream info")
        out[stream] = (info.state.messages, info.state.bytes)
    return out


async def terminal_events(js) -> Counter[str]:
    """job id -> terminal events stored (completed, failed, cancelled), replayed from the stream."""
    counts: Counter[str] = Counter()
    sub = await js.pull_subscribe(
        "", stream=subjects.EVENTS_STREAM,
        config=ConsumerConfig(
            filter_subjects=[s for k in ("completed", "failed", "cancelled") for s in subjects.job_kind_all_jobs(k)],
            ack_policy="none", inactive_threshold=60.0))
    while True:
        try:
            msgs = await sub.fetch(500, timeout=2.0)
        except Exception:
            break
        for msg in msgs:
            counts[subjects.event_job_id(msg.subject)] += 1
    await sub.unsubscribe()
    return counts


# ----------------------------------------------------------------------------- jobs

class Jobs:
    """Submits jobs and notes when each one's terminal event arrives."""

    def __init__(self, nc, js, workflow: str):
        self.nc, self.js, self.workflow = nc, js, workflow
        self.submitted: dict[str, float] = {}
        self.minutes: dict[str, float] = {}
        self.finished: dict[str, tuple[str, float]] = {}
        self.waiters: dict[str, asyncio.Future] = {}

    async def start(self) -> None:
        async def on_terminal(msg) -> None:
            job_id, kind = subjects.event_job_id(msg.subject), subjects.event_kind(msg.subject)
            if job_id in self.submitted and job_id not in self.finished:
                self.finished[job_id] = (kind, time.perf_counter())
                future = self.waiters.pop(job_id, None)
                if future is not None and not future.done():
                    future.set_result(kind)

        for kind in ("completed", "failed", "cancelled"):
            for subject in subjects.job_kind_all_jobs(kind):
                await self.nc.subscribe(subject, cb=on_terminal)

    async def submit(self, minutes: float = 1.0, arrived: float | None = None) -> str:
        """`arrived`: when the job arrived (perf_counter), if it was held before its submission:
        its latency counts from then."""
        spec = JobSpec(job_id=new_job_id(), workflow=self.workflow, input=fake_ref("film.mp4", str(random.random())),
                       source_language="en")
        self.minutes[spec.job_id] = minutes
        self.submitted[spec.job_id] = arrived if arrived is not None else time.perf_counter()
        self.waiters[spec.job_id] = asyncio.get_running_loop().create_future()
        event = JobSubmitted(job_id=spec.job_id, spec=spec)
        await through_failover(lambda: publish_event(self.js, event), "submit")
        return spec.job_id

    async def run_one(self, minutes: float = 1.0, timeout: float = 60) -> float:
        job_id = await self.submit(minutes)
        kind = await asyncio.wait_for(self.waiters[job_id], timeout)
        if kind != "completed":
            raise RuntimeError(f"job {job_id} {kind}")
        return self.finished[job_id][1] - self.submitted[job_id]


# ----------------------------------------------------------------------------- the fleet run

async def progress(jobs: Jobs, workers: SimWorkers, coordinators: list, started: float, every_s: float) -> None:
    """A line every `every_s`: the curve of a long run (requests/s and coordinator CPU against the
    jobs in flight), and a sign of life."""
    last = (time.perf_counter(), 0, sum(c.cpu_s() for c in coordinators))
    while True:
        await asyncio.sleep(every_s)
        now, done, cpu = time.perf_counter(), sum(workers.executed.values()), sum(c.cpu_s() for c in coordinators)
        span = now - last[0]
        print(f"  {now - started:7.0f} s  submitted {len(jobs.submitted):6}  terminal {len(jobs.finished):6}  "
              f"in flight {len(jobs.submitted) - len(jobs.finished):5}  requests/s {(done - last[1]) / span:6.1f}  "
              f"coordinator CPU {(cpu - last[2]) / span * 100:4.0f} %  load {os.getloadavg()[0]:5.1f}", flush=True)
        last = (now, done, cpu)


def split_workers(total: int, graphs: dict) -> dict[str, int]:
    """Most workers on asr (the stage whose work dominates), the rest spread over the others."""
    stages = sorted(stage_outputs(graphs))
    others = [s for s in stages if s != "asr"]
    each = max(1, total // 20)
    counts = {s: each for s in others}
    if "asr" in stages:
        counts["asr"] = max(1, total - each * len(others))
    return counts


async def fleet(args, bus: Bus) -> None:
    graphs = load_graphs("chunked")
    nc, js = await bus.provisioned("fleet-driver")
    coordinators = [CoordinatorProcess(bus.url, "chunked", bus.root / f"coord{i}", i) for i in range(args.coordinators)]
    for c in coordinators:
        c.wait_ready()
    jobs = Jobs(nc, js, "chunked")
    await jobs.start()
    counts = split_workers(args.workers, graphs)
    workers = SimWorkers(nc, counts, stage_outputs(graphs), args.scale, jobs.minutes)
    await workers.start()
    rng = random.Random(args.seed)
    lengths, weights = zip(*MIXES[args.mix])
    span = min(args.jobs / args.rate, args.submit_for or math.inf)  # the faults fall at 40 % and 60 % of it
    faults: list[str] = []
    started = time.perf_counter()

    async def faults_mid_run() -> None:
        if args.no_kill:
            return
        await asyncio.sleep(span * 0.4)
        victim = coordinators[0]
        victim.kill()
        faults.append(f"{time.perf_counter() - started:6.1f} s  kill -9 coordinator 0 (pid {victim.process.pid})")
        if len(coordinators) == 1:  # the one coordinator: a supervisor starts another
            await asyncio.sleep(2)
            replacement = CoordinatorProcess(bus.url, "chunked", bus.root / "coord-r", len(coordinators))
            await asyncio.get_running_loop().run_in_executor(None, replacement.wait_ready)
            coordinators.append(replacement)
            faults.append(f"{time.perf_counter() - started:6.1f} s  replacement coordinator started")
        await asyncio.sleep(span * 0.2)
        node = await bus.kill_leader_of(js, f"KV_{subjects.JOBS_BUCKET}")
        if node:
            what = "" if bus.single else " (led the job KV)"
            faults.append(f"{time.perf_counter() - started:6.1f} s  kill -9 {node}{what}, back 5 s later")

    fault_task = asyncio.create_task(faults_mid_run())
    progress_task = asyncio.create_task(progress(jobs, workers, coordinators, started, args.progress_s))
    own0 = time.process_time()
    held: list[float] = []  # seconds each job waited at the door (--max-in-flight)
    for i in range(args.jobs):
        target = started + i / args.rate
        if (delay := target - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        while args.max_in_flight and len(jobs.submitted) - len(jobs.finished) >= args.max_in_flight:
            await asyncio.sleep(0.05)
        if args.submit_for and time.perf_counter() - started > args.submit_for:
            break  # the door closes: jobs still held (or not yet arrived) are not submitted
        held.append(max(0.0, time.perf_counter() - target))
        await jobs.submit(rng.choices(lengths, weights)[0], arrived=min(target, time.perf_counter()))
    submitted_s = time.perf_counter() - started
    deadline = time.monotonic() + args.timeout
    while len(jobs.finished) < len(jobs.submitted) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    wall = time.perf_counter() - started
    await fault_task
    progress_task.cancel()
    cpu = sum(c.cpu_s() for c in coordinators)
    own = time.process_time() - own0
    await workers.stopped()

    # the checks, from the bus itself
    states = {}
    kv = await js.key_value(subjects.JOBS_BUCKET)
    for job_id in jobs.submitted:
        entry = await through_failover(lambda job_id=job_id: kv.get(job_id), "state")
        states[job_id] = json.loads(entry.value)["status"]
    terminal = await terminal_events(js)
    stored = await sizes(js)
    for c in coordinators:
        c.stop()
    await nc.close()

    done = Counter(states.values())
    hops = sum(workers.executed.values())
    twice = sum(1 for n in workers.executed.values() if n > 1)
    print(f"\nfleet: {bus.describe()}, {args.coordinators} coordinator(s), {sum(counts.values())} simulated workers "
          f"({', '.join(f'{s} {n}' for s, n in sorted(counts.items()))}), {args.jobs} jobs at {args.rate}/s, "
          f"durations x{args.scale}, mix {args.mix}, seed {args.seed}")
    for line in faults:
        print(f"  fault {line}")
    print(f"submitted in {submitted_s:.1f} s; all terminal after {wall:.1f} s")
    if len(jobs.submitted) < args.jobs:
        print(f"--submit-for {args.submit_for:g}: {len(jobs.submitted)} of the {args.jobs} jobs submitted before the door closed")
    if args.max_in_flight:
        print(f"--max-in-flight {args.max_in_flight}: held at the door p50 {pct(held, 0.5):.2f} s  p99 {pct(held, 0.99):.2f} s  "
              f"max {max(held, default=0):.2f} s (in the job latency); {sum(1 for h in held if h > 1)} jobs held over 1 s")
    print(f"jobs/hour {len(jobs.finished) / wall * 3600:,.0f}   stage requests executed {hops} "
          f"({hops / wall:.0f}/s)   film minutes {sum(jobs.minutes.values()):,.0f}")
    latency = [jobs.finished[j][1] - jobs.submitted[j] for j in jobs.finished]
    print(f"job latency p50 {pct(latency, 0.5):.2f} s  p99 {pct(latency, 0.99):.2f} s")
    print(f"{'queue wait':16}{'p50 ms':>10}{'p99 ms':>10}{'requests':>10}")
    for stage in sorted(workers.waits):
        waits = workers.waits[stage]
        print(f"{stage:16}{pct(waits, 0.5) * 1e3:10.1f}{pct(waits, 0.99) * 1e3:10.1f}{len(waits):10}")
    print(f"coordinator CPU {cpu:.1f} s: {cpu / max(1, len(jobs.submitted)) * 1e3:.1f} ms per job, "
          f"{cpu / max(1, hops) * 1e3:.2f} ms per stage request ({cpu / wall * 100:.0f} % of a core over the run); "
          f"the simulated workers and driver {own:.1f} s ({own / wall * 100:.0f} %)")
    print("replicas busy at once, at most: " + ", ".join(
        f"{stage} {workers.peak[stage]} of {n}" for stage, n in sorted(counts.items()) if workers.peak[stage]))
    for stream, (messages, size) in stored.items():
        print(f"{stream:16} {messages:>9,} messages {size / 1e6:9.1f} MB")
    missing = [j for j in jobs.submitted if terminal[j] == 0]
    repeated = [j for j in jobs.submitted if terminal[j] > 1]
    print(f"states: {dict(done)}; terminal events: {len(jobs.submitted) - len(missing)} of {len(jobs.submitted)} "
          f"jobs, {len(repeated)} with more than one; requests executed twice: {twice}")
    ok = not missing and not repeated and set(done) <= {"completed"}
    print(json.dumps({"jobs": len(jobs.submitted), "coordinators": args.coordinators, "workers": sum(counts.values()),
                      "jobs_per_hour": round(len(jobs.finished) / wall * 3600), "requests_per_s": round(hops / wall, 1),
                      "coordinator_cpu_ms_per_job": round(cpu / max(1, len(jobs.submitted)) * 1e3, 2),
                      "lost": len(missing), "duplicated_terminal": len(repeated), "executed_twice": twice,
                      "all_completed": ok}))
    if not ok:
        raise SystemExit(1)


# ----------------------------------------------------------------------------- hops through the coordinator

async def use_consumers(js, memory: bool) -> None:
    """(Re)create the coordinators' events consumer and the noop stage's consumer, with their state
    in memory (`mem_storage`, still replicated: an experiment, not what captionbus creates) or in
    files (what it creates). Between turns, no coordinator running; the simulated workers' waiting
    pulls expire within their 1 s and pull again from the new consumer. Why: on the cluster with
    `sync_interval: always` a file-backed replicated consumer handed a message out 1.5-2.3 ms after
    its publish was acked, one in memory (or R1) at the ack. What memory costs: a consumer whose
    every node restarts at once starts again from its deliver policy (for the events consumer of
    CB_EVENTS, DeliverPolicy.ALL: every stored event replayed to the coordinators). Since job
    ownership the coordinators' consumers are the partition consumers on CB_EVENTS (file-backed,
    as captionbus makes them); the plain turns recreate them so (a coordinator binds an existing
    consumer of either storage as it is)."""
    # Here, not at the top: a coordinator of `--baseline REV` runs this file with REV's package.
    from captionbus.coordinator.service import partition_consumer_config

    noop = subjects.stage_consumer("noop")
    partitions = range(subjects.PARTITIONS)
    for stream, durable in ((subjects.REQUESTS_STREAM, noop),
                            *((subjects.EVENTS_STREAM, subjects.partition_consumer(p)) for p in partitions)):
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, durable)
    for p in partitions:
        await js.add_consumer(subjects.EVENTS_STREAM, replace(partition_consumer_config(p), mem_storage=memory or None))
    await js.add_consumer(subjects.REQUESTS_STREAM, ConsumerConfig(
        durable_name=noop, filter_subject=subjects.stage_request("noop"), ack_policy="explicit",
        deliver_policy="all", ack_wait=10.0, max_deliver=20, mem_storage=memory or None))
    await asyncio.sleep(1.5)


async def floors(nc, js, n: int = 300) -> tuple[float, float]:
    """p50 seconds of a core request/reply (echo on this connection) and of a JetStream publish
    (ack) into the events stream, on the bus as it is now: what a hop is compared with."""
    async def echo(msg) -> None:
        await msg.respond(msg.data)

    sub = await nc.subscribe("bench.echo", cb=echo)
    rr, pub = [], []
    for _ in range(n):
        t = time.perf_counter()
        await nc.request("bench.echo", b"x" * 200, timeout=2)
        rr.append(time.perf_counter() - t)
    for _ in range(n):  # stage_progress: no coordinator consumes it
        t = time.perf_counter()
        await js.publish(subjects.job_event("jbench-0", "stage_progress"), b"x" * 200)
        pub.append(time.perf_counter() - t)
    await sub.unsubscribe()
    return pct(rr, 0.5), pct(pub, 0.5)


async def fresh_queues(js) -> None:
    """Before a turn: what the other code's turn left for the coordinators is dropped, so a turn
    starts on an empty queue. Coordinators before job ownership take their events from the durable
    `coordinator` on CB_EVENTS (old subject layout: it falls behind by nothing of a turn of newer
    ones, whose events it does not match, but is made again delivering only new events, in case);
    the partition consumers of newer ones match only the newer layout, so a turn of older code
    leaves them nothing either (an older coordinator binds `coordinator` as it is)."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(subjects.EVENTS_STREAM, subjects.COORDINATOR_CONSUMER)
    await js.add_consumer(subjects.EVENTS_STREAM, ConsumerConfig(
        durable_name=subjects.COORDINATOR_CONSUMER, filter_subjects=subjects.legacy_coordinator_filters(),
        ack_policy="explicit", deliver_policy="new", ack_wait=30.0, max_ack_pending=1024))


@contextlib.contextmanager
def events_layout(tree: Path | None):
    """While coordinators of `tree` run: this process (the driver and the simulated workers)
    publishes job events in the subject layout that code reads. A tree before job ownership
    (no `subjects.partition_filters`) reads `captionbus.job.<job>.<kind>`; this tree, the
    partitioned `captionbus.job.<tenant>.<partition>.<job>.<kind>`."""
    legacy = tree is not None and "def partition_filters" not in \
        (tree / "captionbus" / "contracts" / "subjects.py").read_text()
    own = subjects.job_event
    if legacy:
        subjects.job_event = subjects.legacy_job_event
    try:
        yield
    finally:
        subjects.job_event = own


async def leases_balanced(js, coordinators: int, timeout: float = 60.0) -> bool:
    """Wait until every partition's lease is held and `coordinators` coordinators hold their share
    each (captionbus/coordinator/leases.py: a coordinator that joins takes partitions over a few
    lease rounds); False at once for code before job ownership (no lease was ever taken)."""
    from captionbus.coordinator.leases import share

    kv = await js.key_value(subjects.COORDINATORS_BUCKET)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = {}
        for p in range(subjects.PARTITIONS):
            with contextlib.suppress(Exception):
                held[p] = (await kv.get(subjects.partition_lease_key(p))).value
        counts = Counter(held.values())
        if not held:
            return False
        if len(held) == subjects.PARTITIONS and len(counts) == coordinators and \
                max(counts.values()) <= share(subjects.PARTITIONS, coordinators):
            return True
        await asyncio.sleep(0.2)
    raise RuntimeError(f"leases did not balance over {coordinators} coordinators in {timeout:g} s")


HOP_COLUMNS = ("code", "coord", "load", "hop p50", "p99", "hops/s", "x rr", "x js", "CPU ms/hop: coord", "servers",
               "workers", ">15 s")


async def hop_bench(args, bus: Bus) -> None:
    """Per hop p50/p99 (one job of `--hop-count` noop nodes at a time) and hops/s (`--concurrency`
    jobs in flight), with 1 and then 3 coordinators on the same bus, side by side; with
    `--baseline REV`, REV's coordinators and this tree's take turns `--repeat` times (the load of a
    shared machine drifts over minutes; every other turn in the reverse order), each turn next to
    the floors measured just before it."""
    graph = f"hops:{args.hop_count}"
    graphs = load_graphs(graph)
    nc, js = await bus.provisioned("hop-driver")
    jobs = Jobs(nc, js, "hops")
    await jobs.start()
    workers = SimWorkers(nc, {"noop": args.workers}, stage_outputs(graphs), 0.0, jobs.minutes)
    await workers.start()
    rows = []
    trees: list[tuple[str, Path | None, bool]] = [("this tree", None, False)]
    if args.baseline:
        # the baseline's fleet_sim.py is this one: its coordinator entry point may not exist there
        base = export_tree(args.baseline, bus.root / "baseline")
        (base / "benchmarks" / "fleet_sim.py").write_text(Path(__file__).read_text())
        trees.insert(0, (args.baseline, base, False))
    if args.memory_consumers:
        trees.append(("mem cons.", None, True))
    for turn in range(max(1, args.repeat)):
        # A, B, then B, A: the load of a shared machine drifts, and the code measured first in a turn
        # had the edge in every run here (the same code measured twice came out 5-35 % apart).
        for label, tree, memory in (trees if turn % 2 == 0 else trees[::-1]):
            await fresh_queues(js)
            if args.memory_consumers:
                await use_consumers(js, memory)
            with events_layout(tree):
                rows += await hop_rows(args, bus, jobs, graph, label, tree, await floors(nc, js))
    await workers.stopped()
    await nc.close()
    print(f"\nhops through the coordinator: {bus.describe()}, {args.workers} simulated noop workers (0 s), "
          f"jobs of {args.hop_count} hops; p50/p99 per hop over {args.chains} jobs one at a time, hops/s with "
          f"{args.concurrency} jobs in flight x {args.rounds} rounds; {os.cpu_count()} cores; load = 1-min "
          f"load average when the row started; x rr, x js = hop p50 / the p50 of a core request/reply, of a "
          f"JetStream publish+ack, measured on the bus just before; CPU per hop of the coordinators, the "
          f"nats-servers and the simulated workers + driver; a job not finished in {HOP_JOB_TIMEOUT_S:g} s is "
          f"counted and not waited for")
    print("".join(f"{c:>{w}}" for c, w in zip(HOP_COLUMNS, (11, 6, 6, 9, 8, 8, 6, 6, 19, 8, 8, 6))))
    for r in rows:
        print(f"{r['code']:>11}{r['coordinators']:>6}{r['load']:6.1f}{r['hop_p50_ms']:9.2f}{r['hop_p99_ms']:8.2f}"
              f"{r['hops_per_s']:8.0f}{r['x_rr']:6.1f}{r['x_js']:6.1f}{r['cpu_ms_per_hop']:19.2f}"
              f"{r['servers_cpu_ms_per_hop']:8.2f}{r['workers_cpu_ms_per_hop']:8.2f}{r['jobs_over_timeout']:6}")
    print("floors (p50 ms, before each turn): " + ", ".join(
        f"{r['code']}: rr {r['rr_p50_ms']:.2f} js {r['js_pub_p50_ms']:.2f}" for r in rows if r["coordinators"] == rows[0]["coordinators"]))
    if args.repeat > 1:
        print("median over the turns:")
        for label, *_ in trees:
            for n in args.hop_coordinators:
                mine = [r for r in rows if r["code"] == label and r["coordinators"] == n]
                print(f"{label:>11}{n:>6}  hop p50 {median(r['hop_p50_ms'] for r in mine):7.2f} ms "
                      f"(x rr {median(r['x_rr'] for r in mine):.1f}, x js {median(r['x_js'] for r in mine):.1f})  "
                      f"hops/s {median(r['hops_per_s'] for r in mine):5.0f}")
    print(json.dumps({"bus": bus.describe(), "rows": rows}))


def median(values) -> float:
    return statistics.median(values)


async def hop_rows(args, bus: Bus, jobs: Jobs, graph: str, label: str, tree: Path | None,
                   floor: tuple[float, float]) -> list[dict]:
    """One row per count in --hop-coordinators, adding coordinators of `tree`'s code as it goes;
    they are stopped at the end."""
    coordinators: list[CoordinatorProcess] = []
    rows = []
    rr, js_pub = floor
    for n in args.hop_coordinators:
        while len(coordinators) < n:
            c = CoordinatorProcess(bus.url, graph, bus.root / f"hop-{label}-{len(coordinators)}",
                                   len(coordinators), tree)
            c.wait_ready()
            coordinators.append(c)
        if tree is None:  # this tree's coordinators: measured once they hold their shares
            await leases_balanced(jobs.js, n)
        lost = 0

        async def one() -> float | None:
            """Seconds of one job; None (counted) when it has not finished in HOP_JOB_TIMEOUT_S."""
            nonlocal lost
            try:
                return await jobs.run_one(timeout=HOP_JOB_TIMEOUT_S)
            except asyncio.TimeoutError:
                lost += 1
                return None

        for _ in range(3):
            await one()  # warm-up
        load = os.getloadavg()[0]
        per_hop = [t / args.hop_count for t in [await one() for _ in range(args.chains)] if t is not None]
        cpu0, servers0, own0 = sum(c.cpu_s() for c in coordinators), bus.servers_cpu_s(), time.process_time()
        started = time.perf_counter()
        total = 0
        for _ in range(max(1, args.rounds)):
            done = await asyncio.gather(*(one() for _ in range(args.concurrency)))
            total += sum(args.hop_count for t in done if t is not None)
        wall = time.perf_counter() - started
        hops = max(1, total)
        p50 = pct(per_hop, 0.5)
        rows.append({"code": label, "coordinators": n, "load": round(load, 1), "hop_p50_ms": round(p50 * 1e3, 2),
                     "hop_p99_ms": round(pct(per_hop, 0.99) * 1e3, 2), "hops_per_s": round(total / wall, 1),
                     "x_rr": round(p50 / rr, 1), "x_js": round(p50 / js_pub, 1),
                     "rr_p50_ms": round(rr * 1e3, 3), "js_pub_p50_ms": round(js_pub * 1e3, 3),
                     "cpu_ms_per_hop": round((sum(c.cpu_s() for c in coordinators) - cpu0) / hops * 1e3, 2),
                     "servers_cpu_ms_per_hop": round((bus.servers_cpu_s() - servers0) / hops * 1e3, 2),
                     "workers_cpu_ms_per_hop": round((time.process_time() - own0) / hops * 1e3, 2),
                     "jobs_over_timeout": lost})
    for c in coordinators:
        c.stop()
    return rows


HOP_JOB_TIMEOUT_S = 15.0  # a hop job not finished by then is counted, and not waited for


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_coordinator":
        configure_logging(os.environ.get("CAPTIONBUS_LOG_LEVEL", "WARNING"))
        if os.environ.get("FLEET_PROFILE"):  # where one coordinator spends its CPU (cProfile stats file)
            import cProfile

            cProfile.run("asyncio.run(coordinator_main(sys.argv[2], sys.argv[3]))", f"{os.environ['FLEET_PROFILE']}.{os.getpid()}")
        else:
            asyncio.run(coordinator_main(sys.argv[2], sys.argv[3]))
        return
    run(build_parser().parse_args())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinators", type=int, default=2)
    parser.add_argument("--workers", type=int, default=60, help="simulated workers in all (most on asr)")
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--rate", type=float, default=2.0, help="jobs submitted per second")
    parser.add_argument("--scale", type=float, default=0.02, help="multiplies every simulated duration")
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--mix", choices=sorted(MIXES), default="clips", help="film lengths of the jobs (MIXES)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the last job")
    parser.add_argument("--no-kill", action="store_true", help="no coordinator or node killed")
    parser.add_argument("--max-in-flight", type=int, default=0,
                        help="jobs arriving while this many are in flight wait at the door (0: none held)")
    parser.add_argument("--submit-for", type=float, default=0.0,
                        help="seconds the door is open: jobs not submitted by then (held or not yet arrived) never are (0: all --jobs)")
    parser.add_argument("--progress-s", type=float, default=60.0, help="seconds between progress lines")
    parser.add_argument("--single-node", action="store_true", help="one nats-server instead of a 3-node cluster")
    parser.add_argument("--hops", action="store_true", help="the hop benchmark instead of the fleet")
    parser.add_argument("--hop-count", type=int, default=5)
    parser.add_argument("--hop-coordinators", type=lambda s: [int(n) for n in s.split(",")], default=[1, 3])
    parser.add_argument("--chains", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the servers' and coordinators' dirs and logs")
    parser.add_argument("--baseline", metavar="REV", help="--hops: also run coordinators of git revision REV, first")
    parser.add_argument("--repeat", type=int, default=1, help="--hops: turns of each code (REV, this tree, REV, ...)")
    parser.add_argument("--memory-consumers", action="store_true",
                        help="--hops: also turns of this tree with the partition and noop consumers' state in memory "
                             "(the plain turns: both file-backed)")
    return parser


def run(args: argparse.Namespace) -> None:
    """The fleet (or with `args.hops` the hop benchmark) on a bus of its own."""
    configure_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="cb-fleet-") as tmp:
        root = Path(tempfile.mkdtemp(prefix="cb-fleet-")) if args.keep else Path(tmp)
        with Bus(root, args.single_node) as bus:
            asyncio.run(hop_bench(args, bus) if args.hops else fleet(args, bus))


if __name__ == "__main__":
    main()
