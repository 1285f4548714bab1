"""Nothing finished is lost (issue 18), on a real nats-server with real stage services: the
`subtitle` workflow (config/workflows/subtitle.yaml, the real graph) with every stage served by
captionbus/services/runtime, and `captionbus submit --wait` as a user runs it.

The translation stage is the real one (captionbus.services.translation.nllb_stage.STAGE): its setup, with
HF_HUB_OFFLINE=1 and a model id that is not in the (empty) Hugging Face cache, fails at once
with the variable to set — before torch is imported, so it runs in the test's own interpreter.
The chunk and transcript_join stages are the real ones (pure Python: the graph chunks by default,
so the job goes demux -> vad -> chunk -> asr-0 -> alignment-0 -> transcript_join). The other stages
are stand-ins under their real names that write small files for the outputs the graph expects (vad
valid speech regions, asr and alignment a valid transcript; no ML here:
tests/e2e/test_translate_subtitle.py runs the real models); the mux stand-in writes the subtitle
tracks it was given, so the test sees which tracks exist."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from captionbus import exitcodes
from captionbus.coordinator.decide import Policy
from captionbus.coordinator.service import Coordinator
from captionbus.core.bus import StagePolicy, connect, provision
from captionbus.core.settings import Settings
from captionbus.services.runtime import StageDefinition
from captionbus.contracts.speech import SpeechRegion, SpeechRegions
from captionbus.contracts.transcript import Segment, Transcript
from captionbus.services.chunk.stage import STAGE as CHUNK
from captionbus.services.runtime.serve import serve
from captionbus.services.transcript_join.stage import STAGE as TRANSCRIPT_JOIN
from captionbus.services.translation.nllb_stage import STAGE as NLLB

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = {"demux": ["audio", "probe"], "vad": ["regions"], "asr": ["transcript"], "alignment": ["transcript"],
           "subtitle_gen": ["srt", "vtt"]}


# What a stand-in writes where the next real stage parses it.
VALID = {
    "regions": SpeechRegions(backend="stand-in", duration=3.0, regions=[SpeechRegion(start=0.5, end=2.5)]),
    "transcript": Transcript(language="en", segments=[Segment(start=0.5, end=2.5, text="hello there")]),
}


def _stand_in(stage: str) -> StageDefinition:
    def handle(request, ctx):
        files = {}
        for name in OUTPUTS[stage]:
            path = ctx.work_dir / f"{request.node}.{name}"
            if name in VALID:
                path.write_text(VALID[name].model_dump_json())
            else:
                path.write_text(f"{request.node} {name} {request.params.get('target_language', '')}\n")
            files[name] = path
        return files

    return StageDefinition(name=stage, handle=handle, cacheable=False)


def _mux(request, ctx):
    tracks = [p.read_text() for p in ctx.input_paths("subtitles")]
    files = {}
    for container in ("mp4", "mkv"):
        files[container] = ctx.work_dir / f"muxed.{container}"
        files[container].write_text(json.dumps(tracks))
    return files


def test_subtitle_job_whose_translation_cannot_load_delivers_the_source_subtitles_and_exits_3(
        nats_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty: the model id is not cached
    monkeypatch.setenv("CAPTIONBUS_NLLB_MODEL", "facebook/nllb-200-distilled-600M")
    media = tmp_path / "talk.wav"
    media.write_bytes(b"RIFF" + os.urandom(50_000))
    out = tmp_path / "out"

    async def main():
        nc = await connect(nats_server, "partial-coordinator")
        await provision(nc.jetstream())
        stages = [_stand_in(s) for s in OUTPUTS] + [StageDefinition(name="mux", handle=_mux, cacheable=False), NLLB,
                                                     CHUNK, TRANSCRIPT_JOIN]
        stop = asyncio.Event()
        async with Coordinator(nc, tick_interval_s=0.2, policy=Policy(result_secret=b"partial")):
            workers = []
            for definition in stages:
                ready = asyncio.Event()
                settings = Settings(home=tmp_path / "workers" / definition.name, nats_url=nats_server,
                                    artifacts_mode="object", setup_attempts=1)
                workers.append(asyncio.create_task(serve(
                    definition, settings, nats_server, env_name="test", stop=stop, ready=ready,
                    policy=StagePolicy(ack_wait=5.0, max_deliver=3))))
                await asyncio.wait_for(ready.wait(), 30)
            env = {**os.environ, "NATS_URL": nats_server, "CAPTIONBUS_HOME": str(tmp_path / "client"),
                   "PYTHONPATH": str(REPO)}
            started = time.monotonic()
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "captionbus", "submit", str(media), "-w", "subtitle", "-s", "en", "-t", "fr",
                "--wait", "--out", str(out), env=env, cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            stdout, stderr = await asyncio.wait_for(cli.communicate(), 120)
            took = time.monotonic() - started
            stop.set()
            for worker in workers:
                await asyncio.wait_for(worker, 30)
        await nc.close()
        return cli.returncode, stdout.decode(), stderr.decode(), took

    code, stdout, stderr, took = asyncio.run(asyncio.wait_for(main(), 240))
    said = stdout + stderr
    assert code == exitcodes.PARTIAL, said[-4000:]
    assert "branch fr failed" in said and "HF_HUB_OFFLINE is set" in said and "CAPTIONBUS_NLLB_MODEL" in said
    assert "job completed without: fr" in said
    assert took < 60, took  # the translation failed at once, not after minutes of hub retries
    record = json.loads((out / "talk.job.json").read_text())
    assert record["status"] == "completed" and set(record["failed_branches"]) == {"fr"}
    assert record["nodes"]["subtitle_gen_translated-fr"]["status"] == "abandoned"
    assert (out / "talk.srt").read_text() == "subtitle_gen srt \n" and (out / "talk.vtt").exists()
    assert not list(out.glob("*fr*"))
    for container in ("mp4", "mkv"):
        assert json.loads(next(out.glob(f"*.{container}")).read_text()) == ["subtitle_gen srt \n"]  # one track
    print(f"submit --wait, -t fr without NLLB weights: exit 3 after {took:.1f} s")
