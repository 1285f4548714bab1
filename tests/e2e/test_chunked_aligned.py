"""Alignment per chunk end to end (the `chunked_aligned` workflow) on real parts (nats-server,
ffmpeg, Silero VAD, Whisper base and the alignment stage in the whisperx env, a tiny random
wav2vec2 model from tests/model_factory/wav2vec2.py; the session's chunked fleet,
tests/e2e/conftest.py) on an espeak-ng film with pauses, once cut into chunks at silences and
once as one chunk. Random alignment weights give valid CTC paths, not accurate times: what is
compared is chunked against unchunked."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from captionbus.stack import stop_services
from tests.e2e.test_chunked import timed_words
from tests.e2e.conftest import chunked_jobs
from tests.envtools import built_env
from tests.media import speech_film


def item_nodes(record: dict, stage: str) -> list[str]:
    return sorted((n for n in record["nodes"] if n.startswith(f"{stage}-")), key=lambda n: int(n.split("-")[1]))


@pytest.fixture(scope="module")
def aligned_runs(tmp_path_factory, chunked_fleet):
    root = tmp_path_factory.mktemp("chunked_aligned")
    film, _ = speech_film(root / "film.mp4", repeat=2)
    sizes = (0, 20)  # submitted together, the single request first (conftest.chunked_jobs)
    done = chunked_jobs(chunked_fleet, film, [(root / f"out{chunk_s}", "chunked_aligned", chunk_s) for chunk_s in sizes])
    return {str(chunk_s): run[:2] for chunk_s, run in zip(sizes, done)}


def test_chunked_aligned_word_times_equal_unchunked_aligned_each_chunk_aligned_once(aligned_runs):
    (chunked, record), (whole, whole_record) = aligned_runs["20"], aligned_runs["0"]
    assert chunked["aligned"] and whole["aligned"]
    chunks = item_nodes(record, "asr")
    assert len(chunks) >= 2, chunks  # the film was really cut
    # one alignment node per chunk, each requested once and completed
    assert item_nodes(record, "alignment") == [f"alignment-{i}" for i in range(len(chunks))]
    for node in item_nodes(record, "alignment"):
        assert record["nodes"][node]["status"] == "completed" and record["nodes"][node]["attempt"] == 1, record["nodes"][node]
    assert item_nodes(whole_record, "alignment") == ["alignment-0"]
    a, b = timed_words(chunked), timed_words(whole)
    assert [w for w, _ in a] == [w for w, _ in b] and len(a) > 40
    shifts = [abs(x - y) for (_, x), (_, y) in zip(a, b)]
    print(f"{len(a)} words, {len(chunks)} chunks; largest word start difference {max(shifts) * 1000:.1f} ms")
    assert max(shifts) <= 0.02, shifts


def test_chunks_cut_from_the_pyannote_vad_whisperx_uses(tmp_path, chunked_fleet):
    """`--vad pyannote`: the chunk stage cuts the regions of vad_pyannote (the segmentation
    model whisperx's own VAD uses, looked up in CAPTIONBUS_MODELS) instead of Silero's; the film
    still reads back in full. A `run`, joining the session's chunked fleet with a vad_pyannote
    worker added (as `run` joins a local `captionbus up` serving the job's stages) instead of
    starting a server, a coordinator and seven services, whisperx importing torch again."""
    from captionbus.models import ensure_pyannote_segmentation

    ensure_pyannote_segmentation()
    built_env("pyannote")
    vad = chunked_fleet.start_stage("vad_pyannote")
    try:
        film, spoken = speech_film(tmp_path / "film.mp4")
        chunked_fleet.wait_ready([vad])
        out = tmp_path / "out"
        done = subprocess.run(
            [sys.executable, "-m", "captionbus", "run", str(film), "-w", "chunked", "-s", "en", "--vad", "pyannote",
             "--chunk-s", "10", "-o", "asr.cache=false", "--out", str(out)],
            env=chunked_fleet.run_env(), capture_output=True, text=True, timeout=900)
    finally:
        stop_services([vad])
        chunked_fleet.services.remove(vad)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "joining captionbus up" in done.stderr, done.stderr[-3000:]
    record = json.loads((out / "film.job.json").read_text())
    assert record["nodes"]["vad_pyannote"]["status"] == "completed" and record["nodes"]["vad"]["status"] == "skipped"
    assert len(item_nodes(record, "asr")) >= 2
    import jiwer
    from tests.e2e.test_chunked import words_of
    heard = " ".join(w for w, _ in timed_words(json.loads((out / "film.transcript.json").read_text())))
    assert jiwer.wer(" ".join(words_of(spoken)), heard) < 0.2, heard
