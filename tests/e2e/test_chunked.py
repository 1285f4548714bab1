"""One film across several asr workers (the `chunked` workflow): speech cut into chunks at
silences, one asr request per chunk, joined in order. On real parts: nats-server, ffmpeg,
Silero VAD, Whisper base in the whisperx env, espeak-ng speech with pauses of 0.4-1.2 s, so
chunk cuts land right next to speech."""
from __future__ import annotations

import difflib
import json
import os
import re
import signal
import statistics
import time

import jiwer
import pytest

from tests.e2e.conftest import chunked_jobs
from tests.media import speech_film


def words_of(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def timed_words(transcript: dict) -> list[tuple[str, float]]:
    return [(" ".join(words_of(w["text"])), w["start"]) for s in transcript["segments"] for w in s["words"]]


def cues(srt: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of every SRT cue, in seconds."""
    def seconds(stamp: str) -> float:
        h, m, rest = stamp.strip().split(":")
        return int(h) * 3600 + int(m) * 60 + float(rest.replace(",", "."))

    out = []
    for block in srt.strip().split("\n\n"):
        lines = block.strip().splitlines()
        start, end = lines[1].split("-->")
        out.append((seconds(start), seconds(end), " ".join(lines[2:])))
    return out


@pytest.fixture(scope="module")
def film_runs(tmp_path_factory, chunked_fleet):
    """The same 96 s film through the `chunked` workflow: chunks of ~20 s (cut where the whole
    film's decode starts a Whisper window), of ~5 s (max_s 10 forces cuts inside windows), and
    in one chunk; on the session's chunked fleet (tests/e2e/conftest.py)."""
    root = tmp_path_factory.mktemp("chunked")
    film, spoken = speech_film(root / "film.mp4", repeat=3)
    # Submitted together, the single request first (chunked_jobs): it was one worker decoding
    # 96 s while the other idled.
    sizes = (0, 20, 5)
    done = chunked_jobs(chunked_fleet, film, [(root / f"out{chunk_s}", "chunked", chunk_s) for chunk_s in sizes])
    return spoken, {str(chunk_s): (transcript, record, cues(files["srt"].read_text()))
                    for chunk_s, (transcript, record, files) in zip(sizes, done)}


def chunk_nodes(record: dict) -> list[str]:
    return sorted((n for n in record["nodes"] if n.startswith("asr-")), key=lambda n: int(n.split("-")[1]))


def test_chunks_cut_where_whisper_windows_start_give_the_unchunked_transcript(film_runs):
    spoken, runs = film_runs
    (chunked, record, chunked_cues), (whole, whole_record, whole_cues) = runs["20"], runs["0"]
    items = chunk_nodes(record)
    assert len(items) >= 3, items  # the film was really cut
    assert all(record["nodes"][n]["status"] == "completed" for n in items)
    assert chunk_nodes(whole_record) == ["asr-0"]
    # -s given: the chunk stage wrote the language, no detection request went to the asr queue
    assert record["nodes"]["language"]["status"] == "skipped" and "language" in record["nodes"]["chunk"]["outputs"]
    # Word for word the same (the issue allows WER +0.005), the same word times and the same
    # cues within 20 ms.
    assert [w for w, _ in timed_words(chunked)] == [w for w, _ in timed_words(whole)]
    shifts = [abs(a - b) for (_, a), (_, b) in zip(timed_words(chunked), timed_words(whole))]
    assert max(shifts) <= 0.02, shifts
    assert [c[2] for c in chunked_cues] == [c[2] for c in whole_cues]
    assert max(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a, b in zip(chunked_cues, whole_cues)) <= 0.02
    heard = " ".join(w for w, _ in timed_words(chunked))
    assert jiwer.wer(" ".join(words_of(spoken)), heard) < 0.2, heard  # and it is the film's speech


def test_short_chunks_cut_inside_windows_drop_or_double_no_sentence(film_runs):
    spoken, runs = film_runs
    (chunked, record, _), (whole, _, _) = runs["5"], runs["0"]
    assert len(chunk_nodes(record)) >= 9  # at most 10 s each (max_s = 2 x 5 s): cuts inside Whisper windows
    heard = [w for w, _ in timed_words(chunked)]
    reference = [w for w, _ in timed_words(whole)]
    # No sentence dropped or doubled at a boundary: each sentence's distinctive word is heard as
    # often as the film says it (three times), in film order.
    distinctive = ("fox", "sailors", "kite", "sunday", "train", "river", "window", "knight")
    assert {w: heard.count(w) for w in distinctive} == {w: 3 for w in distinctive}, " ".join(heard)
    assert [w for w in heard if w in distinctive] == [w for w in words_of(spoken) if w in distinctive]
    # Cut inside Whisper's windows a chunk is heard without its neighbours' context, and words
    # differ: measured WER 0.116 against 0.066 unchunked (+0.05) on this film, where 20 s chunks
    # (cut where windows start) give +0.000. Bounded here, not equal: the reason the plan cuts
    # only at window starts whenever max_s allows.
    wer_chunked, wer_whole = jiwer.wer(" ".join(words_of(spoken)), " ".join(heard)), jiwer.wer(
        " ".join(words_of(spoken)), " ".join(reference))
    assert wer_chunked <= wer_whole + 0.06, (wer_chunked, wer_whole, " ".join(heard))
    matcher = difflib.SequenceMatcher(a=heard, b=reference, autojunk=False)
    a, b = timed_words(chunked), timed_words(whole)
    shifts = [abs(a[m.a + i][1] - b[m.b + i][1]) for m in matcher.get_matching_blocks() for i in range(m.size)]
    assert statistics.median(shifts) <= 0.05, shifts


@pytest.fixture
def fleet(chunked_fleet):
    """The session's chunked fleet (tests/e2e/conftest.py): two asr workers of one thread each;
    a killed worker's request comes back after 6 s (CAPTIONBUS_ACK_WAIT)."""
    return chunked_fleet


def test_two_asr_workers_decode_chunks_of_one_film_at_the_same_time(fleet, tmp_path):
    """Runs before the kill test (same fleet). From the job's record only: each chunk says which
    worker ran it (pid) and when its handler ran (started_at / handled_at, Unix seconds); both
    workers took chunks and chunks of different workers ran at the same time. No timing ratio:
    overlap is what parallel decoding means, however loaded the machine is."""
    film, _ = speech_film(tmp_path / "film.mp4", repeat=2)
    job_id = fleet.submit(film, workflow="chunked", source_language="en", options={"chunk": {"target_s": 5}})
    events = fleet.wait_end(job_id, timeout=900)
    assert events[-1].kind == "completed", getattr(events[-1], "reason", "")
    state = fleet.job_state(job_id)
    chunks = [state.nodes[n] for n in state.nodes if n.startswith("asr-")]
    assert len(chunks) >= 6
    runs = [(n.worker["pid"], n.metrics["started_at"], n.metrics["handled_at"]) for n in chunks]
    pids = {pid for pid, _, _ in runs}
    assert pids == {str(s.process.pid) for s in fleet.services if s.stage == "asr"}, runs  # both took chunks
    overlaps = [(a, b) for a in runs for b in runs
                if a[0] < b[0] and a[1] < b[2] and b[1] < a[2]]  # different workers, intervals intersect
    assert overlaps, sorted(runs, key=lambda r: r[1])
    # Together the chunks were busy longer than the asr phase lasted: they ran side by side.
    busy = sum(end - start for _, start, end in runs)
    phase = max(end for _, _, end in runs) - min(start for _, start, _ in runs)
    assert busy > phase, (busy, phase)


def test_killing_one_of_two_asr_workers_mid_film_still_completes_every_chunk_once(fleet, tmp_path):
    film, spoken = speech_film(tmp_path / "film.mp4", repeat=2)
    job_id = fleet.submit(film, workflow="chunked", source_language="en", options={"chunk": {"target_s": 5}})
    fleet.wait_for(job_id, lambda e: e.kind == "stage_completed" and e.node.startswith("asr-"), timeout=600)
    time.sleep(1.0)  # the other worker is into its next chunk, this one too
    victim = [s for s in fleet.services if s.stage == "asr"][0]
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait(10)
    events = fleet.wait_end(job_id, timeout=900)
    assert events[-1].kind == "completed", getattr(events[-1], "reason", "")
    state = fleet.job_state(job_id)
    items = sorted((n for n in state.nodes if n.startswith("asr-")), key=lambda n: int(n.split("-")[1]))
    assert len(items) >= 6 and state.nodes["chunk"].items == {"chunks": len(items)}
    assert all(state.nodes[n].status.value == "completed" for n in items)
    survivor = [s for s in fleet.services if s.stage == "asr"][1]
    late = [e for e in events if e.kind == "stage_completed" and e.node.startswith("asr-")
            and e.worker.get("pid") == str(survivor.process.pid)]
    assert late, "the surviving worker finished nothing"
    transcript = json.loads(fleet.fetch(events[-1].outputs, tmp_path / "out")["transcript"].read_text())
    heard = words_of(" ".join(s["text"] for s in transcript["segments"]))
    # Every chunk exactly once: each sentence's distinctive word is there twice (the film says
    # every sentence twice), never three times.
    for word in ("sailors", "kite", "grandmother", "train", "children", "window", "teacher"):
        assert heard.count(word) <= 2, (word, " ".join(heard))
    assert sum(heard.count(w) for w in ("sailors", "kite", "grandmother", "train", "children", "window", "teacher")) >= 12
