"""10 short clips through warm services on the bus vs the seed-style runner that starts a fresh
interpreter and loads the model for every stage of every job. Same clips, same machine, one run.

It measures work, not the stage cache: the services run with CAPTIONBUS_STAGE_CACHE=off, the
concurrent pass gets its own clips (a different lead-in, so different bytes), and a completion
answered from the cache stops the benchmark.

    python benchmarks/warm_vs_cold.py [--clips 10]

Needs the `common` and `whisperx` environments and the Whisper base model (see README).
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

from captionbus.client import follow, submit  # noqa: E402
from captionbus.envs import interpreter_for_stage  # noqa: E402
from captionbus.runner import coordinator_task, start_stage_services  # noqa: E402
from captionbus.server import EmbeddedServer  # noqa: E402
from captionbus.stack import stop_services, wait_ready  # noqa: E402
from captionbus.contracts.events import TERMINAL_KINDS  # noqa: E402
from captionbus.core.artifacts import ArtifactStore  # noqa: E402
from captionbus.core.bus import connect, provision  # noqa: E402
from captionbus.core.settings import Settings, load  # noqa: E402
from tests.media import speech_video  # noqa: E402

SENTENCES = [
    "The morning train left the station ten minutes late",
    "She painted the old fence a bright shade of blue",
    "Two cats slept on the warm stone wall all afternoon",
    "Please bring the maps and the lantern to the boat",
    "The library closes early on the first day of winter",
    "He counted the coins twice before paying the baker",
    "A strong wind pushed the clouds over the hills",
    "Our neighbours planted apple trees along the road",
    "The concert started with a slow piece for violin",
    "They fixed the bridge before the heavy rains came",
]
STAGES = ["demux", "vad", "chunk", "asr", "transcript_join", "subtitle_gen", "mux"]  # config/workflows/transcribe.yaml
ONESHOT = Path(__file__).with_name("seed_stage_oneshot.py")


def oneshot(stage: str, out_dir: Path, *pairs: str) -> dict[str, str]:
    done = subprocess.run([str(interpreter_for_stage(stage)), str(ONESHOT), stage, str(out_dir), *pairs],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["outputs"]


def cold_job(clip: Path, work: Path) -> None:
    audio = oneshot("demux", work / "demux", f"media={clip}")["audio"]
    regions = oneshot("vad", work / "vad", f"audio={audio}")["regions"]
    transcript = oneshot("asr", work / "asr", f"audio={audio}", f"regions={regions}",
                         'param:language="en"')["transcript"]
    srt = oneshot("subtitle_gen", work / "subtitle_gen", f"transcript={transcript}")["srt"]
    oneshot("mux", work / "mux", f"media={clip}", f"list:subtitles={srt}", 'param:languages=["en"]')


async def warm_run(clips: list[Path], other_clips: list[Path], root: Path) -> dict[str, float]:
    # A private data dir for the bus and artifacts; the real model cache.
    os.environ.setdefault("CAPTIONBUS_MODELS", str(load().models_dir))
    settings = Settings(home=root / "warm-home", nats_url=None, artifacts_mode="local", host_id="bench")
    server = EmbeddedServer(root / "nats")
    server.start()
    services = []
    try:
        nc = await connect(server.url, "bench")
        js = nc.jetstream()
        await provision(js)
        store = ArtifactStore(settings, js)

        async def one(clip: Path) -> None:
            spec = await submit(js, store, clip, source_language="en")
            async for event in follow(js, spec.job_id):
                if event.kind == "stage_completed" and event.metrics.get("cache_hit"):
                    raise SystemExit(f"{event.node} was answered from the stage cache: this would measure nothing")
                if event.kind in TERMINAL_KINDS:
                    assert event.kind == "completed", event
                    return

        async with coordinator_task(nc):
            started = time.perf_counter()
            os.environ["CAPTIONBUS_STAGE_CACHE"] = "off"  # the services inherit it
            services = start_stage_services(settings, server.url, STAGES)
            await wait_ready(nc, services)
            startup = time.perf_counter() - started
            started = time.perf_counter()
            for clip in clips:
                await one(clip)
            sequential = time.perf_counter() - started
            started = time.perf_counter()
            await asyncio.gather(*(one(clip) for clip in other_clips))
            concurrent = time.perf_counter() - started
        await nc.drain()
        return {"startup": startup, "sequential": sequential, "concurrent": concurrent}
    finally:
        stop_services(services)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clips = [speech_video(root / f"clip{i}.mp4", SENTENCES[i % len(SENTENCES)])[0] for i in range(args.clips)]
        # The concurrent pass: the same sentences, other bytes (lead-in 0.7 s instead of 0.5 s).
        other = [speech_video(root / f"other{i}.mp4", SENTENCES[i % len(SENTENCES)], lead_in_s=0.7)[0]
                 for i in range(args.clips)]
        warm = asyncio.run(warm_run(clips, other, root))
        print(f"warm: {warm}", flush=True)
        started = time.perf_counter()
        for i, clip in enumerate(clips):
            cold_job(clip, root / f"cold{i}")
        cold = time.perf_counter() - started
    n = len(clips)
    print(f"{n} clips, stages {' -> '.join(STAGES)}")
    print(f"{'runner':<44}{'total s':>10}{'per clip s':>12}{'speed-up':>10}")
    print(f"{'seed-style: fresh interpreter per stage':<44}{cold:>10.1f}{cold / n:>12.2f}{1.0:>10.2f}")
    print(f"{'warm services, one job at a time':<44}{warm['sequential']:>10.1f}{warm['sequential'] / n:>12.2f}{cold / warm['sequential']:>10.2f}")
    print(f"{'warm services, all jobs submitted at once':<44}{warm['concurrent']:>10.1f}{warm['concurrent'] / n:>12.2f}{cold / warm['concurrent']:>10.2f}")
    total = warm["startup"] + warm["sequential"]
    print(f"{'warm incl. service start-up (one-off)':<44}{total:>10.1f}{total / n:>12.2f}{cold / total:>10.2f}")


if __name__ == "__main__":
    main()
