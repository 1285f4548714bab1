"""The default path is the scalable one: a plain `captionbus run FILM` (the transcribe workflow,
no -w, no -s) cuts a film longer than CAPTIONBUS_CHUNK_ABOVE_S into chunks, one asr request
each, with the language detected once, and gives the words of the whole film decoded in one
request (`--chunk-s 0`, the escape hatch), which detects the language inside that request (one
chunk: no `language` request). The threshold is set low (20 s) so the film stays
short (~64 s); on real parts: nats-server, ffmpeg, Silero VAD, Whisper base in the whisperx env.

Both jobs run on the session's chunked fleet (tests/e2e/conftest.py `chunked_fleet`: the
transcribe workflow's stages, Whisper base on two asr workers, the stage cache off, its chunk
worker's CAPTIONBUS_CHUNK_ABOVE_S at 20): the plain `run FILM` joins it, as `run` joins a local
`captionbus up` serving the job's stages, instead of starting its own server, coordinator and
seven services (whisperx importing torch again); the reference decode (the whole film in one
request) is the job `run --chunk-s 0` submits (`chunk.target_s` 0, no -s), submitted to the
same fleet, so both decodes ran on the same workers. `--chunk-s` becoming `chunk.target_s` is
tests/unit/test_cli_job_options.py's; `run` starting its own stack is test_transcribe.py's."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jiwer

from tests.e2e.conftest import Stack, chunked_job
from tests.media import speech_film


def words_of(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def run(film: Path, out: Path, fleet: Stack, *args: str) -> tuple[dict, dict]:
    """`captionbus run FILM ARGS`, joining `fleet`: its transcript and job record."""
    done = subprocess.run([sys.executable, "-m", "captionbus", "run", str(film), "--out", str(out), *args],
                          env=fleet.run_env(), capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "joining captionbus up" in done.stderr, done.stderr[-3000:]
    transcript = json.loads((out / f"{film.stem}.transcript.json").read_text())
    return transcript, json.loads((out / f"{film.stem}.job.json").read_text())


def asr_nodes(record: dict) -> list[str]:
    return sorted((n for n in record["nodes"] if n.startswith("asr-")), key=lambda n: int(n.split("-")[1]))


def test_default_run_of_a_film_above_the_threshold_chunks_and_gives_the_unchunked_words(tmp_path, chunked_fleet):
    film, spoken = speech_film(tmp_path / "film.mp4", repeat=2)
    chunked, record = run(film, tmp_path / "default", chunked_fleet)
    # What `run FILM --chunk-s 0` submits, decoded afresh (the fleet's stage cache is off).
    whole, whole_record, _ = chunked_job(chunked_fleet, film, tmp_path / "whole", "transcribe", 0,
                                         source_language=None)

    items = asr_nodes(record)
    assert record["spec"]["workflow"] == "transcribe" and len(items) >= 2, items  # the default path cut the film
    assert all(record["nodes"][n]["status"] == "completed" and record["nodes"][n]["attempt"] == 1 for n in items)
    assert record["nodes"]["chunk"]["items"] == {"chunks": len(items)}
    # The language was detected once, by the `language` node, and every chunk decoded with it.
    assert record["nodes"]["language"]["status"] == "completed"
    assert record["language"]["code"] == "en" and record["language"]["detected"] is True
    assert chunked["language"] == whole["language"] == "en"
    assert asr_nodes(whole_record) == ["asr-0"]  # --chunk-s 0: one request for the whole film
    # One chunk: no detection request; asr-0 detected in its own request, then decoded.
    assert whole_record["nodes"]["language"]["status"] == "skipped" and whole_record["nodes"]["language"]["attempt"] == 0
    assert sorted(n for n, node in whole_record["nodes"].items() if node["stage"] == "asr") == ["asr-0", "language"]
    assert whole["language"] == "en" and whole["language_probability"] > 0.5  # detected in asr-0

    # Word for word the same as the whole film in one request, with the same word times.
    def timed(transcript: dict) -> list[tuple[str, float]]:
        return [(" ".join(words_of(w["text"])), w["start"]) for s in transcript["segments"] for w in s["words"]]

    assert [w for w, _ in timed(chunked)] == [w for w, _ in timed(whole)]
    assert max(abs(a - b) for (_, a), (_, b) in zip(timed(chunked), timed(whole))) <= 0.02
    heard = " ".join(w for w, _ in timed(chunked))
    assert jiwer.wer(" ".join(words_of(spoken)), heard) < 0.2, heard  # and it is the film's speech
