"""One film across one vs two asr workers (the `chunked` workflow), side by side in one run; the
per-chunk times measured with one worker project 4, 8 and 16 workers; a short clip submitted while
the film's chunks are queued vs on an idle stack (fairness); the peak RSS of every service on a
long film vs a 3-minute clip (memory follows the chunk, not the film).

    python benchmarks/fanout.py                       # the issue's sizes: 20-min film, 2-hour memory film
    python benchmarks/fanout.py --film-min 3 --memory-film-min 10    # reduced, minutes not hours

Each asr worker gets one thread (CAPTIONBUS_ASR_THREADS=1), so on a 2-core machine two workers
can be ~2x one. The stage cache is off (every number is work). Films are espeak-ng sentences with
pauses of 0.4-1.2 s (tests/media.speech_film). The job window (max_in_flight) is set to the
number of workers (the in-process coordinator gets config/workflows/chunked.yaml with that
window), which is what README advises a fleet to do. Needs the common and whisperx envs, Whisper base and Silero VAD.

Projection for N workers: the stages around asr (demux, vad, chunk, language, join, subtitles,
mux: measured with one worker) + the longest-first schedule of (each chunk's decode time +
the per-chunk overhead measured with one worker: asr phase wall time minus the decode times,
per chunk) over N workers. It ignores what N workers would contend for (the bus, the disk).
"""
from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from captionbus.client import follow, submit  # noqa: E402
from captionbus.runner import start_stage_services  # noqa: E402
from captionbus.server import EmbeddedServer  # noqa: E402
from captionbus.stack import stop_services, wait_ready  # noqa: E402
from contracts.events import TERMINAL_KINDS  # noqa: E402
from core.artifacts import ArtifactStore  # noqa: E402
from core.bus import connect, provision  # noqa: E402
from coordinator.graph import Workflow, check_stages  # noqa: E402
from coordinator.service import Coordinator  # noqa: E402
from core.settings import DEFAULT_CONFIG_DIR, Settings, load  # noqa: E402
from tests.media import FILM_SENTENCES, speech_film  # noqa: E402

STAGES = ["demux", "vad", "chunk", "asr", "transcript_join", "subtitle_gen", "mux"]
SECONDS_PER_REPEAT = 32.0  # the 8 FILM_SENTENCES with their pauses


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def chunked_workflow(window: int) -> Workflow:
    """config/workflows/chunked.yaml with max_in_flight set to the number of workers."""
    data = yaml.safe_load((DEFAULT_CONFIG_DIR / "workflows" / "chunked.yaml").read_text())
    data["nodes"]["asr"]["max_in_flight"] = window
    workflow = Workflow.from_dict(data, "chunked.yaml")
    check_stages(workflow)
    return workflow


class Stack:
    """A bus, an in-process coordinator and the chunked workflow's services, `workers` asr."""

    def __init__(self, root: Path, workers: int):
        self.root, self.workers = root / f"stack-{workers}", workers

    async def __aenter__(self):
        os.environ.update(CAPTIONBUS_STAGE_CACHE="off", CAPTIONBUS_ASR_THREADS="1")
        self.settings = Settings(home=self.root / "home", nats_url=None, artifacts_mode="local", host_id="bench")
        self.server = EmbeddedServer(self.root / "nats")
        self.server.start()
        self.nc = await connect(self.server.url, "bench")
        self.js = self.nc.jetstream()
        await provision(self.js)
        self.store = ArtifactStore(self.settings, self.js)
        self.coordinator = Coordinator(self.nc, graphs={"chunked": chunked_workflow(self.workers)})
        await self.coordinator.__aenter__()
        self.services = start_stage_services(self.settings, self.server.url, STAGES, {"asr": self.workers})
        await wait_ready(self.nc, self.services, timeout=600)
        return self

    async def __aexit__(self, *exc):
        self.rss = {}
        for svc in self.services:
            replica = sum(1 for name in self.rss if name.startswith(f"{svc.stage} "))
            self.rss[f"{svc.stage} worker {replica}"] = peak_rss_mb(svc.process.pid)
        await self.coordinator.__aexit__(*exc)
        await self.nc.drain()
        stop_services(self.services)
        self.server.stop()

    async def job(self, media: Path, chunk_s: float, on_event=None) -> tuple[float, list]:
        """Wall seconds from submit to completion, and the job's events."""
        started = time.perf_counter()
        spec = await submit(self.js, self.store, media, workflow="chunked", source_language="en",
                            options={"chunk": {"target_s": chunk_s}})
        events = []
        async for event in follow(self.js, spec.job_id):
            events.append((time.perf_counter() - started, event))
            if on_event is not None:
                await on_event(event)
            if event.kind == "stage_completed" and event.metrics.get("cache_hit"):
                raise SystemExit(f"{event.node} came from the stage cache: this would measure nothing")
            if event.kind in TERMINAL_KINDS:
                if event.kind != "completed":
                    raise SystemExit(f"job {spec.job_id} {event.kind}: {getattr(event, 'reason', '')}")
                return time.perf_counter() - started, events
        raise SystemExit("the event stream ended early")


def asr_phase(events: list) -> tuple[list[float], float]:
    """Decode seconds of every chunk, and the wall time from the first chunk request to the last
    chunk result."""
    items = [(t, e) for t, e in events if getattr(e, "node", "").startswith("asr-")]
    decode = [e.metrics.get("handle_s", 0.0) for _, e in items if e.kind == "stage_completed"]
    first = min(t for t, e in items if e.kind == "stage_requested")
    last = max(t for t, e in items if e.kind == "stage_completed")
    return decode, last - first


def makespan(durations: list[float], workers: int) -> float:
    """Longest first onto the least-loaded worker."""
    loads = [0.0] * workers
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


async def fanout(root: Path, film: Path, clip: Path, chunk_s: float) -> None:
    results = {}
    for workers in (1, 2):
        async with Stack(root, workers) as stack:
            wall, events = await stack.job(film, chunk_s)  # the film alone
            results[workers] = (wall, events)
            if workers == 2:
                # Fairness: the clip alone, then the clip submitted once the film's chunks queue.
                idle, _ = await stack.job(clip, chunk_s)
                clip_task: list[asyncio.Task] = []

                async def clip_when_chunks_queue(event):
                    if not clip_task and event.kind == "stage_requested" and event.node.startswith("asr-"):
                        clip_task.append(asyncio.create_task(stack.job(clip, chunk_s)))

                await stack.job(film, chunk_s, clip_when_chunks_queue)
                busy, _ = await clip_task[0]
                results["clip"] = (idle, busy)
    one, two = results[1][0], results[2][0]
    decode, phase = asr_phase(results[1][1])
    overhead = max(0.0, (phase - sum(decode)) / max(1, len(decode)))
    fixed = one - phase
    print(f"\nfilm {film.name}: {len(decode)} chunks of ~{chunk_s:g} s; decode per chunk "
          f"{min(decode):.1f}-{max(decode):.1f} s; overhead per chunk {overhead:.2f} s; other stages {fixed:.1f} s")
    print(f"{'asr workers (1 thread each)':<34}{'wall s':>10}{'vs 1':>8}")
    print(f"{'1 (measured)':<34}{one:>10.1f}{1.0:>8.2f}")
    print(f"{'2 (measured)':<34}{two:>10.1f}{one / two:>8.2f}")
    for n in (2, 4, 8, 16):
        projected = fixed + makespan([d + overhead for d in decode], n)
        print(f"{f'{n} (projected)':<34}{projected:>10.1f}{one / projected:>8.2f}")
    idle, busy = results["clip"]
    print(f"\n{clip.name} on an idle stack {idle:.1f} s; submitted while the film's chunks queue "
          f"{busy:.1f} s: {busy / idle:.2f}x (window = workers)")


async def memory(root: Path, long_film: Path, short: Path, chunk_s: float) -> None:
    peaks = {}
    for media in (short, long_film):
        async with Stack(root / media.stem, 1) as stack:
            await stack.job(media, chunk_s)
        peaks[media.name] = stack.rss
    print(f"\npeak RSS (MB) per service, {short.name} vs {long_film.name}:")
    for name in peaks[short.name]:
        a, b = peaks[short.name][name], peaks[long_film.name][name]
        print(f"  {name:<20}{a:>10.0f}{b:>10.0f}{b / a:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--film-min", type=float, default=20.0)
    parser.add_argument("--chunk-s", type=float, default=60.0)
    parser.add_argument("--memory-film-min", type=float, default=120.0, help="0: skip the memory runs")
    args = parser.parse_args()
    os.environ.setdefault("CAPTIONBUS_MODELS", str(load().models_dir))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repeat = math.ceil(args.film_min * 60 / SECONDS_PER_REPEAT)
        film, _ = speech_film(root / f"film-{args.film_min:g}min.mp4", repeat=repeat)
        clip, _ = speech_film(root / "clip-20s.mp4", sentences=FILM_SENTENCES[:5])
        asyncio.run(fanout(root, film, clip, args.chunk_s))
        if args.memory_film_min:
            short, _ = speech_film(root / "short-3min.mp4", repeat=math.ceil(180 / SECONDS_PER_REPEAT))
            repeat = math.ceil(args.memory_film_min * 60 / SECONDS_PER_REPEAT)
            long_film, _ = speech_film(root / f"long-{args.memory_film_min:g}min.mp4", repeat=repeat)
            asyncio.run(memory(root, long_film, short, args.chunk_s))


if __name__ == "__main__":
    main()
