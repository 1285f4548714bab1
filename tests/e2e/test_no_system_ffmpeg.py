"""`captionbus run` on a machine without a system FFmpeg: the demux and mux stages run the
imageio-ffmpeg wheel's binary and probe through PyAV (core/mediatools.py, services/media.py).

The test media is made first, with whatever ffmpeg the test process has; then the run gets a
PATH from which `ffmpeg` and `ffprobe` are hidden, so every FFmpeg call of the job comes from the
`common` environment's wheels."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jiwer
import pysubs2

from tests.media import ENGLISH_SENTENCE, ffprobe_json, path_without, speech_video


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def test_run_without_ffmpeg_or_ffprobe_on_path(tmp_path, stage_envs, whisper_model):
    video, spoken = speech_video(tmp_path / "talk.mp4", ENGLISH_SENTENCE)
    hidden = path_without(("ffmpeg", "ffprobe"), tmp_path / "shadow")
    assert shutil.which("ffmpeg", path=hidden) is None and shutil.which("ffprobe", path=hidden) is None
    out = tmp_path / "out"
    env = {**os.environ, "PATH": hidden, "CAPTIONBUS_HOME": str(tmp_path / "home")}
    for name in ("NATS_URL", "CAPTIONBUS_FFMPEG", "CAPTIONBUS_FFPROBE"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "captionbus", "run", str(video), "-s", "en", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    subs = pysubs2.load(str(out / "talk.srt"))
    heard = " ".join(event.plaintext.replace("\n", " ") for event in subs)
    assert jiwer.wer(_words(spoken), _words(heard)) <= 0.25, heard
    # Muxed by the wheel's ffmpeg: the source's video and audio copied, one English track added.
    source = ffprobe_json(video)
    for muxed, codec in ((out / "talk.subtitled.mp4", "mov_text"), (out / "talk.subtitled.mkv", "subrip")):
        streams = ffprobe_json(muxed)["streams"]
        assert [(s["codec_type"], s["codec_name"]) for s in streams if s["codec_type"] == "subtitle"] == [
            ("subtitle", codec)]
        for kind in ("video", "audio"):
            assert ([s["codec_name"] for s in streams if s["codec_type"] == kind]
                    == [s["codec_name"] for s in source["streams"] if s["codec_type"] == kind])
    # demux and mux ran in the env that carries the FFmpeg wheels, and the record names them.
    record = json.loads((out / "talk.job.json").read_text())
    for node in ("demux", "mux"):
        worker = record["nodes"][node]["worker"]
        assert worker["env"] == "common" and worker.get("pkg.imageio-ffmpeg") and worker.get("pkg.av"), worker
