"""A captionbus transcript in the shapes OpenAI's audio API returns (json, text, verbose_json).

srt and vtt come from the job's own subtitle_gen outputs (the subtitle rules), not from here.
Fields OpenAI reports that Whisper-via-CTranslate2 does not give per segment (tokens, avg_logprob,
compression_ratio, no_speech_prob) are present with neutral values, so strict clients parse them.
"""
from __future__ import annotations

from contracts.languages import LANGUAGES
from contracts.transcript import Transcript

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def language_name(code: str | None) -> str:
    """OpenAI names the language in full, lower case ("english")."""
    if code and code in LANGUAGES:
        return LANGUAGES[code][1].lower()
    return code or ""


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
                "tokens": [], "temperature": temperature, "avg_logprob": 0.0,
                "compression_ratio": 0.0, "no_speech_prob": 0.0,
            }
            for n, s in enumerate(transcript.segments)
        ]
    if "word" in granularities:
        body["words"] = [
            {"word": w.text.strip(), "start": w.start, "end": w.end}
            for s in transcript.segments for w in s.words if w.start is not None and w.end is not None
        ]
    return body
