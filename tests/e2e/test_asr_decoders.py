"""One asr process with two decoders sharing one model load (the `workers` option, what `run
--replicas 2` / `serve asr --replicas 2` start on a CPU host: captionbus.stack.replica_processes).
On real parts: nats-server, the coordinator, the chunked workflow's services, Whisper base in the
whisperx env, espeak-ng speech. Everything is read from the job's record (which worker ran each
chunk, with which decoder, and when) and from the workers' $SRV replies, never from a timing ratio:
overlap is what parallel decoding means, however loaded the machine is."""
from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.e2e.conftest import CHUNKED_STAGES, start_stack
from tests.media import speech_film

ENV = {"CAPTIONBUS_ASR_WORKERS": "2", "CAPTIONBUS_ASR_THREADS": "1", "CAPTIONBUS_STAGE_CACHE": "off",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, stage_envs, whisper_model):
    """The chunked workflow's stages, asr one process of two decoders of one thread each."""
    from captionbus.models import ensure_silero_vad

    ensure_silero_vad()
    # Ready when asr has loaded: importing torch and whisperx took over 180 s at load average 30.
    s = start_stack(tmp_path_factory.mktemp("decoders"), CHUNKED_STAGES, ENV, ready_timeout=900)
    try:
        yield s
    finally:
        s.close()


def timed_words(transcript: dict) -> list[tuple[str, float, float]]:
    return [(re.sub(r"[^a-z0-9' ]+", "", w["text"].lower()), w["start"], w["end"])
            for s in transcript["segments"] for w in s["words"]]


def submit_chunked(fleet, film, target_s: float) -> str:
    return fleet.submit(film, workflow="chunked", source_language="en", options={"chunk": {"target_s": target_s}})


def finished(fleet, job_id: str, out) -> tuple[list, dict]:
    """The job's asr chunk nodes (from its record) and its transcript, once it completed."""
    events = fleet.wait_end(job_id, timeout=900)
    assert events[-1].kind == "completed", getattr(events[-1], "reason", "")
    nodes = fleet.job_state(job_id).nodes
    transcript = json.loads(fleet.fetch(events[-1].outputs, out / job_id)["transcript"].read_text())
    return [nodes[n] for n in nodes if n.startswith("asr-")], transcript


def test_one_asr_process_decodes_two_chunks_of_a_film_at_once_after_one_model_load(shared, tmp_path):
    [asr] = [s for s in shared.services if s.stage == "asr"]
    film, _ = speech_film(tmp_path / "film.mp4", repeat=2)
    chunks, _ = finished(shared, submit_chunked(shared, film, 5), tmp_path)
    assert len(chunks) >= 6
    # One process ran every chunk: one worker id, the asr service's pid.
    assert {n.worker["worker_id"] for n in chunks} == {chunks[0].worker["worker_id"]}
    assert {n.worker["pid"] for n in chunks} == {str(asr.process.pid)}
    # Both decoders took chunks, and chunks of different decoders ran at the same time.
    runs = [(int(n.metrics["decoder"]), n.metrics["started_at"], n.metrics["handled_at"]) for n in chunks]
    assert {d for d, _, _ in runs} == {0, 1}, runs
    overlaps = [(a, b) for a in runs for b in runs if a[0] < b[0] and a[1] < b[2] and b[1] < a[2]]
    assert overlaps, sorted(runs, key=lambda r: r[1])
    # One model load: the process loaded Whisper once, with two CTranslate2 workers of one thread.
    loads = [json.loads(line) for line in asr.log_path.read_text().splitlines()
             if line.startswith("{") and '"asr model loaded"' in line]
    assert len(loads) == 1 and loads[0]["workers"] == 2 and loads[0]["threads"] == 1, loads
    assert len({n.metrics["model_load_s"] for n in chunks}) == 1  # every chunk's decoder came from that load

    # Words do not depend on which decoder ran a chunk or what ran beside it: chunks cut where the
    # whole film's decode starts a Whisper window (target 20 s; the 5 s above forces cuts inside
    # windows, where a word may differ: README) give the words and times of the film in one
    # chunk. The two jobs are submitted together, so they too decode side by side.
    cut, whole = submit_chunked(shared, film, 20), submit_chunked(shared, film, 600)
    (cut_chunks, cut_words), (whole_chunks, whole_words) = finished(shared, cut, tmp_path), finished(shared, whole, tmp_path)
    assert len(cut_chunks) >= 2 and len(whole_chunks) == 1
    assert timed_words(cut_words) == timed_words(whole_words)


def test_the_coordinator_counts_the_decoders_of_one_process_as_workers(shared):
    """$SRV metadata says slots 2; the coordinator's count (the window of a film's chunks in
    flight) is 2 for the one process, as it was for two processes of one decoder."""
    from captionbus.client import workers
    from captionbus.coordinator.service import Coordinator
    from captionbus.core.bus import connect

    async def go():
        nc = await connect(shared.url, "test-count")
        try:
            replies = await workers(nc, timeout=3.0, stage="asr")
            counted = await Coordinator(nc).count_workers(timeout=2.0)
        finally:
            await nc.close()
        return replies, counted

    replies, counted = asyncio.run(go())
    assert len(replies) == 1 and replies[0]["metadata"]["slots"] == "2", replies
    assert counted["asr"] == 2, counted
