"""The dashboard under load: many jobs in KV, a steady stream of events, one open stream.

    python benchmarks/dashboard.py [--jobs 10000] [--rate 50] [--seconds 600]

Starts its own nats-server in a temp dir, writes `--jobs` job states (transcribe-shaped: four
nodes, finished ones with worker and timings) into the KV bucket, then starts the real
`captionbus dashboard` process and measures, side by side against the issue's budgets:

  ready        process start -> /readyz 200 (every job state loaded)
  first page   GET /api/jobs (newest 50 of all jobs) and GET / (the page), each timed
  filtered     GET /api/jobs?text=…&status=… over all jobs
  event->SSE   `--rate` events/s for `--seconds` (stage_progress events; one job-state KV update in
               ten): publish time -> arrival on an open /api/stream (an HTTP SSE client, not a
               browser; the page's own handling adds a DOM update) p50 / p95 / max
  RSS          the dashboard's resident memory each 10 s: start, end, max, end/start

Numbers on a shared 2-core machine are noisy; run it on a quiet one for figures to quote.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captionbus.server import EmbeddedServer  # noqa: E402
from captionbus.contracts import ArtifactRef, JobSpec, JobState, StageProgress, subjects  # noqa: E402
from captionbus.contracts.jobs import JobStatus, NodeState, NodeStatus  # noqa: E402
from captionbus.core.bus import connect, provision, publish_event  # noqa: E402

NODES = ["demux", "asr", "subtitle_gen", "mux"]


def job_state(n: int, now: datetime) -> JobState:
    created = now - timedelta(seconds=n * 7)
    status = random.choice([JobStatus.completed] * 8 + [JobStatus.failed, JobStatus.running])
    spec = JobSpec(job_id=f"job-{n:06d}", workflow="transcribe", source_language="en",
                   input=ArtifactRef(key=f"{n:064x}", name=f"film-{n}.mp4", size=10_000_000 + n),
                   submitted_at=created)
    nodes, t = {}, created
    for i, name in enumerate(NODES):
        done = status == JobStatus.completed or (status == JobStatus.running and i < 2)
        end = t + timedelta(seconds=random.uniform(1, 60))
        nodes[name] = NodeState(
            stage=name, attempt=1, requested_at=t, finished_at=end if done else None,
            status=NodeStatus.completed if done else NodeStatus.failed if status == JobStatus.failed and i == 1
            else NodeStatus.requested if status == JobStatus.running and i == 2 else NodeStatus.waiting,
            worker={"worker_id": f"host{i}-1", "env": "whisperx" if name == "asr" else "common", "host": f"host{i}",
                    "interpreter": "/opt/envs/x/bin/python"} if done else {},
            metrics={"handle_s": (end - t).total_seconds(), "media_duration_s": 600.0} if done else {},
        )
        t = end
    return JobState(spec=spec, status=status, nodes=nodes, created_at=created, updated_at=t,
                    error="asr: out of memory" if status == JobStatus.failed else None)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_get(client: httpx.Client, path: str, **params) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = client.get(path, params=params)
    response.raise_for_status()
    return time.perf_counter() - start, response


async def load_jobs(url: str, count: int) -> None:
    nc = await connect(url, "bench-load")
    js = nc.jetstream()
    await provision(js)
    kv = await js.key_value(subjects.JOBS_BUCKET)
    now = datetime.now(timezone.utc)
    for start in range(0, count, 500):
        await asyncio.gather(*(kv.put(f"job-{n:06d}", job_state(n, now).model_dump_json().encode())
                               for n in range(start, min(start + 500, count))))
    await nc.close()


async def stream_events(url: str, base: str, jobs: int, rate: float, seconds: float, pid: int):
    nc = await connect(url, "bench-events")
    js = nc.jetstream()
    kv = await js.key_value(subjects.JOBS_BUCKET)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    rss: list[tuple[float, int]] = [(0.0, rss_kb(pid))]

    async def reader():
        async with httpx.AsyncClient(base_url=base, timeout=None) as client:
            async with client.stream("GET", "/api/stream") as response:
                kind = None
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "event":
                        message = json.loads(line[6:]).get("message", "")
                        if message in sent:
                            latencies.append(time.perf_counter() - sent.pop(message))

    task = asyncio.create_task(reader())
    await asyncio.sleep(1.0)
    start = time.perf_counter()
    n = 0
    next_rss = 10.0
    now = datetime.now(timezone.utc)
    while (elapsed := time.perf_counter() - start) < seconds:
        job = random.randrange(jobs)
        if n % 10 == 9:  # a job-state change (the coordinator's KV write)
            await kv.put(f"job-{job:06d}", job_state(job, now).model_dump_json().encode())
        else:
            marker = f"m{n}"
            sent[marker] = time.perf_counter()
            await publish_event(js, StageProgress(job_id=f"job-{job:06d}", stage="asr", node="asr", attempt=1,
                                                  fraction=random.random(), message=marker))
        n += 1
        if elapsed >= next_rss:
            rss.append((elapsed, rss_kb(pid)))
            next_rss += 10.0
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
    await asyncio.sleep(2.0)
    rss.append((time.perf_counter() - start, rss_kb(pid)))
    task.cancel()
    await nc.close()
    return latencies, len(sent), rss, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=50.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to stream events")
    args = parser.parse_args()
    random.seed(1)
    with tempfile.TemporaryDirectory(prefix="cb-bench-dash-") as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        server.start()
        dashboard = None
        try:
            t = time.perf_counter()
            asyncio.run(load_jobs(server.url, args.jobs))
            print(f"loaded {args.jobs} job states into KV in {time.perf_counter() - t:.1f} s")
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            env = {**os.environ, "NATS_URL": server.url, "CAPTIONBUS_HOME": str(Path(tmp) / "home"),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            t0 = time.perf_counter()
            dashboard = subprocess.Popen([sys.executable, "-m", "captionbus", "dashboard", "--listen", f"127.0.0.1:{port}"],
                                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with httpx.Client(base_url=base, timeout=30) as client:
                while True:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if dashboard.poll() is not None or time.perf_counter() - t0 > 300:
                        raise SystemExit("the dashboard did not become ready")
                    time.sleep(0.05)
                ready_s = time.perf_counter() - t0
                first_s, response = timed_get(client, "/api/jobs")
                assert response.json()["total"] == args.jobs, response.json()["total"]
                page_s, _ = timed_get(client, "/")
                filtered_s, _ = timed_get(client, "/api/jobs", text="film-99", status="completed")
                job_s, _ = timed_get(client, f"/api/jobs/job-{args.jobs // 2:06d}")
            latencies, lost, rss, sent = asyncio.run(
                stream_events(server.url, base, args.jobs, args.rate, args.seconds, dashboard.pid))
        finally:
            if dashboard is not None:
                dashboard.terminate()
                dashboard.wait(20)
            server.stop()

    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    rss_start, rss_end, rss_max = rss[1][1] if len(rss) > 2 else rss[0][1], rss[-1][1], max(r for _, r in rss)
    print(f"\n{args.jobs} jobs, {args.rate:g} messages/s for {args.seconds:g} s: {sent} published (9 in 10 events, "
          f"1 in 10 job-state writes); {len(latencies)} events timed on the stream, {lost} never arrived\n")
    print(f"{'measure':<34}{'value':>12}{'budget':>10}{'ratio':>8}")
    for name, value, budget in [
        ("ready (all jobs loaded) s", ready_s, None),
        ("first page /api/jobs s", first_s, 1.0),
        ("page HTML / s", page_s, 1.0),
        ("filtered /api/jobs s", filtered_s, 1.0),
        ("job page /api/jobs/<id> s", job_s, 1.0),
        ("event -> SSE p50 s", q[49], 1.0),
        ("event -> SSE p95 s", q[94], 1.0),
        ("event -> SSE max s", max(latencies, default=float("nan")), None),
    ]:
        ratio = f"{value / budget:>8.2f}" if budget else f"{'':>8}"
        print(f"{name:<34}{value:>12.3f}{budget or '':>10}{ratio}")
    print(f"{'RSS start / end / max MB':<34}{rss_start / 1024:>6.0f} / {rss_end / 1024:.0f} / {rss_max / 1024:.0f}"
          f"   end/start {rss_end / max(rss_start, 1):.2f}")
    print("RSS samples (s, MB): " + ", ".join(f"{s:.0f}:{r / 1024:.0f}" for s, r in rss))


if __name__ == "__main__":
    main()
