"""The main job, as a user runs it: `captionbus run video.mp4` on the embedded default."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jiwer
import pysubs2

from tests.media import ENGLISH_SENTENCE, ffprobe_json, speech_video


def words_of(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def test_run_transcribes_a_video_into_subtitles_and_muxed_videos(tmp_path, stage_envs, whisper_model):
    video, spoken = speech_video(tmp_path / "talk.mp4", ENGLISH_SENTENCE)
    out = tmp_path / "out"
    env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home")}
    env.pop("NATS_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "captionbus", "run", str(video), "-s", "en", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [Path(line) for line in done.stdout.split() if line.strip()]
    assert all(p.exists() for p in printed)

    srt, vtt = out / "talk.srt", out / "talk.vtt"
    mp4, mkv = out / "talk.subtitled.mp4", out / "talk.subtitled.mkv"
    for path in (srt, vtt, mp4, mkv):
        assert path.exists() and path.stat().st_size > 0, f"missing {path.name}; have {sorted(os.listdir(out))}"

    subs = pysubs2.load(str(srt))
    heard = " ".join(event.plaintext.replace("\n", " ") for event in subs)
    wer = jiwer.wer(words_of(spoken), words_of(heard))
    assert wer <= 0.25, f"WER {wer:.2f}: heard {heard!r}"
    assert pysubs2.load(str(vtt))[0].start == subs[0].start

    source = ffprobe_json(video)
    for muxed, codec in ((mp4, "mov_text"), (mkv, "subrip")):
        streams = ffprobe_json(muxed)["streams"]
        subtitle = [s for s in streams if s["codec_type"] == "subtitle"]
        assert len(subtitle) == 1 and subtitle[0]["codec_name"] == codec
        assert subtitle[0]["tags"]["language"] == "eng"
        # Copied, not re-encoded: same codecs as the source.
        for kind in ("video", "audio"):
            before = [s["codec_name"] for s in source["streams"] if s["codec_type"] == kind]
            after = [s["codec_name"] for s in streams if s["codec_type"] == kind]
            assert before == after

    record = json.loads((out / "talk.job.json").read_text())
    assert record["status"] == "completed"
    assert record["language"]["code"] == "en" and record["language"]["detected"] is False
    assert "language: en (given with -s)" in done.stderr
    # one asr request (asr-0): a clip is one chunk, under CAPTIONBUS_CHUNK_ABOVE_S
    asr_worker, demux_worker = record["nodes"]["asr-0"]["worker"], record["nodes"]["demux"]["worker"]
    assert asr_worker["env"] == "whisperx" and demux_worker["env"] == "common"
    assert asr_worker["pid"] != demux_worker["pid"] != str(os.getpid())


def test_run_on_bad_input_fails_fast_with_one_line(tmp_path, stage_envs, whisper_model):
    notes = tmp_path / "notes.mp4"
    notes.write_text("these are my meeting notes, not a video\n")
    env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home")}
    env.pop("NATS_URL", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "captionbus", "run", str(notes)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 30
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not a media file" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def processes_using(home: Path) -> list[int]:
    """Pids whose working dir or command line is inside `home` (our services and server)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(home)) or str(home) in cmdline:
            found.append(int(proc.name))
    return found


def test_killing_run_leaves_no_services_or_server_behind(tmp_path, stage_envs, whisper_model):
    video, _ = speech_video(tmp_path / "talk.mp4", ENGLISH_SENTENCE)
    home = tmp_path / "home"
    env = {**os.environ, "CAPTIONBUS_HOME": str(home)}
    env.pop("NATS_URL", None)
    run = subprocess.Popen([sys.executable, "-m", "captionbus", "run", str(video), "--out", str(tmp_path / "o")],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(processes_using(home)) < 5 and time.monotonic() < deadline:  # server + 4 services
        time.sleep(0.2)
    assert len(processes_using(home)) >= 5
    run.kill()
    run.wait()
    deadline = time.monotonic() + 30
    while processes_using(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(home) == []


def test_run_with_a_model_that_cannot_load_ends_with_its_reason(tmp_path, stage_envs):
    """The ASR model is not on this host: the job fails within two minutes with setup's one-line
    reason and where the log is; no log tail, no endless restarts, no 0% bar forever."""
    video, _ = speech_video(tmp_path / "talk.mp4", ENGLISH_SENTENCE)
    no_model = tmp_path / "no-model-here"
    no_model.mkdir()
    env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home"), "CAPTIONBUS_ASR_MODEL": str(no_model),
           "CAPTIONBUS_SETUP_ATTEMPTS": "2"}
    env.pop("NATS_URL", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "captionbus", "run", str(video), "-s", "en",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert time.monotonic() - started < 120, done.stderr[-2000:]
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "asr cannot be served on host" in errors[0] and str(no_model) in errors[0], errors[0]
    assert "Traceback" not in done.stderr and len(done.stderr) < 4000
