"""A captionbus transcript in the shapes OpenAI's audio API returns (json, text, verbose_json).

srt and vtt come from the job's own subtitle_gen outputs (the subtitle rules), not from here.
Per-segment decoder statistics OpenAI reports (tokens, avg_logprob, compression_ratio,
no_speech_prob) are passed through from the transcript's segments: the whisperx backend records
faster-whisper's own values per decoded chunk (captionbus/services/asr/whisperx_backend.py says how), the mlx
backend mlx-whisper's. Where a backend reported none they are `null`: a made-up 0.0 would claim
things (no_speech_prob 0.0 is "certainly speech").
"""
from __future__ import annotations

from captionbus.contracts.languages import LANGUAGES
from captionbus.contracts.transcript import Segment, Transcript

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def language_name(code: str | None) -> str:
    """OpenAI names the language in full, lower case ("english")."""
    if code and code in LANGUAGES:
        return LANGUAGES[code][1].lower()
    return code or ""


DECODER_STATS = ("tokens", "avg_logprob", "compression_ratio", "no_speech_prob")


def decoder_stats(segment: Segment) -> dict:
    """The segment's decoder statistics where the asr stage recorded them, else None each."""
    return {name: getattr(segment, name) for name in DECODER_STATS}


def as_json(transcript: Transcript) -> dict:
    return {"text": transcript.text}


def as_verbose_json(transcript: Transcript, *, task: str, granularities: set[str], temperature: float) -> dict:
    body: dict = {
        "task": task,
        "language": language_name(transcript.language),
        "duration": float(transcript.duration or (transcript.segments[-1].end if transcript.segments else 0.0)),
        "text": transcript.text,
    }
    if "segment" in granularities or not granularities:
        body["segments"] = [
            {
                "id": n, "seek": 0, "start": s.start, "end": s.end, "text": " " + s.text.strip(),
                "temperature": temperature, **decoder_stats(s),
            }
            for n, s in enumerate(transcript.segments)
        ]
    if "word" in granularities:
        body["words"] = [
            {"word": w.text.strip(), "start": w.start, "end": w.end}
            for s in transcript.segments for w in s.words if w.start is not None and w.end is not None
        ]
    return body
