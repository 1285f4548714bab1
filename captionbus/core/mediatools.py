"""Which FFmpeg programs to run: one place that resolves `ffmpeg` and `ffprobe` for every process.

A system FFmpeg is no longer required. The `common` environment (the demux and mux stages)
installs two wheels that carry FFmpeg: `imageio-ffmpeg` (a static `ffmpeg` binary, but no
`ffprobe`) and PyAV (`av`, FFmpeg's libraries, which `captionbus/services/media.py` probes with when there is
no `ffprobe`). Order, first found wins:

ffmpeg
  1. `CAPTIONBUS_FFMPEG` (settings): the operator's explicit choice. A value that is not an
     executable file is an error naming the variable, never a silent fall-through.
  2. `ffmpeg` on PATH: a system FFmpeg is the one the operator installed and keeps patched
     (distribution security updates), may carry hardware decoders or codecs a static wheel build
     leaves out, and keeps today's behaviour on every machine that has one.
  3. imageio-ffmpeg's bundled binary (`imageio_ffmpeg.get_ffmpeg_exe()`), when that package
     is importable in this interpreter: the floor that needs nothing but `pip install`.
ffprobe
  1. `CAPTIONBUS_FFPROBE` (same rule as above);
  2. `ffprobe` on PATH;
  3. none: the caller probes through PyAV (`captionbus.services.media.probe`), with the same protocol and
     demuxer whitelists, in a child process with the same timeout.

Nothing is cached across calls (a PATH lookup is microseconds, and tests change PATH), and no
command string is ever built here: callers pass the returned path as argv[0].
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from captionbus.core import settings as settings_mod


class MediaToolMissing(RuntimeError):
    """No usable FFmpeg program; the message says how to get one (one actionable line)."""


def _explicit(value: Path | None, variable: str) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise MediaToolMissing(f"{variable}={value} is not an executable file; point it at an ffmpeg build or unset it")
    return str(path)


def ffmpeg_path(settings: settings_mod.Settings | None = None) -> str:
    """The ffmpeg binary to run (see the module docstring for the order)."""
    settings = settings or settings_mod.load()
    explicit = _explicit(settings.ffmpeg, "CAPTIONBUS_FFMPEG")
    if explicit:
        return explicit
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        exe = None
    if exe and Path(exe).is_file():
        return exe
    raise MediaToolMissing(
        "ffmpeg not found: `pip install imageio-ffmpeg` (the common env has it: "
        "`captionbus envs create common`), install FFmpeg, or set CAPTIONBUS_FFMPEG")


def ffprobe_path(settings: settings_mod.Settings | None = None) -> str | None:
    """The ffprobe binary to run, or None: then probe through PyAV."""
    settings = settings or settings_mod.load()
    explicit = _explicit(settings.ffprobe, "CAPTIONBUS_FFPROBE")
    if explicit:
        return explicit
    return shutil.which("ffprobe")


# Demuxers that read one self-contained file. Left out on purpose: hls, dash, concat, image2,
# tee, sdp/rtp/rtsp, lavfi, ffmetadata ... anything that opens other resources named in the input.
ALLOWED_DEMUXERS = (
    "mov", "mp4", "m4a", "3gp", "matroska", "webm", "avi", "mpegts", "mpeg", "flv", "asf",
    "ogg", "wav", "w64", "mp3", "flac", "aac", "ac3", "eac3", "aiff", "caf", "mxf", "nut", "dv",
    "amr", "au", "wv", "ape", "dts", "truehd", "mlp", "rm", "gxf", "wtv", "ivf", "h264", "hevc",
    "m4v", "mpegvideo", "yuv4mpegpipe", "opus", "loas", "dhav",
)
FORMAT_WHITELIST = ",".join(ALLOWED_DEMUXERS)
INPUT_GUARD = ["-protocol_whitelist", "file", "-format_whitelist", FORMAT_WHITELIST]

# The pipeline's audio: every stage after demux reads 16 kHz mono 16-bit PCM WAV (whisper's and
# pyannote's rate), and a known speaker's reference clip is converted to the same.
SAMPLE_RATE = 16000
WAV_16K_MONO = ["-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le"]


def file_url(path: Path) -> str:
    """`file:` URL for ffmpeg: absolute, so '-name.mp4' or 'a:b.mp4' are plain file names."""
    return "file:" + str(Path(path).resolve())
