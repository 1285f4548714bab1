"""The HTTP gateway under load, its overhead per request, and a large upload's memory, in one run.

    python benchmarks/gateway.py [--clients 50] [--overhead-rounds 10] [--upload-mb 1024]

1. Overhead: the same clip through `POST /v1/audio/transcriptions` (the `openai` client) and through
   the bus directly (`client.submit` + following the job to its end, what `submit --wait` does
   before it copies outputs), interleaved. Every stage is a stage-cache hit after a warm-up run, so
   both sides do the same bus work and the difference is the gateway's own cost (HTTP, streamed
   upload, store, waiting on events, reading the transcript).
2. Load: `--clients` concurrent OpenAI clients, each with its own clip (distinct speech: no cache
   hits), against 2 asr replicas: errors, p50/p95 latency, WER of each answer.
3. Upload: a `--upload-mb` file streamed to `POST /v1/jobs`; the gateway process's peak RSS (VmHWM).

The HTTP floor is the same upload by the same client answered 400 once the form is read (no bus
work): what any HTTP door costs. The breakdown and the numbers measured here are in
captionbus/gateway/ends.py (the gateway hears job ends on one subscription, not a consumer per request).

The gateway runs as its own process (`captionbus gateway`), as in production. Needs the `common`
and `whisperx` environments and the Whisper base model (see README). On a busy 2-core machine the
latencies are noisy; the overhead is a paired difference, which holds up better.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import jiwer  # noqa: E402
import openai  # noqa: E402

from captionbus.client import follow, submit  # noqa: E402
from captionbus.envs import env_for_stage, interpreter_for_stage  # noqa: E402
from captionbus.gateway.keys import add_key  # noqa: E402
from captionbus.runner import coordinator_task, validate_job  # noqa: E402
from captionbus.server import EmbeddedServer  # noqa: E402
from captionbus.stack import start_service, stop_services, wait_ready  # noqa: E402
from captionbus.contracts.events import TERMINAL_KINDS  # noqa: E402
from captionbus.core.artifacts import ArtifactStore  # noqa: E402
from captionbus.core.bus import connect, provision  # noqa: E402
from captionbus.core.settings import Settings, load  # noqa: E402
from tests.gatewaytools import start_gateway_process  # noqa: E402
from tests.media import speech_wav  # noqa: E402

WORDS = ["river", "stone", "lantern", "meadow", "copper", "violin", "harbour", "orchard", "winter", "candle", "garden", "bridge", "falcon", "marble", "thunder", "silver", "pocket", "ladder", "cotton", "basket"]


def sentence(i: int) -> str:
    """A distinct short sentence per client, so no two clips share a stage-cache entry."""
    picks = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4)]
    return f"Clip {i}: the {picks[0]} and the {picks[1]} are near the {picks[2]} by the {picks[3]}"


def words_of(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_gateway(root: Path, url: str, home: Path, keys: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "NATS_URL": url, "CAPTIONBUS_HOME": str(home), "CAPTIONBUS_ARTIFACTS": "local",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        return start_gateway_process(["--keys", str(keys), "--concurrency", "256", "--max-upload-mb", "4096",
                                      "--job-timeout", "1800"], env, root / "gateway.log")
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


async def run(args, root: Path) -> None:
    os.environ.setdefault("CAPTIONBUS_MODELS", str(load().models_dir))
    home = root / "home"
    settings = Settings(home=home, nats_url=None, artifacts_mode="local", host_id="bench")
    server = EmbeddedServer(root / "nats")
    server.start()
    services, gateway = [], None
    try:
        nc = await connect(server.url, "bench")
        js = nc.jetstream()
        await provision(js)
        store = ArtifactStore(settings, js)
        async with coordinator_task(nc):
            for stage, replicas in (("demux", 1), ("asr", 2), ("subtitle_gen", 1)):
                for replica in range(replicas):
                    services.append(start_service(stage, env_for_stage(stage), interpreter_for_stage(stage),
                                                  server.url, settings, replica=replica))
            await wait_ready(nc, services)
            key = add_key(root / "keys", "bench")
            gateway, base = start_gateway(root, server.url, home, root / "keys")
            ai = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=1800)

            phases: list[dict[str, float]] = []

            async def via_gateway(clip: Path) -> tuple[float, str]:
                started = time.perf_counter()
                with clip.open("rb") as f:
                    raw = await ai.audio.transcriptions.with_raw_response.create(
                        model="whisper-1", file=f, language="en")
                result = raw.parse()
                elapsed = time.perf_counter() - started
                timing = dict(part.strip().split(";dur=") for part in raw.headers["server-timing"].split(","))
                phases.append({name: float(ms) / 1000 for name, ms in timing.items()} | {"total": elapsed})
                return elapsed, result.text

            async def http_floor(clip: Path) -> float:
                """The same upload with the same client, refused (400) after the form is read: HTTP,
                the client library and the multipart body, and no bus work: what any HTTP door costs."""
                started = time.perf_counter()
                with clip.open("rb") as f:
                    try:
                        await ai.audio.transcriptions.create(model="whisper-1", file=f, language="en",
                                                             response_format="tsv")
                    except openai.BadRequestError:
                        pass
                return time.perf_counter() - started

            async def direct(clip: Path) -> float:
                started = time.perf_counter()
                validate_job("speech", "en", [], local_stack=False)  # as `submit --wait` does
                spec = await submit(js, store, clip, workflow="speech", source_language="en")
                async for event in follow(js, spec.job_id):
                    if event.kind in TERMINAL_KINDS:
                        assert event.kind == "completed", event
                        break
                return time.perf_counter() - started

            # 1. overhead, on stage-cache hits
            clip, _ = speech_wav(root / "overhead.wav", sentence(10_000))
            await via_gateway(clip)
            await direct(clip)
            await http_floor(clip)
            gw_times, bus_times, floor_times = [], [], []
            phases.clear()
            for _ in range(args.overhead_rounds):
                gw_times.append((await via_gateway(clip))[0])
                bus_times.append(await direct(clip))
                floor_times.append(await http_floor(clip))
            gw_phases = list(phases)
            diffs = [g - b for g, b in zip(gw_times, bus_times)]

            # 2. load (skipped with --clients 0)
            clips = [speech_wav(root / f"c{i}.wav", sentence(i)) for i in range(args.clients)]
            started = time.perf_counter()
            results = list(await asyncio.gather(*(via_gateway(c) for c, _ in clips), return_exceptions=True))
            wall = time.perf_counter() - started
            errors = [r for r in results if isinstance(r, BaseException)]
            latencies = [r[0] for r in results if not isinstance(r, BaseException)]
            wers = [jiwer.wer(words_of(spoken), words_of(r[1]))
                    for (_, spoken), r in zip(clips, results) if not isinstance(r, BaseException)]

            # 3. a large upload, streamed (skipped with --upload-mb 0)
            response, upload_s, rss_before, rss_after = None, 0.0, 0.0, 0.0
            if args.upload_mb:
                big = root / "big.bin"
                block = os.urandom(1024 * 1024)
                with big.open("wb") as f:
                    for _ in range(args.upload_mb):
                        f.write(block)
                rss_before = peak_rss_mb(gateway.pid)
                started = time.perf_counter()
                with big.open("rb") as f, httpx.Client(timeout=600) as http:
                    response = http.post(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                                         files={"file": ("big.mp4", f)}, data={"workflow": "speech"})
                upload_s = time.perf_counter() - started
                rss_after = peak_rss_mb(gateway.pid)
        await nc.drain()
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(20)
        stop_services(services)
        server.stop()

    print(f"1. overhead, {args.overhead_rounds} rounds of one clip (stage-cache hits on both sides)")
    print(f"{'path':<46}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"{'bus directly (submit + follow to the end)':<46}{statistics.median(bus_times) * 1000:>10.1f}"
          f"{pct(bus_times, 0.95) * 1000:>10.1f}")
    print(f"{'gateway, openai client, response_format=json':<46}{statistics.median(gw_times) * 1000:>10.1f}"
          f"{pct(gw_times, 0.95) * 1000:>10.1f}")
    print(f"{'gateway overhead (paired difference)':<46}{statistics.median(diffs) * 1000:>10.1f}"
          f"{pct(diffs, 0.95) * 1000:>10.1f}   ratio gateway/bus p50 "
          f"{statistics.median(gw_times) / statistics.median(bus_times):.2f}")
    print(f"{'HTTP floor (same upload answered 400, no bus)':<46}{statistics.median(floor_times) * 1000:>10.1f}"
          f"{pct(floor_times, 0.95) * 1000:>10.1f}")
    print(f"{'overhead beyond the HTTP floor':<46}"
          f"{(statistics.median(diffs) - statistics.median(floor_times)) * 1000:>10.1f}")
    split = {name: statistics.median(p[name] for p in gw_phases) * 1000
             for name in ("form", "submit", "job", "answer", "total")}
    split["http+client"] = split["total"] - sum(split[n] for n in ("form", "submit", "job", "answer"))
    print("   gateway request, p50 ms by phase (Server-Timing): "
          + ", ".join(f"{name} {ms:.1f}" for name, ms in split.items()))
    if args.clients:
        print(f"2. load: {args.clients} concurrent openai clients, distinct clips, 2 asr replicas")
        print(f"   errors {len(errors)}{' (' + repr(errors[0])[:200] + ')' if errors else ''}, wall {wall:.1f} s, "
              f"latency p50 {statistics.median(latencies):.1f} s p95 {pct(latencies, 0.95):.1f} s, "
              f"WER median {statistics.median(wers):.2f} max {max(wers):.2f}" if latencies else f"   every request failed: {errors[0]!r}")
    if args.upload_mb:
        print(f"3. upload of {args.upload_mb} MB to /v1/jobs: HTTP {response.status_code} in {upload_s:.1f} s "
              f"({args.upload_mb / upload_s:.0f} MB/s); gateway peak RSS {rss_before:.0f} MB before, "
              f"{rss_after:.0f} MB after (limit 200 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--overhead-rounds", type=int, default=10)
    parser.add_argument("--upload-mb", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
