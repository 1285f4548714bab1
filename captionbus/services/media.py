"""Safe ffmpeg / ffprobe calls shared by the media stages (demux, mux).

A job names one local file, and ffmpeg must read that file and nothing else: playlists (HLS),
concat lists and friends make ffmpeg open further files or URLs named *inside* the input, so a
crafted "video" could read any file on the worker. Every call here therefore
  - runs ffmpeg with an argument list, never a shell string;
  - passes each input as a `file:` URL of its resolved absolute path, so names starting with '-'
    or containing ':' are not read as options or protocols;
  - allows only the `file` protocol and only the container demuxers in mediatools.ALLOWED_DEMUXERS
    (libavformat checks both before a demuxer reads its header, so a playlist is refused before
    it can open anything);
  - uses -nostdin and a timeout.
Which ffmpeg / ffprobe run is decided by `captionbus.core.mediatools` (a system FFmpeg when on PATH, else
the imageio-ffmpeg wheel's binary; with no ffprobe, `probe` reads the file through PyAV in a child
process, with the same whitelists and timeout, and answers in ffprobe's JSON shape).
Errors a person can fix become BadInput with one line; everything else stays an exception.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from captionbus.core import mediatools
from captionbus.services.runtime.errors import BadInput

# The input guard (which demuxers and protocols an input may use) is core.mediatools': the gateway
# converts known-speaker clips with it too.

PROBE_TIMEOUT_S = 60


@dataclass
class ProbeResult:
    path: Path
    format_name: str
    duration: float | None
    streams: list[dict] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    def streams_of(self, codec_type: str) -> list[dict]:
        return [s for s in self.streams if s.get("codec_type") == codec_type]

    @property
    def video_streams(self) -> list[dict]:
        # Cover art is a "video" stream with the attached_pic disposition; it is not a picture track.
        return [s for s in self.streams_of("video") if not s.get("disposition", {}).get("attached_pic")]

    @property
    def audio_streams(self) -> list[dict]:
        return self.streams_of("audio")

    @property
    def demuxer(self) -> str:
        """First name of the probed format: what `-f` must say to get the same demuxer again."""
        return self.format_name.split(",")[0]

    @property
    def fps(self) -> float | None:
        for stream in self.video_streams:
            for key in ("avg_frame_rate", "r_frame_rate"):
                rate = stream.get(key) or "0/0"
                num, _, den = rate.partition("/")
                if den and den != "0" and num != "0":
                    return float(Fraction(int(num), int(den)))
        return None

    def summary(self) -> dict:
        """The facts later stages use (subtitle timing, mux decisions), as the `probe` artifact."""
        video = self.video_streams[0] if self.video_streams else None
        return {
            "format": self.format_name,
            "duration": self.duration,
            "fps": self.fps,
            "has_video": video is not None,
            "video_codec": video.get("codec_name") if video else None,
            "width": video.get("width") if video else None,
            "height": video.get("height") if video else None,
            "audio_codecs": [s.get("codec_name") for s in self.audio_streams],
            "start_time": to_float(self.raw.get("format", {}).get("start_time")),
        }


def to_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _sniff_kind(path: Path) -> str | None:
    """Name what a file is from its first bytes, for a message when ffprobe refuses it."""
    with open(path, "rb") as f:
        head = f.read(512)
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"#EXTM3U"):
        return "playlist"
    if text.startswith(b"ffconcat") or (text.startswith(b"<?xml") and b"<MPD" in head):
        return "playlist"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide") or head.startswith(
        (b"\x1a\x45\xdf\xa3", b"RIFF", b"OggS", b"fLaC", b"ID3", b"FLV", b"\x00\x00\x01\xba")
    ):
        return "media"
    if head and all(b in b"\t\n\r" or 32 <= b < 127 or b >= 128 for b in head):
        return "text"
    return None


# Probe without ffprobe: PyAV opens the file with the same whitelists (libavformat checks them
# before a demuxer reads its header, exactly as for ffprobe) and prints the subset of ffprobe's
# `-show_format -show_streams` JSON that ProbeResult and the stages read. A child process, so a
# hostile file that hangs or crashes libavformat costs a timeout, not the worker. Codec names are
# libavcodec's canonical ones (`mp3`, not the decoder name `mp3float`), as ffprobe prints them.
_PYAV_GUARD = {"protocol_whitelist": "file", "format_whitelist": mediatools.FORMAT_WHITELIST}
_PYAV_PROBE = r"""
import json, sys
import av
args = json.loads(sys.argv[1])
try:
    container = av.open(args["url"], options=args["guard"])
except Exception as e:
    sys.stderr.write(str(getattr(e, "strerror", None) or e) + "\n")
    sys.exit(1)
def rate(value):
    return f"{value.numerator}/{value.denominator}" if value else "0/0"
def seconds(value, base):
    return None if value is None or base is None else str(float(value * base))
streams = []
for s in container.streams:
    cc = s.codec_context
    codec = getattr(cc, "codec", None)
    d = int(s.disposition)
    info = {
        "index": s.index, "codec_type": s.type,
        "codec_name": codec.canonical_name if codec else None,
        "avg_frame_rate": rate(s.average_rate) if s.type == "video" else "0/0",
        "r_frame_rate": rate(s.base_rate) if s.type == "video" else "0/0",
        "time_base": rate(s.time_base),
        "start_time": seconds(s.start_time, s.time_base),
        "duration": seconds(s.duration, s.time_base),
        "disposition": {"default": d & 1, "attached_pic": (d >> 10) & 1},
        "tags": dict(s.metadata),
    }
    if s.type == "video":
        info.update(width=cc.width, height=cc.height)
    elif s.type == "audio":
        info.update(sample_rate=str(cc.sample_rate), channels=cc.channels)
    streams.append(info)
fmt = {
    "format_name": container.format.name, "nb_streams": len(streams),
    "duration": None if container.duration is None else str(container.duration / 1e6),
    "start_time": None if container.start_time is None else str(container.start_time / 1e6),
    "tags": dict(container.metadata),
}
print(json.dumps({"streams": streams, "format": fmt}))
"""


def probe(path: Path, display_name: str | None = None) -> ProbeResult:
    """ffprobe the file as JSON (through PyAV when there is no ffprobe); BadInput for files that
    are not readable media."""
    name = display_name or Path(path).name
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{name}: file not found")
    if path.stat().st_size == 0:
        raise BadInput(f"{name} is empty (0 bytes)")
    ffprobe = mediatools.ffprobe_path()
    if ffprobe:
        args = [
            ffprobe, "-v", "error", *mediatools.INPUT_GUARD,
            "-print_format", "json", "-show_format", "-show_streams", mediatools.file_url(path),
        ]
    elif importlib.util.find_spec("av") is not None:
        args = [sys.executable, "-c", _PYAV_PROBE, json.dumps({"url": mediatools.file_url(path), "guard": _PYAV_GUARD})]
    else:  # not the file's fault: say what this worker lacks, not "not a media file"
        raise mediatools.MediaToolMissing(
            "ffprobe not found and PyAV is not installed in this environment: `captionbus envs create common`, "
            "install FFmpeg, or set CAPTIONBUS_FFPROBE")
    try:
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BadInput(f"{name}: probing gave no answer within {PROBE_TIMEOUT_S} s; the file looks corrupt")
    info = {}
    if done.returncode == 0:
        try:
            info = json.loads(done.stdout or b"{}")
        except json.JSONDecodeError:
            info = {}
    fmt = info.get("format") or {}
    if done.returncode != 0 or not fmt.get("format_name"):
        kind = _sniff_kind(path)
        if kind == "playlist":
            raise BadInput(f"{name} is a playlist (HLS/DASH/concat), not a media file; give the media file itself")
        if kind == "media":
            raise BadInput(f"{name} is truncated or corrupt: ffmpeg cannot read its header ({_last_line(done.stderr)})")
        if kind == "text":
            raise BadInput(f"{name} is a text file, not a media file ffmpeg can read")
        raise BadInput(f"{name} is not a media file ffmpeg can read")
    return ProbeResult(
        path=path,
        format_name=fmt["format_name"],
        duration=to_float(fmt.get("duration")),
        streams=info.get("streams") or [],
        raw=info,
    )


def _last_line(stderr: bytes | str | None) -> str:
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    if not lines:
        return "no message"
    # ffmpeg prefixes lines with "[demuxer @ 0x...]" and the file URL; neither helps a person.
    line = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*", "", lines[-1])
    line = re.sub(r"^file:[^:]*:\s*", "", line)
    return line[:200]


def guarded_input(probe_result: ProbeResult) -> list[str]:
    """Input arguments for a file that was probed: same demuxer forced with -f, so the file
    cannot turn into something else between probe and use."""
    return [*mediatools.INPUT_GUARD, "-f", probe_result.demuxer, "-i", mediatools.file_url(probe_result.path)]


def plain_input(path: Path, demuxer: str) -> list[str]:
    """Input arguments for a file we wrote ourselves (e.g. an SRT), still guarded."""
    return ["-protocol_whitelist", "file", "-f", demuxer, "-i", mediatools.file_url(path)]


class FfmpegFailed(Exception):
    def __init__(self, message: str, stderr: str):
        super().__init__(message)
        self.stderr = stderr

    @property
    def last_line(self) -> str:
        return _last_line(self.stderr)


def run_ffmpeg(
    args: list[str],
    *,
    duration: float | None,
    timeout_s: float,
    on_progress: Callable[[float], None] | None = None,
) -> str:
    """Run `ffmpeg <args>` (args without the program name), reporting progress 0..1 from
    `-progress pipe:1` against `duration`. Returns stderr; raises FfmpegFailed on a non-zero
    exit and TimeoutError past timeout_s (the process is killed)."""
    cmd = [mediatools.ffmpeg_path(), "-nostdin", "-hide_banner", "-loglevel", "error", "-nostats", "-progress", "pipe:1", "-y", *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr_chunks: list[bytes] = []
    # Drain stderr in the background so a chatty ffmpeg never blocks on a full pipe.
    drain = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    timed_out = threading.Event()

    def kill_when_late() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout_s, kill_when_late)
    timer.start()
    try:
        for raw_line in proc.stdout:
            line = raw_line.decode("ascii", "replace").strip()
            if on_progress and duration and line.startswith("out_time_us="):
                value = line.partition("=")[2]
                if value.isdigit():
                    on_progress(min(1.0, int(value) / 1e6 / duration))
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    drain.join(timeout=5)
    stderr = b"".join(stderr_chunks).decode("utf-8", "replace")
    if timed_out.is_set():
        raise TimeoutError(f"ffmpeg ran past {timeout_s:.0f} s")
    if proc.returncode != 0:
        raise FfmpegFailed(f"ffmpeg exited with {proc.returncode}: {_last_line(stderr)}", stderr)
    if on_progress:
        on_progress(1.0)
    return stderr


def timeout_for(duration: float | None, realtime_fraction: float = 0.5, floor_s: float = 120.0) -> float:
    """A generous wall-clock limit: ffmpeg audio decode / stream copy runs far faster than
    real time, so `duration * realtime_fraction` only trips on a hung process."""
    return floor_s + (duration or 0.0) * realtime_fraction


def wav_duration(path: Path) -> float:
    """Duration of a PCM WAV we wrote (header-based, no decoding)."""
    import wave

    with wave.open(str(path), "rb") as w:
        return w.getnframes() / float(w.getframerate())
