"""Stage hop latency and hops/s through the real runtime with no-op stages, next to raw NATS.

    python benchmarks/stage_hops.py [--services 2] [--hops 5] [--chains 20] [--concurrency 8]
                                    [--in-process] [--object-store]

A hop = publish a StageRequest -> a noop service fetches it, checks job state, fetches its input
artifact, runs the handler in a thread, stores the output, publishes StageCompleted, acks ->
the driver sees the completion and publishes the next hop with that output as input (what the
coordinator does between stages, minus its KV write).

  latency     one chain at a time, `--chains` chains of `--hops` hops: per-hop p50 / p95
  throughput  `--concurrency` chains in flight across `--services` replicas: hops/s
  coordinator the same chain as a workflow graph run by the real coordinator (in-process):
              job submitted -> K noop nodes -> job completed; per hop = job time / K. Adds the
              coordinator's event consumer and its revision-checked KV write per step.
  raw NATS    core request/reply round trip, and a JetStream publish (ack) round trip, for scale

Services are `python -m captionbus.services serve noop` subprocesses (default; what production runs) or
asyncio tasks in this process (`--in-process`). Starts its own nats-server in a temp dir.

    python benchmarks/stage_hops.py --coordinators [--cluster] [--baseline REV] [--repeat N]

instead measures hops through 1 and then 3 coordinator *processes* (issue 22's goal: p50 <= 3 ms,
>= 1000 hops/s with 3 coordinators on a 3-node cluster), with simulated noop workers that are
never the bottleneck (60 of them; the real runtime's noop service is measured above), on one
nats-server or (`--cluster`) a 3-node JetStream cluster at R3 with `sync_interval: always` as in
deploy/. Each row: hop p50/p99, hops/s with 32 jobs in flight, the ratios of the hop p50 to a core
request/reply and to a JetStream publish+ack measured on the same bus just before, the 1-minute
load average, and CPU per hop of the coordinators, the nats-servers and the workers + driver.
`--baseline REV` runs REV's coordinators and this tree's in turns (`--repeat` turns each), so a
before/after comparison shares the machine's load. It is `benchmarks/fleet_sim.py --hops`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import fleet_sim  # noqa: E402
from captionbus.server import EmbeddedServer  # noqa: E402
from captionbus.contracts import StageRequest, parse_event, subjects  # noqa: E402
from captionbus.core.artifacts import ArtifactStore  # noqa: E402
from captionbus.core.bus import StagePolicy, connect, provision  # noqa: E402
from captionbus.core.logging import configure_logging  # noqa: E402
from captionbus.core.settings import PROJECT_ROOT, Settings  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Driver:
    """Publishes hops and wakes whoever waits for each completion."""

    def __init__(self, js, nc):
        self.js, self.nc = js, nc
        self.waiting: dict[str, asyncio.Future] = {}

    async def start(self) -> None:
        for subject in subjects.job_kind_all_jobs("stage_completed"):
            await self.nc.subscribe(subject, cb=self._on_completed)

    async def _on_completed(self, msg) -> None:
        event = parse_event(msg.data)
        future = self.waiting.pop(f"{event.job_id}.{event.node}", None)
        if future is not None and not future.done():
            future.set_result(event)

    async def hop(self, job_id: str, node: str, inputs: dict) -> tuple[float, dict]:
        request = StageRequest(job_id=job_id, stage="noop", node=node, attempt=1, inputs=inputs)
        future = asyncio.get_running_loop().create_future()
        self.waiting[f"{job_id}.{node}"] = future
        started = time.perf_counter()
        await self.js.publish(subjects.stage_request("noop"), request.model_dump_json().encode(),
                              headers={"Nats-Msg-Id": request.key})
        event = await asyncio.wait_for(future, 30)
        return time.perf_counter() - started, event.outputs

    async def chain(self, job_id: str, hops: int, first: dict) -> list[float]:
        times, inputs = [], first
        for n in range(hops):
            seconds, outputs = await self.hop(job_id, f"hop{n}", inputs)
            times.append(seconds)
            inputs = outputs
        return times


def hops_workflow(hops: int):
    from captionbus.coordinator.graph import Workflow

    nodes = {f"hop{n}": {"stage": "noop", "inputs": {"input": "job.input" if n == 0 else f"hop{n - 1}.input"},
                         "outputs": ["input"]} for n in range(hops)}
    return Workflow.from_dict({"name": "hops", "nodes": nodes, "outputs": {"out": f"hop{hops - 1}.input"}})


async def coordinated(nc, js, first_ref, hops: int, chains: int, concurrency: int) -> tuple[list[float], float]:
    """Per-job seconds for `chains` sequential jobs, and hops/s with `concurrency` jobs in flight."""
    from captionbus.contracts import JobSpec, JobSubmitted, new_job_id
    from captionbus.coordinator.service import Coordinator

    finished: dict[str, asyncio.Future] = {}

    async def on_terminal(msg) -> None:
        event = parse_event(msg.data)
        future = finished.pop(event.job_id, None)
        if future is not None and not future.done():
            future.set_result(event)

    async def job() -> float:
        spec = JobSpec(job_id=new_job_id(), workflow="hops", input=first_ref)
        finished[spec.job_id] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        event = JobSubmitted(job_id=spec.job_id, spec=spec)
        await js.publish(subjects.job_event(spec.job_id, "submitted"), event.model_dump_json().encode(),
                         headers={"Nats-Msg-Id": event.event_id})
        result = await asyncio.wait_for(finished[spec.job_id], 60)
        if result.kind != "completed":
            raise RuntimeError(f"job {spec.job_id} {result.kind}: {getattr(result, 'reason', '')}")
        return time.perf_counter() - started

    for kind in ("completed", "failed"):
        for subject in subjects.job_kind_all_jobs(kind):
            await nc.subscribe(subject, cb=on_terminal)
    async with Coordinator(nc, graphs={"hops": hops_workflow(hops)}):
        await job()  # warm-up
        per_job = [await job() for _ in range(chains)]
        rounds = max(1, chains // concurrency)
        started = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(job() for _ in range(concurrency)))
        hops_per_s = rounds * concurrency * hops / (time.perf_counter() - started)
    return per_job, hops_per_s


async def raw_nats(nc, js, n: int = 500) -> dict[str, list[float]]:
    async def echo(msg):
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=echo)
    await js.add_stream(name="BENCH", subjects=["bench.js"])
    out: dict[str, list[float]] = {"core request/reply": [], "JetStream publish+ack": []}
    for _ in range(n):
        t = time.perf_counter()
        await nc.request("bench.echo", b"x" * 200, timeout=2)
        out["core request/reply"].append(time.perf_counter() - t)
    for _ in range(n):
        t = time.perf_counter()
        await js.publish("bench.js", b"x" * 200)
        out["JetStream publish+ack"].append(time.perf_counter() - t)
    return out


def start_processes(n: int, url: str, home: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "NATS_URL": url, "CAPTIONBUS_HOME": str(home), "CAPTIONBUS_ENV": "bench",
           "CAPTIONBUS_ARTIFACTS": os.environ["CAPTIONBUS_ARTIFACTS"], "CAPTIONBUS_LOG_LEVEL": os.environ.get("BENCH_SERVICE_LOG_LEVEL", "WARNING"),
           "PYTHONPATH": str(PROJECT_ROOT)}
    log = open(os.environ.get("BENCH_LOG", os.devnull), "ab")
    return [subprocess.Popen([sys.executable, "-m", "captionbus.services", "serve", "noop", "--replica-id", str(i)],
                             stdout=log, stderr=subprocess.STDOUT, env=env) for i in range(n)]


async def wait_replicas(nc, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(f"$SRV.PING.{subjects.micro_service_name('noop')}", b"", reply=inbox)
        await asyncio.sleep(0.3)
        seen = sub.pending_msgs
        await sub.unsubscribe()
        if seen >= n:
            return
    raise RuntimeError(f"{n} noop services did not answer $SRV.PING in {timeout}s")


async def bench(args, url: str, home: Path) -> None:
    settings = Settings(home=home, nats_url=None, artifacts_mode=os.environ["CAPTIONBUS_ARTIFACTS"])
    nc = await connect(url, "bench")
    js = nc.jetstream()
    await provision(js)
    processes, tasks, stop = [], [], asyncio.Event()
    if args.in_process:
        from captionbus.services.noop.stage import STAGE
        from captionbus.services.runtime.serve import serve

        tasks = [asyncio.create_task(serve(STAGE, settings, url, env_name="bench", stop=stop,
                                           policy=StagePolicy(), replica_id=str(i)))
                 for i in range(args.services)]
    else:
        processes = start_processes(args.services, url, home)
    try:
        await wait_replicas(nc, args.services)
        store = ArtifactStore(settings, js)
        seed = home / "seed.txt"
        seed.write_text("hello\n")
        first = {"input": await store.put(seed, name="seed.txt")}
        driver = Driver(js, nc)
        await driver.start()

        await driver.chain("warmup", args.hops, first)
        latencies: list[float] = []
        for c in range(args.chains):
            latencies += await driver.chain(f"lat{c}", args.hops, first)

        rounds = max(1, args.chains // args.concurrency)
        started = time.perf_counter()
        for r in range(rounds):
            await asyncio.gather(*(driver.chain(f"thr{r}-{c}", args.hops, first) for c in range(args.concurrency)))
        wall = time.perf_counter() - started
        hops_per_s = rounds * args.concurrency * args.hops / wall

        coord_jobs, coord_hops_per_s = await coordinated(
            nc, js, first["input"], args.hops, args.chains, args.concurrency)
        raw = await raw_nats(nc, js)
    finally:
        stop.set()
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(20)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await nc.close()

    mode = "in-process tasks" if args.in_process else "subprocesses"
    store_kind = "object store" if settings.use_object_store() else "local artifact root"
    print(f"\nstage hops: {args.services} noop services ({mode}, slots=1), {store_kind}, "
          f"{args.chains} chains x {args.hops} hops for latency, {args.concurrency} chains in flight for throughput")
    print(f"{'':28}{'p50 ms':>10}{'p95 ms':>10}{'per s':>10}")
    p50 = pct(latencies, 0.5)
    print(f"{'stage hop (sequential)':28}{p50 * 1e3:10.2f}{pct(latencies, 0.95) * 1e3:10.2f}{1 / p50:10.0f}")
    print(f"{'stage hops (concurrent)':28}{'':10}{'':10}{hops_per_s:10.0f}")
    coord_hops = [t / args.hops for t in coord_jobs]
    c50 = pct(coord_hops, 0.5)
    print(f"{'hop via coordinator (seq)':28}{c50 * 1e3:10.2f}{pct(coord_hops, 0.95) * 1e3:10.2f}{1 / c50:10.0f}")
    print(f"{'hops via coordinator (conc)':28}{'':10}{'':10}{coord_hops_per_s:10.0f}")
    for name, values in raw.items():
        m = pct(values, 0.5)
        print(f"{name:28}{m * 1e3:10.2f}{pct(values, 0.95) * 1e3:10.2f}{1 / m:10.0f}")
    print(f"stage hop p50 / core request-reply p50 = {p50 / pct(raw['core request/reply'], 0.5):.0f}x")
    print(json.dumps({"hop_p50_ms": round(p50 * 1e3, 2), "hop_p95_ms": round(pct(latencies, 0.95) * 1e3, 2),
                      "hops_per_s": round(hops_per_s, 1),
                      "coord_hop_p50_ms": round(c50 * 1e3, 2), "coord_hops_per_s": round(coord_hops_per_s, 1),
                      "raw_rr_p50_ms": round(pct(raw["core request/reply"], 0.5) * 1e3, 3),
                      "js_pub_p50_ms": round(pct(raw["JetStream publish+ack"], 0.5) * 1e3, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=2)
    parser.add_argument("--hops", type=int, default=5)
    parser.add_argument("--chains", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--object-store", action="store_true", help="artifacts via the JetStream object store")
    parser.add_argument("--coordinators", action="store_true",
                        help="hops through 1 and 3 coordinator processes instead (benchmarks/fleet_sim.py --hops)")
    parser.add_argument("--cluster", action="store_true", help="--coordinators: on a 3-node cluster (R3)")
    parser.add_argument("--baseline", metavar="REV", help="--coordinators: REV's coordinators in turns with these")
    parser.add_argument("--repeat", type=int, default=1, help="--coordinators: turns of each code")
    parser.add_argument("--memory-consumers", action="store_true",
                        help="--coordinators: consumers keep their state in memory (an experiment)")
    args = parser.parse_args()
    if args.coordinators:
        fleet_sim.run(fleet_sim.build_parser().parse_args([
            "--hops", "--hop-count", str(args.hops), "--chains", str(args.chains),
            "--repeat", str(args.repeat), *([] if args.cluster else ["--single-node"]),
            *(["--baseline", args.baseline] if args.baseline else []),
            *(["--memory-consumers"] if args.memory_consumers else [])]))
        return
    configure_logging("WARNING")
    os.environ["CAPTIONBUS_ARTIFACTS"] = "object" if args.object_store else "local"
    with tempfile.TemporaryDirectory(prefix="cb-hops-") as tmp:
        home = Path(tmp)
        with EmbeddedServer(home / "nats") as server:
            asyncio.run(bench(args, server.url, home))


if __name__ == "__main__":
    main()
