"""Faults on a running fleet in miniature (see conftest.Stack): bad input, crashed workers,
a restarted coordinator, concurrent jobs, duplicate completions."""
from __future__ import annotations

import os
import re
import signal
import time

import pysubs2
import pytest

from captionbus.client import publish_event
from captionbus.contracts.events import LOADING_MODEL
from captionbus.core.bus import connect
from tests.e2e.conftest import run_async
from tests.media import (
    ENGLISH_SENTENCE,
    empty_file,
    hls_playlist,
    speech_video,
    text_named_mp4,
    video_without_audio,
)

OTHER_SENTENCE = "Rivers carry cold water from the northern mountains down to the wide green valley"
TWO_SENTENCES = f"{ENGLISH_SENTENCE} {OTHER_SENTENCE}"


def words_of(text: str) -> set[str]:
    return set(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def srt_text(path) -> str:
    return " ".join(e.plaintext.replace("\n", " ") for e in pysubs2.load(str(path)))


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: empty_file(d / "empty.mp4"), r"empty"),
        (lambda d: text_named_mp4(d / "notes.mp4"), r"not a media file"),
        (lambda d: video_without_audio(d / "silent.mp4"), r"no audio"),
        (lambda d: hls_playlist(d / "list.m3u8", speech_video(d / "target.mp4")[0]), r"playlist|not allowed|refus"),
    ],
    ids=["empty", "text-as-mp4", "no-audio", "hls-playlist"],
)
def test_bad_input_fails_fast_with_a_clear_reason_and_services_stay_up(stack, tmp_path, make, reason):
    media = make(tmp_path)
    started = time.monotonic()
    job_id = stack.submit(media)
    final = stack.wait_end(job_id, timeout=30)[-1]
    assert time.monotonic() - started < 30
    assert final.kind == "failed"
    assert re.search(reason, final.reason, re.I), final.reason
    assert "Traceback" not in final.reason and "\n" not in final.reason
    assert all(svc.alive() for svc in stack.services)


def test_concurrent_jobs_never_mix_outputs(stack, tmp_path):
    first, text_a = speech_video(tmp_path / "a.mp4", ENGLISH_SENTENCE)
    second, text_b = speech_video(tmp_path / "b.mp4", OTHER_SENTENCE)
    job_a, job_b = stack.submit(first, source_language="en"), stack.submit(second, source_language="en")
    results = {}
    for job_id, text in ((job_a, text_a), (job_b, text_b)):
        final = stack.wait_end(job_id)[-1]
        assert final.kind == "completed", getattr(final, "reason", "")
        files = stack.fetch(final.outputs, tmp_path / job_id)
        results[job_id] = words_of(srt_text(files["srt"]))
    own_a, own_b = words_of(text_a) - words_of(text_b), words_of(text_b) - words_of(text_a)
    assert len(results[job_a] & own_a) > len(own_a) / 2 and not results[job_a] & own_b
    assert len(results[job_b] & own_b) > len(own_b) / 2 and not results[job_b] & own_a


def test_asr_worker_killed_mid_job_the_request_is_redelivered(stack, tmp_path):
    """Killed at its first progress report (the stack's one asr worker holds the request and is
    decoding), not a fixed second after the request: so the clip needs only outlast that report
    (two sentences, not six: the replacement decodes all of it again, 14 s of speech instead of
    42 s), and the completion's delivery count shows the request really came back."""
    video, _ = speech_video(tmp_path / "two.mp4", TWO_SENTENCES)
    asr = next(s for s in stack.services if s.stage == "asr" and s.alive())
    job_id = stack.submit(video, source_language="en")
    stack.wait_for(job_id, lambda e: e.kind == "stage_progress" and e.node == "asr-0" and e.fraction < 1.0
                   and e.message != LOADING_MODEL, timeout=120)
    os.kill(asr.process.pid, signal.SIGKILL)
    asr.process.wait(10)
    replacement = stack.start_stage("asr", replica=1)
    stack.wait_ready([replacement])
    events = stack.wait_end(job_id)
    assert events[-1].kind == "completed", getattr(events[-1], "reason", "")
    completed = [e for e in events if e.kind == "stage_completed" and e.node == "asr-0"]
    # The replacement finished it: the killed worker's request came back, nothing was lost.
    assert completed and completed[-1].worker["pid"] == str(replacement.process.pid)
    assert completed[-1].metrics["delivery"] >= 2, completed[-1].metrics


def test_coordinator_restarted_mid_job_the_job_completes(stack, tmp_path):
    video, _ = speech_video(tmp_path / "c.mp4", ENGLISH_SENTENCE)
    job_id = stack.submit(video, source_language="en")
    stack.wait_for(job_id, lambda e: e.kind == "stage_completed" and e.node == "demux", timeout=60)
    stack.stop_coordinator(signal.SIGKILL)
    time.sleep(1.0)
    stack.start_coordinator()
    final = stack.wait_end(job_id)[-1]
    assert final.kind == "completed", getattr(final, "reason", "")


def test_a_duplicate_completion_is_applied_once(stack, tmp_path):
    video, _ = speech_video(tmp_path / "d.mp4", " ".join([ENGLISH_SENTENCE] * 3))
    job_id = stack.submit(video, source_language="en")
    seen = stack.wait_for(job_id, lambda e: e.kind == "stage_requested" and e.node == "asr-0", timeout=60)
    demux_done = next(e for e in seen if e.kind == "stage_completed" and e.node == "demux")

    async def replay():
        nc = await connect(stack.url, "test-duplicate")
        # A second copy of demux's completion while asr works (a redelivered request answered
        # twice): it must not re-request asr or change what demux produced.
        await publish_event(nc.jetstream(), demux_done.model_copy(update={"event_id": "late-copy"}))
        await nc.close()

    run_async(replay())
    events = stack.wait_end(job_id)
    assert events[-1].kind == "completed", getattr(events[-1], "reason", "")
    kinds = [(e.kind, getattr(e, "node", None)) for e in events]
    assert "late-copy" in [e.event_id for e in events]
    assert kinds.count(("stage_requested", "asr-0")) == 1
    assert kinds.count(("completed", None)) == 1
    state = stack.job_state(job_id)
    assert state.nodes["demux"].outputs == demux_done.outputs and state.nodes["asr-0"].attempt == 1
