"""`captionbus run --speakers auto` as a user runs it (issue 21): a ~35 s dialogue of three
recorded human voices (tests/speakers_media.py: Dutch and Czech actors, turns with no gap and a
speaker coming back), muxed into an mp4, through the `chunked` workflow cut into ~10 s chunks:
one asr request per chunk, one diarization request for the whole film, transcript_join putting
the speakers on the words. On real parts: nats-server, ffmpeg, Silero VAD, Whisper base
(whisperx env), CAM++ (diarization env).

What is checked against the dialogue's ground truth: every timed word has a speaker; the words
inside each reference turn carry one label per true speaker, the same label wherever that voice
speaks again (also in another chunk), three labels in all, numbered in order of first appearance;
the speaker of each segment is one of its words'. And the gateway's OpenAI door, through the
official `openai` client: `models.list` names gpt-4o-transcribe-diarize while a diarization worker
is up, and `response_format=diarized_json` answers OpenAI's shape with the same voices as A, B, C."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import openai
import pytest

from captionbus.gateway.app import GatewayConfig
from captionbus.gateway.keys import KeyRing, add_key
from captionbus.stack import stop_services
from tests import speakers_media
from tests.dashboardtools import lane_of, start_dashboard
from tests.envtools import built_env
from tests.gatewaytools import running_gateway

PLAN = [("nl-small", 2, 0.5), ("cs-big", 2, 0.3), ("nl-big", 2, 0.0), ("nl-small", 1, 0.6),
        ("cs-big", 1, 0.0), ("nl-big", 1, 0.4), ("nl-small", 1, 0.0)]


@pytest.fixture(scope="module")
def dialogue_film(tmp_path_factory) -> tuple[Path, list[speakers_media.Turn]]:
    root = tmp_path_factory.mktemp("speakers")
    wav = root / "dialogue.wav"
    truth = speakers_media.make(wav, PLAN, seed=3)
    film = root / "dialogue.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "color=black:s=160x90:r=25",
                    "-i", str(wav), "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
                    str(film)], check=True, timeout=300)
    return film, truth


def test_run_with_speakers_labels_every_word_consistently_across_chunks(tmp_path, dialogue_film, door_stack):
    """`run` on a host where the stack serving every stage of the job runs (door_stack: the
    session's transcribe stack plus a diarization worker), which it joins as it joins a local
    `captionbus up` (README: run), instead of starting a server, a coordinator and eight services
    of its own (whisperx and the diarization env importing torch) for this one job. `run`
    starting its own stack is tests/e2e/test_transcribe.py's."""
    film, truth = dialogue_film
    assert 25 <= truth[-1].end <= 60 and len({t.speaker for t in truth}) == 3
    out = tmp_path / "out"
    # a known speaker: the Czech man, from a clip of other lines of his (not in the film), as an mp3
    clip = speakers_media.reference_clip(tmp_path / "carl.wav", "cs-big", seed=3)
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(clip), str(clip.with_suffix(".mp3"))],
                   check=True, timeout=120)
    done = subprocess.run(
        [sys.executable, "-m", "captionbus", "run", str(film), "-w", "chunked", "--chunk-s", "10", "-s", "nl",
         "--speakers", "auto", "--speaker-ref", f"Carl={clip.with_suffix('.mp3')}", "--out", str(out)],
        env=door_stack.run_env(), capture_output=True, text=True, timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "joining captionbus up" in done.stderr, done.stderr[-3000:]
    record = json.loads((out / "dialogue.job.json").read_text())
    asr_chunks = [n for n in record["nodes"] if n.startswith("asr-")]
    assert len(asr_chunks) >= 2, record["nodes"].keys()  # the film was really cut
    assert [n for n in record["nodes"] if n.startswith("diarization")] == ["diarization"]  # one per film
    assert record["nodes"]["diarization"]["status"] == "completed"
    summary = record["nodes"]["diarization"]["speaker_turns"]  # of the record every role reads
    labels = [s["label"] for s in summary["speakers"]]
    lane = [{"start": start, "end": end, "speaker": labels[n]} for start, end, n in summary["turns"]]
    assert summary["turns_total"] == len(lane) >= 3  # every turn listed

    transcript = json.loads((out / "dialogue.transcript.json").read_text())
    words = [w for s in transcript["segments"] for w in s["words"] if w["start"] is not None]
    assert len(words) >= 30, transcript
    assert all(w["speaker"] is not None for w in words), [w for w in words if w["speaker"] is None]
    for segment in transcript["segments"]:
        assert segment["speaker"] in {w["speaker"] for w in segment["words"]}

    assert {w["speaker"] for w in words} == set(labels) and labels == ["SPEAKER_00", "Carl", "SPEAKER_02"]
    check_words_follow_turns(words, lane)
    # the named voice is Carl, the others keep their labels
    check_voices(truth, [(w["start"], w["end"], w["speaker"]) for w in words],
                 ["SPEAKER_00", "Carl", "SPEAKER_02"])
    vtt = (out / "dialogue.vtt").read_text()
    srt = (out / "dialogue.srt").read_text()
    assert "<v Carl>" in vtt and "<v SPEAKER_00>" in vtt
    assert "[Carl] " in srt and "[SPEAKER" not in srt  # SDH: the known speaker is named, the others are not


def test_a_bad_reference_clip_is_refused_before_anything(tmp_path, dialogue_film):
    film, _ = dialogue_film
    clip = speakers_media.write_wav(tmp_path / "one-second.wav", speakers_media.np.zeros(16000))
    env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "captionbus", "run", str(film), "--speaker-ref", f"Carl={clip}",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: --speaker-ref Carl={clip} is 1.0 s long; a reference clip is 2-10 s of one speaker"]
    assert not (tmp_path / "home" / "nats").exists()  # refused before a server started


def check_voices(truth: list[speakers_media.Turn], spans: list[tuple[float, float, str]], labels: list[str]) -> None:
    """Each reference turn's spans (words, segments) -> their majority label: one label per voice
    wherever it speaks, `labels` in order of first appearance, no other label."""
    heard = []
    for turn in truth:
        inside = [label for start, end, label in spans if turn.start <= (start + end) / 2 <= turn.end]
        if inside:
            label, votes = Counter(inside).most_common(1)[0]
            heard.append((turn.speaker, label, votes / len(inside)))
    assert len(heard) >= len(truth) - 2, (heard, truth)
    assert all(share >= 0.6 for _, _, share in heard), heard
    mapping = {}
    for who, label, _ in heard:
        mapping.setdefault(who, label)
        assert mapping[who] == label, f"{who} is {mapping[who]} and {label}: {heard}"
    first_seen = list(dict.fromkeys(who for who, _, _ in heard))
    assert [mapping[who] for who in first_seen] == labels, mapping  # three voices, three labels, in order
    assert {label for _, _, label in spans} == set(labels)


@pytest.fixture(scope="module")
def door_stack(stack):
    """The session's transcribe stack (tests/e2e/conftest.py) serving the `speech` workflow with
    --speakers: a diarization worker is added for this module and stopped after it. It was a
    stack of its own (server, coordinator, six services, asr importing torch and loading Whisper
    again) for the same stages."""
    from captionbus import models

    built_env("diarization")
    models.ensure_campplus()
    diarization = stack.start_stage("diarization")
    try:
        stack.wait_ready([diarization])
        yield stack
    finally:
        stop_services([diarization])
        stack.services.remove(diarization)


@pytest.fixture(scope="module")
def door(door_stack, tmp_path_factory):
    """The gateway in front of door_stack, as the official client sees it."""
    keys = tmp_path_factory.mktemp("door") / "keys"
    key = add_key(keys, "tool")
    config = GatewayConfig(settings=door_stack.settings("gateway"), nats_url=door_stack.url,
                           keys=KeyRing.load(keys), job_timeout_s=600)
    with running_gateway(config) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)


def test_openai_client_gets_diarized_json_and_the_dashboard_draws_its_speakers(door, door_stack, dialogue_film,
                                                                               tmp_path):
    film, truth = dialogue_film
    assert "gpt-4o-transcribe-diarize" in [m.id for m in door.models.list().data]
    wav = film.with_suffix(".wav")
    with wav.open("rb") as f:
        with pytest.raises(openai.BadRequestError, match="diarized_json needs model gpt-4o-transcribe-diarize"):
            door.audio.transcriptions.create(model="whisper-1", file=f, response_format="diarized_json")
    with wav.open("rb") as f:
        raw = door.audio.transcriptions.with_raw_response.create(model="gpt-4o-transcribe-diarize", file=f,
                                                                 language="nl", response_format="diarized_json")
    result = raw.parse()
    assert result.task == "transcribe" and abs(result.duration - truth[-1].end) < 2.0 and result.text
    assert result.segments and all(s.type == "transcript.text.segment" for s in result.segments)
    assert [s.id for s in result.segments] == [f"seg_{n}" for n in range(len(result.segments))]
    check_voices(truth, [(s.start, s.end, s.speaker) for s in result.segments], ["A", "B", "C"])
    check_dashboard_lane(door_stack, raw.headers["x-captionbus-job"], tmp_path)


def check_dashboard_lane(stack, job_id: str, tmp_path: Path) -> None:
    """The read-only dashboard (no --downloads: it reads no artifact) draws the speaker lane of a
    job the real diarization stage ran from the job state alone, and it is one truth with the
    outputs: its turns are turns.json's, and every timed word of transcript.json carries the label
    of the lane's turn that covers most of it."""
    state = stack.job_state(job_id)
    node = next(name for name, n in state.nodes.items() if n.stage == "diarization")
    files = stack.fetch({"turns": state.nodes[node].outputs["turns"], "transcript": state.outputs["transcript"]},
                        tmp_path / "outputs")
    turns = json.loads(Path(files["turns"]).read_text())
    words = [w for seg in json.loads(Path(files["transcript"]).read_text())["segments"] for w in seg["words"]
             if w.get("start") is not None]
    dashboard, base = start_dashboard(stack.url, tmp_path / "dash", tmp_path / "dash.log")
    try:
        answer = lane_of(base, job_id)
        assert answer.status_code == 200, answer.text
        lane = answer.json()
    finally:
        dashboard.terminate()
        dashboard.wait(20)
    assert lane["node"] == node and lane["turns"] == turns["turns"] and not lane["turns_truncated"]
    assert [s["label"] for s in lane["speakers"]] == turns["speakers"] and len(turns["speakers"]) == 3
    assert {w["speaker"] for w in words} == set(turns["speakers"])
    check_words_follow_turns(words, lane["turns"])


def check_words_follow_turns(words: list[dict], turns: list[dict], max_gap_s: float = 0.5) -> None:
    """Every timed word carries the label of the turn that covers most of it; a word no turn reaches
    (a pause the diarizer left out) carries the nearest turn's label when that turn is within
    `max_gap_s` (core.speakers' rule), else none. Written out here rather than calling the product's
    rule, so the test is an oracle for it."""
    for w in words:
        cover = {t["speaker"]: 0.0 for t in turns}
        for t in turns:
            cover[t["speaker"]] += max(0.0, min(w["end"], t["end"]) - max(w["start"], t["start"]))
        if max(cover.values()) > 0:
            assert w["speaker"] == max(cover, key=cover.get), (w, cover)
            continue
        gaps = [(max(t["start"] - w["end"], w["start"] - t["end"]), t["speaker"]) for t in turns]
        closest = min(gap for gap, _ in gaps)
        expected = {speaker for gap, speaker in gaps if gap == closest} if closest <= max_gap_s else {None}
        assert w.get("speaker") in expected, (w, closest, expected)


def data_url(wav: Path, suffix: str) -> str:
    encoded = wav.with_suffix(suffix)
    if encoded != wav:
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(wav), str(encoded)], check=True,
                       timeout=120)
    kind = {".mp3": "audio/mpeg", ".wav": "audio/wav", ".ogg": "audio/ogg"}[suffix]
    return f"data:{kind};base64," + base64.b64encode(encoded.read_bytes()).decode()


def test_openai_client_names_known_speakers(door, dialogue_film, tmp_path):
    """OpenAI's known_speaker_names[] / known_speaker_references[] (data URLs of 2-10 s, here an
    mp3 and a wav of other lines of two of the three actors): their voices come back under those
    names, the third as a letter."""
    film, truth = dialogue_film
    anna = data_url(speakers_media.reference_clip(tmp_path / "anna.wav", "nl-small", seed=3), ".mp3")
    ben = data_url(speakers_media.reference_clip(tmp_path / "ben.wav", "nl-big", seed=3, lines=3), ".wav")
    with film.with_suffix(".wav").open("rb") as f:
        result = door.audio.transcriptions.create(
            model="gpt-4o-transcribe-diarize", file=f, language="nl", response_format="diarized_json",
            known_speaker_names=["Anna", "Ben"], known_speaker_references=[anna, ben])
    check_voices(truth, [(s.start, s.end, s.speaker) for s in result.segments], ["Anna", "B", "Ben"])

    short = data_url(speakers_media.write_wav(tmp_path / "short.wav", speakers_media.np.zeros(16000)), ".wav")
    for kwargs, message in [
        (dict(known_speaker_names=["Anna"], known_speaker_references=[short]),
         "known_speaker_references[0] (Anna) is 1.0 s long; a reference clip is 2-10 s of one speaker"),
        (dict(known_speaker_names=["Anna", "Ben"], known_speaker_references=[anna]),
         "2 known_speaker_names[] and 1 known_speaker_references[]"),
        (dict(known_speaker_names=["Anna"], known_speaker_references=["https://example.com/anna.wav"]),
         "known_speaker_references[0] (Anna) is not a data URL"),
        (dict(known_speaker_names=list("abcde"), known_speaker_references=[anna] * 5), "5 known speakers; at most 4"),
    ]:
        with film.with_suffix(".wav").open("rb") as f, pytest.raises(openai.BadRequestError, match=re.escape(message)):
            door.audio.transcriptions.create(model="gpt-4o-transcribe-diarize", file=f,
                                             response_format="diarized_json", **kwargs)
    with film.with_suffix(".wav").open("rb") as f, pytest.raises(
            openai.BadRequestError, match="known_speaker_names.. / known_speaker_references.. need model gpt-4o-transcribe-diarize"):
        door.audio.transcriptions.create(model="whisper-1", file=f, known_speaker_names=["Anna"],
                                         known_speaker_references=[anna])
