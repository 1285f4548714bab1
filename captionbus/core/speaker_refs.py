"""Known speakers' reference clips, checked and converted where they enter: `--speaker-ref
NAME=CLIP` (run, submit) and the gateway's `known_speaker_names[]` / `known_speaker_references[]`.

OpenAI documents a reference as "an audio sample (as a data URL) ... between 2 and 10 seconds,
in any of the input formats `file` takes", at most 4 per request (openai-python's
`transcription_create_params.py`). So a clip here is any file FFmpeg decodes; it is converted
once, at the door, to 16 kHz mono 16-bit WAV (what the diarization stage reads, as it reads
demux's audio) and travels as an artifact in the object store like the film itself, never as a
path a worker would have to share. A clip that does not decode, holds no audio, or is not 2-10 s
long is refused there with one line naming it; the stage checks the length again (a client may
skip the door) and fails the job with BadInput.

The name becomes the speaker's label everywhere (transcript.json, WebVTT voices, SDH names,
diarized_json); the rules are the diarization declaration's (no markup, not SPEAKER_nn).
"""
from __future__ import annotations

import base64
import binascii
import re
import subprocess
import wave
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from captionbus.contracts.declarations.diarization import (
    MAX_REFERENCES,
    REFERENCE_MAX_S,
    REFERENCE_MIN_S,
    ReferenceName,
    check_reference_names,
)
from captionbus.contracts.declarations.subtitle_gen import speaker_names_text
from captionbus.core import mediatools

SLACK_S = 0.1  # encoders pad a frame or two (an MP3 of 10.00 s decodes to 10.03 s)
DECODE_LIMIT_S = 30.0  # a clip is decoded this far at most: enough to say "too long"
_NAME = TypeAdapter(ReferenceName)


class ReferenceError(ValueError):
    """A reference clip or name that cannot be used; the message is one line for the user."""


def check_name(name: str) -> str:
    try:
        check_reference_names({name: None})
        return _NAME.validate_python(name)
    except ValidationError as e:
        invisible = next((err["ctx"]["error"] for err in e.errors() if err["type"] == "value_error"), None)
        if invisible is not None:  # stage_params.visible_text: say which character, as ascii
            raise ReferenceError(f"speaker name {ascii(name)}: {invisible}") from None
        raise ReferenceError(f"speaker name {name!r}: 1-40 characters, no spaces, none of < > & [ ] = , "
                             "(Anna, Dr.Ng, agent)") from None
    except ValueError as e:
        raise ReferenceError(str(e)) from None


def parse_flag(text: str) -> tuple[str, Path]:
    """`NAME=CLIP` -> (name, path)."""
    name, sep, clip = text.partition("=")
    if not sep or not name.strip() or not clip:
        raise ReferenceError(f"--speaker-ref {text!r}: use NAME=CLIP (e.g. Anna=anna.wav)")
    return check_name(name.strip()), Path(clip)


def check_count(names: list[str], limit: int = MAX_REFERENCES) -> None:
    if len(names) > limit:
        raise ReferenceError(f"{len(names)} known speakers; at most {limit}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ReferenceError(f"speaker {twice[0]!r} has two reference clips; give one each")


def convert(source: Path, dest: Path, what: str) -> Path:
    """`source` (any audio or video FFmpeg reads) as 16 kHz mono WAV at `dest`, checked to be
    2-10 s long; ReferenceError (one line) otherwise."""
    if not source.is_file():
        raise ReferenceError(f"{what}: no such file")
    # The input guard of every FFmpeg input (core.mediatools.INPUT_GUARD): only the file protocol and
    # self-contained containers, so a clip that is really an HLS playlist or a concat list cannot make
    # FFmpeg read other files of this host (tests/unit/test_speaker_refs.py tries one). Ten seconds of
    # audio decodes in well under a second: 20 s is a bound, not an estimate.
    try:
        done = subprocess.run(
            [mediatools.ffmpeg_path(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
             *mediatools.INPUT_GUARD, "-i", mediatools.file_url(source), "-t", str(DECODE_LIMIT_S), "-vn",
             *mediatools.WAV_16K_MONO, "-f", "wav", mediatools.file_url(dest)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20, check=False)
    except mediatools.MediaToolMissing as e:
        raise ReferenceError(f"{what}: {e}") from None
    except subprocess.TimeoutExpired:
        raise ReferenceError(f"{what}: FFmpeg took over 20 s to decode it") from None
    if done.returncode != 0 or not dest.is_file():
        last = (done.stderr.strip().splitlines() or ["no audio stream"])[-1]
        # the caller sees why, never this host's paths
        last = last.replace(mediatools.file_url(source), "the clip").replace(str(source.resolve()), "the clip")
        raise ReferenceError(f"{what} is not audio FFmpeg can read ({last})")
    try:
        with wave.open(str(dest), "rb") as w:
            seconds = w.getnframes() / w.getframerate()
    except (wave.Error, EOFError) as e:
        raise ReferenceError(f"{what}: FFmpeg wrote no readable audio ({e})") from None
    if seconds < REFERENCE_MIN_S - SLACK_S:
        raise ReferenceError(f"{what} is {seconds:.1f} s long; a reference clip is "
                             f"{REFERENCE_MIN_S:g}-{REFERENCE_MAX_S:g} s of one speaker")
    if seconds > REFERENCE_MAX_S + SLACK_S:
        longer = "over " if seconds >= DECODE_LIMIT_S - 0.01 else ""
        raise ReferenceError(f"{what} is {longer}{seconds:.1f} s long; a reference clip is "
                             f"{REFERENCE_MIN_S:g}-{REFERENCE_MAX_S:g} s of one speaker (cut one with "
                             "ffmpeg -ss START -t 8)")
    return dest


_DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),(.*)", re.DOTALL)


def from_data_url(url: str, dest: Path, what: str) -> Path:
    """A data URL (`data:audio/wav;base64,...`, as OpenAI's clients send references) decoded to a
    file at `dest` (not yet converted); ReferenceError (one line) otherwise."""
    match = _DATA_URL.fullmatch(url.strip())
    if not match:
        raise ReferenceError(f"{what} is not a data URL (data:audio/wav;base64,...)")
    media_type, flags, payload = match.groups()
    if media_type and not media_type.lower().startswith(("audio/", "video/", "application/octet-stream")):
        raise ReferenceError(f"{what} is a data URL of {media_type}, not audio")
    if ";base64" not in flags.lower():
        raise ReferenceError(f"{what}: send the audio base64-encoded (data:audio/wav;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ReferenceError(f"{what}: the base64 payload is damaged") from None
    if not data:
        raise ReferenceError(f"{what} is empty")
    dest.write_bytes(data)
    return dest


def sdh_names(names: list[str], given: object = None) -> dict[str, str]:
    """subtitle_gen's `speaker_names` with every known speaker named as themself (a key that is a
    label names that label; a reference no voice matched names no one), under what the user gave
    (--speaker-names text or mapping): the subtitles show `[Anna]` where Anna starts talking."""
    try:
        mapping = dict(speaker_names_text(given)) if given else {}
    except ValueError as e:
        raise ReferenceError(f"speaker names: {e}") from None
    return {**{name: name for name in names}, **mapping}
