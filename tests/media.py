"""Test media made on the spot: eSpeak NG speech, ffmpeg lavfi video, and the bad inputs a
person might hand us. Every helper returns the path it wrote (speech helpers also the text).

Both tools come as wheels of the dev extra: eSpeak NG from espeakng-loader (tests/espeak.py drives
its library; its speech is sample for sample Debian's `espeak-ng`), ffmpeg from imageio-ffmpeg
when there is no system one. No system package is needed to make test media."""
from __future__ import annotations

import atexit
import functools
import inspect
import json
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

ENGLISH_SENTENCE = (
    "The quick brown fox jumps over the lazy dog while seven friendly sailors "
    "watch the golden sunset from the quiet harbour"
)

# Whisper base recognises eSpeak NG Hindi poorly (FACTS.md): good for plumbing, not for WER.
HINDI_SENTENCE = "नमस्ते, आज मौसम बहुत अच्छा है और हम बाज़ार जा रहे हैं"


# The reason a test skips when tools_available() is false (only without the dev extra).
MISSING = "test media need the dev extra's espeakng-loader and imageio-ffmpeg: pip install -e '.[dev]'"


def tools_available() -> bool:
    """eSpeak NG (the espeakng-loader wheel) and an ffmpeg: the system's or the imageio-ffmpeg
    wheel's (captionbus/core/mediatools.py), so the tests make their media on a machine without either."""
    from captionbus.core.mediatools import MediaToolMissing, ffmpeg_path
    from tests import espeak

    try:
        ffmpeg_path()
    except MediaToolMissing:
        return False
    return espeak.available()


def _run(args: list[str], timeout: float = 120) -> None:
    if args[0] == "ffmpeg":
        from captionbus.core.mediatools import ffmpeg_path

        args = [ffmpeg_path(), *args[1:]]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)


def path_without(tools: tuple[str, ...], scratch: Path) -> str:
    """$PATH with `tools` hidden: every PATH folder that holds one of them is replaced by a folder
    under `scratch` of links to all its other entries. For tests of "no system ffmpeg"."""
    import os

    folders = []
    for n, folder in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        here = Path(folder)
        if not any((here / tool).exists() for tool in tools):
            folders.append(folder)
            continue
        shadow = scratch / f"path{n}"
        shadow.mkdir(parents=True, exist_ok=True)
        for entry in here.iterdir():
            if entry.name not in tools and not (shadow / entry.name).exists():
                (shadow / entry.name).symlink_to(entry)
        folders.append(str(shadow))
    return os.pathsep.join(folders)


_made: dict[str, tuple[Path, tuple]] = {}  # key -> (kept copy, the rest of the return value)
_made_lock = threading.Lock()
_made_dir: Path | None = None


def made_once(make):
    """Make each distinct file once per process and copy it for later callers.

    The media are deterministic (the same arguments give the same bytes: eSpeak NG in a fresh
    process, x264 and the muxers with fixed settings), so a second test asking for the same clip
    gets a copy of the first one's file instead of a fresh encode; the key is every argument but
    the destination, plus its suffix (the container). Measured on 2 loaded cores: a speech video
    3.5 s, a 96 s film 7.5-15 s, a copy milliseconds. Nothing else changes: the caller still
    gets its own file at its own path, with the same return value."""
    signature = inspect.signature(make)

    @functools.wraps(make)
    def wrapper(path: Path, *args, **kwargs):
        global _made_dir
        bound = signature.bind(path, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("path")
        key = repr((make.__name__, Path(path).suffix, sorted(arguments.items())))
        with _made_lock:
            if _made_dir is None:
                _made_dir = Path(tempfile.mkdtemp(prefix="captionbus-test-media-"))
                atexit.register(shutil.rmtree, _made_dir, True)
            if key in _made and _made[key][0].exists():
                kept, rest = _made[key]
                shutil.copyfile(kept, path)
                return (Path(path), *rest)
        result = make(path, *args, **kwargs)
        with _made_lock:
            kept = _made_dir / f"{len(_made)}{Path(path).suffix}"
            shutil.copyfile(path, kept)
            _made[key] = (kept, tuple(result[1:]))
        return result

    return wrapper


def speech_wav(path: Path, text: str = ENGLISH_SENTENCE, voice: str = "en", words_per_minute: int = 150) -> tuple[Path, str]:
    """eSpeak NG speech as a WAV (22.05 kHz mono, espeak's native rate)."""
    from tests import espeak

    espeak.speak_wav(path, text, voice, words_per_minute)
    return path, text


@made_once
def speech_video(
    path: Path,
    text: str = ENGLISH_SENTENCE,
    voice: str = "en",
    lead_in_s: float = 0.5,
    size: str = "320x240",
    fps: int = 25,
) -> tuple[Path, str]:
    """A test-pattern video with the spoken text as AAC audio; `lead_in_s` of silence first so
    the speech does not start on frame one (closer to real footage)."""
    wav, _ = speech_wav(path.with_suffix(".speech.wav"), text, voice)
    _run([
        "ffmpeg", "-nostdin", "-y", "-loglevel", "error",
        "-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}",
        "-i", str(wav),
        "-filter_complex", f"[1:a]adelay={int(lead_in_s * 1000)}:all=1,apad=pad_dur=0.5[a]",
        "-map", "0:v", "-map", "[a]", "-shortest",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "64k", "-ar", "44100",
        str(path),
    ])
    wav.unlink()
    return path, text


@made_once
def speech_audio_only(path: Path, text: str = ENGLISH_SENTENCE, voice: str = "en") -> tuple[Path, str]:
    """Speech in an audio-only container (e.g. .m4a): a podcast rather than a film."""
    wav, _ = speech_wav(path.with_suffix(".speech.wav"), text, voice)
    _run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(wav), "-c:a", "aac", "-b:a", "64k", str(path)])
    wav.unlink()
    return path, text


def video_without_audio(path: Path, seconds: float = 2.0) -> Path:
    _run([
        "ffmpeg", "-nostdin", "-y", "-loglevel", "error",
        "-f", "lavfi", "-i", f"testsrc=size=160x120:rate=25:duration={seconds}",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path),
    ])
    return path


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def text_named_mp4(path: Path) -> Path:
    path.write_text("This is a shopping list, not a film.\nmilk\neggs\n")
    return path


def truncated_copy(source: Path, path: Path, keep_fraction: float = 0.3) -> Path:
    """The first part of a real file, as after an interrupted download."""
    data = source.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    return path


def hls_playlist(path: Path, target: Path) -> Path:
    """An HLS playlist whose only segment is a local file: ffmpeg would happily follow it (and a
    crafted one could point at any file or URL), so demux must refuse it."""
    path.write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:10.0,\nfile://{target.resolve()}\n#EXT-X-ENDLIST\n"
    )
    return path


def ffprobe_json(path: Path) -> dict:
    """ffprobe's JSON for a file: from the system ffprobe, else through PyAV (captionbus.services.media)."""
    if not shutil.which("ffprobe"):
        from captionbus.services.media import probe

        return probe(path).raw
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)],
        check=True, capture_output=True, timeout=60,
    )
    return json.loads(out.stdout)


def packet_hash(path: Path, stream: str) -> str:
    """Hash of the compressed packets of one stream (e.g. "v:0", "a:0"): equal hashes mean the
    stream was copied, not re-encoded."""
    from captionbus.core.mediatools import ffmpeg_path

    out = subprocess.run(
        [ffmpeg_path(), "-nostdin", "-v", "error", "-i", str(path), "-map", f"0:{stream}", "-c", "copy", "-f", "hash", "-hash", "sha256", "-"],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return out.stdout.strip()


def wav_seconds(path: Path) -> float:
    import wave

    with wave.open(str(path), "rb") as w:
        return w.getnframes() / float(w.getframerate())


MUSIC_BEDS = ("melody", "organ")


@made_once
def music_bed_video(path: Path, text: str = ENGLISH_SENTENCE, music_only_s: float = 6.0,
                    size: str = "320x240", fps: int = 25, bed: str = "organ") -> tuple[Path, str, tuple[float, float]]:
    """Speech over a music bed with `music_only_s` of music alone before and after it, made by
    ffmpeg's lavfi sources, the speech on top at speaking level. Returns the video, the text and
    (speech start, speech end) in seconds. Beds (each a scale of notes, four a second):

    melody  sine notes with vibrato and a fifth above, over pink noise. Whisper base writes
            nothing over it even without VAD: it cannot show the phantom-words bug.
    organ   each note with its first four harmonics (a reedy organ tone), pulsing twice a second,
            over a 110 Hz drone. whisperx's own (pyannote) VAD takes the music before the speech
            for speech and Whisper base puts the sentence's first word at 0.03 s, six seconds
            early: the "The speed" over pure music that was reported (tests/e2e/test_music_bed.py).
    """
    wav, _ = speech_wav(path.with_suffix(".speech.wav"), text)
    speech_s = wav_seconds(wav)
    total = music_only_s * 2 + speech_s
    note = "220*pow(2\\,floor(mod(t*4\\,8))/12)"
    if bed == "melody":
        music = (f"aevalsrc=0.08*sin(2*PI*{note}*t+0.3*sin(2*PI*5*t))"
                 f"+0.05*sin(2*PI*1.5*{note}*t):s=44100:d={total:.2f}")
        noise = 0.03
    elif bed == "organ":
        harmonics = "+".join(f"{1 / k:.2f}*sin({2 * k}*PI*{note}*t)" for k in range(1, 5))
        music = f"aevalsrc=0.12*({harmonics})*(0.6+0.4*sin(2*PI*2*t))+0.06*sin(2*PI*110*t):s=44100:d={total:.2f}"
        noise = 0.0
    else:
        raise ValueError(f"bed {bed!r}: one of {MUSIC_BEDS}")
    _run([
        "ffmpeg", "-nostdin", "-y", "-loglevel", "error",
        "-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}:d={total:.2f}",
        "-f", "lavfi", "-i", music,
        "-f", "lavfi", "-i", f"anoisesrc=color=pink:amplitude={noise}:d={total:.2f}",
        "-i", str(wav),
        "-filter_complex",
        f"[3:a]aresample=44100,adelay={int(music_only_s * 1000)}:all=1[s];"
        "[1:a][2:a][s]amix=inputs=3:duration=first:normalize=0[a]",
        "-map", "0:v", "-map", "[a]",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "96k", "-ar", "44100",
        str(path),
    ])
    wav.unlink()
    return path, text, (music_only_s, music_only_s + speech_s)


FILM_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Seven friendly sailors watch the golden sunset.",
    "A bright yellow kite rises above the green hill.",
    "My grandmother bakes bread every Sunday morning.",
    "The train to the city leaves at nine o'clock.",
    "Children laugh and play beside the quiet river.",
    "Please close the window before the storm arrives.",
    "Our teacher reads a story about a brave knight.",
)


@made_once
def speech_film(path: Path, sentences=FILM_SENTENCES, pauses=(0.4, 0.7, 1.2), repeat: int = 1,
                video: bool = True) -> tuple[Path, str]:
    """Sentences spoken one after another with pauses of the given lengths between them (cycled),
    `repeat` times over: a film whose chunk cuts land right next to speech. 16 kHz mono PCM
    glued in Python (exact pause lengths), then a test-pattern video with it as AAC audio (or the
    WAV itself when video=False)."""
    import wave

    rate = 16000
    spoken: list[bytes] = []
    for n, text in enumerate(sentences):
        wav, _ = speech_wav(path.with_suffix(f".s{n}.wav"), text)
        raw = path.with_suffix(f".s{n}.raw")
        _run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(wav), "-ac", "1", "-ar", str(rate),
              "-f", "s16le", str(raw)])
        spoken.append(raw.read_bytes())
        wav.unlink()
        raw.unlink()
    pcm = bytearray(b"\0\0" * int(0.5 * rate))
    texts = []
    for r in range(repeat):
        for n, data in enumerate(spoken):
            pcm += data
            pcm += b"\0\0" * int(pauses[(r * len(spoken) + n) % len(pauses)] * rate)
            texts.append(sentences[n])
    audio = path.with_suffix(".film.wav") if video else path
    with wave.open(str(audio), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(pcm))
    if video:
        _run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10",
              "-i", str(audio), "-map", "0:v", "-map", "1:a", "-shortest", "-c:v", "libx264", "-preset", "ultrafast",
              "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "48k", str(path)],
             # ~20x real time here (fanout.py --memory made its 10- and 60-minute films in 3.4 minutes
             # at load average 5-12), but under heavier load a 1-hour film missed a tenth of its length
             # (6 minutes): allow real time, still a bound on a stuck encoder.
             timeout=max(120.0, len(pcm) / (2 * rate)))
        audio.unlink()
    return path, " ".join(texts)
