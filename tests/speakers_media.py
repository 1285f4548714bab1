"""Multi-speaker dialogues made of recorded human voices, with their ground truth (issue 21).

Speaker models cannot be measured on espeak-ng: its voices are one synthesiser. The voices here
are real actors: the Dutch and Czech dubs of the game Fish Fillets NG, which Debian ships as
`fillets-ng-data-nl` and `fillets-ng-data-cs` (GPL-2, pinned below). Each dub has the two fish
(the small one, files `*-m-*.ogg`, a woman's voice; the big one, `*-v-*.ogg`, a man's), some 650
lines of ~3 s each per actor. Four actors in all: two women, two men, two languages (a pair of
speakers of the same sex and language is always present, so language alone cannot separate
them). The packages are fetched with `apt-get download` (no install) the first time and their
clips kept, decoded to 16 kHz mono, under the test-model cache.

A dialogue is a list of turns placed on a timeline: each turn is one or more clips of one
speaker, trimmed to where there is sound (10 ms frames within 40 dB of the clip's loudest), so a
gap of 0 really is "the next speaker starts as the last one stops". Ground truth is one
reference turn per placed clip, from its first to its last frame within 30 dB of its peak (the
lines end in reverberation tails, see REFERENCE_FLOOR_DB); pauses inside a clip stay inside its
turn (as human RTTM annotations bridge short pauses). An optional music bed (ffmpeg lavfi, a note scale with
harmonics, as tests/media.py's organ bed) is mixed under the speech at a given level.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SR = 16000
PACKAGES = {"nl": ("fillets-ng-data-nl", "1.0.1-1.1"), "cs": ("fillets-ng-data-cs", "1.0.1-1.1")}
# speaker label -> (dub, the game's character letter)
SPEAKERS = {"nl-small": ("nl", "m"), "nl-big": ("nl", "v"), "cs-small": ("cs", "m"), "cs-big": ("cs", "v")}
MIN_CLIP_S = 1.0  # shorter lines ("Yes.") are skipped: a turn should carry a voice
# The actors' lines end in reverberation: after the last word the level decays smoothly from about
# -20 to -40 dB (below the clip's peak) over ~0.6 s. The reference turn is where the clip is within
# 30 dB of its peak; the clip itself is placed trimmed at 40 dB (so a gap of 0 means the next voice
# starts as the last one's reverb fades out).
REFERENCE_FLOOR_DB = 30.0


@dataclass(frozen=True)
class Turn:
    speaker: str
    start: float
    end: float


def _cache_root() -> Path:
    from tests.envtools import test_models_root

    return test_models_root() / "fillets-voices"


def _decode(path: Path) -> np.ndarray:
    """An audio file as float32 mono at 16 kHz (PyAV: FFmpeg as a wheel)."""
    import av

    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SR)
        parts = [frame.to_ndarray().reshape(-1)
                 for packet in container.decode(audio=0) for frame in resampler.resample(packet)]
        parts += [frame.to_ndarray().reshape(-1) for frame in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def _loud_frames(samples: np.ndarray, floor_db: float) -> np.ndarray:
    """Indices of the 10 ms frames within `floor_db` of the loudest."""
    frame = SR // 100
    n = len(samples) // frame
    if n == 0:
        return np.zeros(0, dtype=int)
    energy = (samples[: n * frame].reshape(n, frame) ** 2).mean(axis=1) + 1e-12
    return np.flatnonzero(10 * np.log10(energy / energy.max()) > -floor_db)


def trim(samples: np.ndarray, floor_db: float = 40.0) -> np.ndarray:
    """`samples` without the leading and trailing frames more than `floor_db` below the loudest."""
    loud = _loud_frames(samples, floor_db)
    if len(loud) == 0:
        return samples
    frame = SR // 100
    return samples[loud[0] * frame: (loud[-1] + 1) * frame]


def speech_span(samples: np.ndarray, floor_db: float = REFERENCE_FLOOR_DB) -> tuple[float, float]:
    """Where the speech of a (trimmed) clip starts and ends, in seconds into it."""
    loud = _loud_frames(samples, floor_db)
    if len(loud) == 0:
        return 0.0, len(samples) / SR
    return loud[0] / 100, (loud[-1] + 1) / 100


def _apt_download(spec: str, into: Path) -> None:
    """`apt-get download spec`; on a machine whose package lists were never fetched (or are stale,
    so the pinned version is unknown) the lists are updated once and the download tried again."""
    first = subprocess.run(["apt-get", "download", spec], cwd=into, capture_output=True, timeout=600)
    if first.returncode == 0:
        return
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
    subprocess.run(["apt-get", "download", spec], cwd=into, check=True, capture_output=True, timeout=600)


def voice_bank() -> dict[str, list[Path]]:
    """speaker -> its clips (16 kHz mono .npy, trimmed, each at least MIN_CLIP_S), sorted by name.
    Built once from the pinned Debian packages (apt-get download + dpkg-deb -x)."""
    root = _cache_root()
    done = root / "COMPLETE"
    if not done.is_file():
        building = Path(tempfile.mkdtemp(prefix=".fillets-", dir=root.parent))
        try:
            for dub, (package, version) in PACKAGES.items():
                _apt_download(f"{package}={version}", building)
                deb = next(building.glob(f"{package}_*.deb"))
                subprocess.run(["dpkg-deb", "-x", str(deb), str(building / dub)], check=True, timeout=600)
                deb.unlink()
                for speaker, (speaker_dub, letter) in SPEAKERS.items():
                    if speaker_dub != dub:
                        continue
                    out = building / "clips" / speaker
                    out.mkdir(parents=True, exist_ok=True)
                    for clip in sorted((building / dub).rglob(f"*/{dub}/*-{letter}-*.ogg")):
                        samples = trim(_decode(clip))
                        if len(samples) >= MIN_CLIP_S * SR:
                            np.save(out / f"{clip.parent.parent.name}-{clip.stem}.npy", samples)
                shutil.rmtree(building / dub)
            (building / "clips" / "COMPLETE").write_text("fillets-ng-data nl+cs 1.0.1-1.1\n")
            if root.exists():
                shutil.rmtree(root)
            (building / "clips").rename(root)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return {speaker: sorted((root / speaker).glob("*.npy")) for speaker in SPEAKERS}


def dialogue(plan: list[tuple[str, int, float]], seed: int = 0) -> tuple[np.ndarray, list[Turn]]:
    """Samples and reference turns for `plan`: (speaker, clips in this turn, gap before it in s).
    Clips within one turn follow each other with 0.2 s pauses (one reference turn per clip).
    Clips are drawn without replacement per speaker (seeded), so no line repeats."""
    bank = voice_bank()
    rng = np.random.default_rng(seed)
    order = {speaker: list(rng.permutation(len(clips))) for speaker, clips in bank.items()}
    pieces: list[np.ndarray] = []
    turns: list[Turn] = []
    t = 0
    for speaker, clips, gap in plan:
        for k in range(clips):
            pause = int(round((gap if k == 0 else 0.2) * SR))
            if not order[speaker]:
                raise ValueError(f"{speaker} has no more clips for this plan")
            samples = np.load(bank[speaker][order[speaker].pop()])
            samples = samples / (np.abs(samples).max() + 1e-9) * 0.5  # the same peak level for all actors
            pieces += [np.zeros(pause, np.float32), samples.astype(np.float32)]
            t += pause
            a, b = speech_span(samples)
            turns.append(Turn(speaker, round(t / SR + a, 3), round(t / SR + b, 3)))
            t += len(samples)
    return np.concatenate(pieces + [np.zeros(SR // 2, np.float32)]), turns


def reference_clip(path: Path, speaker: str, seed: int, lines: int = 2, skip: int = 0) -> Path:
    """A known speaker's reference clip (16 kHz mono WAV, about 3 s a line, at most 10 s): `lines`
    of `speaker`'s lines that the dialogue made with `seed` does not use -- `dialogue` pops lines
    from the end of each speaker's seeded permutation, these come from its front (after `skip`),
    so the clip is another part of the actor's recording than the film it is matched in."""
    bank = voice_bank()
    rng = np.random.default_rng(seed)
    order = {name: list(rng.permutation(len(clips))) for name, clips in bank.items()}[speaker]
    gap = np.zeros(int(0.2 * SR), np.float32)
    parts: list[np.ndarray] = []
    for i in order[skip: skip + lines]:
        samples = np.load(bank[speaker][i])
        parts += [samples / (np.abs(samples).max() + 1e-9) * 0.5, gap]
    return write_wav(path, np.concatenate(parts[:-1])[: 10 * SR])


def short_plan() -> list[tuple[str, int, float]]:
    """~70 s, four speakers: changes with no gap, one speaker continuing after 1.5 s and after a
    3 s pause, short and long turns."""
    return [
        ("nl-small", 2, 0.5), ("nl-big", 1, 0.0), ("cs-small", 2, 0.0), ("cs-big", 1, 0.3),
        ("cs-big", 1, 1.5), ("nl-small", 1, 0.0), ("nl-big", 2, 0.4), ("cs-small", 1, 0.0),
        ("nl-small", 1, 3.0), ("cs-big", 2, 0.0), ("nl-big", 1, 0.2), ("cs-small", 2, 0.6),
        ("nl-small", 1, 0.0), ("cs-big", 1, 0.0),
    ]


def long_plan(minutes: float, seed: int = 1, speakers: tuple[str, ...] = tuple(SPEAKERS)) -> list[tuple[str, int, float]]:
    """A random conversation of about `minutes` among `speakers` (turns of 1-3 clips, gaps of
    0-1.5 s with a third of them 0, a speaker continuing after a pause now and then)."""
    rng = np.random.default_rng(seed)
    plan, total, last = [], 0.0, None
    while total < minutes * 60:
        speaker = last if last is not None and rng.random() < 0.1 else rng.choice([s for s in speakers if s != last])
        clips = int(rng.integers(1, 4))
        gap = 0.0 if rng.random() < 0.33 else float(rng.uniform(0.1, 1.5))
        plan.append((str(speaker), clips, round(gap, 2)))
        total += gap + clips * 3.0
        last = speaker
    return plan


def write_wav(path: Path, samples: np.ndarray) -> Path:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SR)
        out.writeframes(pcm.tobytes())
    return path


def add_music_bed(source: Path, path: Path, level: float = 0.1) -> Path:
    """`source` with a music bed under it (ffmpeg lavfi: a scale of organ-like notes, four a
    second, pulsing twice a second, over a 110 Hz drone); `level` is the bed's peak amplitude."""
    from tests.media import _run

    note = "220*pow(2\\,floor(mod(t*4\\,8))/12)"
    harmonics = "+".join(f"{1 / k:.2f}*sin({2 * k}*PI*{note}*t)" for k in range(1, 5))
    with wave.open(str(source)) as w:
        seconds = w.getnframes() / w.getframerate()
    music = (f"aevalsrc={level / 2.6:.4f}*({harmonics})*(0.6+0.4*sin(2*PI*2*t))"
             f"+{level / 5:.4f}*sin(2*PI*110*t):s={SR}:d={seconds:.3f}")
    _run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(source), "-f", "lavfi", "-i", music,
          "-filter_complex", "[0:a][1:a]amix=inputs=2:duration=first:normalize=0[a]", "-map", "[a]",
          "-ac", "1", "-ar", str(SR), "-c:a", "pcm_s16le", str(path)], timeout=1800)
    return path


def write_rttm(path: Path, turns: list[Turn], uri: str = "dialogue") -> Path:
    path.write_text("".join(f"SPEAKER {uri} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.speaker} <NA> <NA>\n"
                            for t in turns))
    return path


def make(path: Path, plan: list[tuple[str, int, float]], seed: int = 0, music_level: float | None = None) -> list[Turn]:
    """Write the dialogue for `plan` to `path` (16 kHz mono WAV, what demux writes), with a music
    bed when `music_level` is given, and its reference turns beside it (`path`.rttm)."""
    samples, turns = dialogue(plan, seed)
    if music_level is None:
        write_wav(path, samples)
    else:
        dry = write_wav(path.with_suffix(".dry.wav"), samples)
        add_music_bed(dry, path, music_level)
        dry.unlink()
    write_rttm(path.with_suffix(".rttm"), turns, path.stem)
    return turns
