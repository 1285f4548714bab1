"""A captionbus transcript in the shapes OpenAI's audio API returns (json, text, verbose_json,
diarized_json).

srt and vtt come from the job's own subtitle_gen outputs (the subtitle rules), not from here.
Per-segment decoder statistics OpenAI reports (tokens, avg_logprob, compression_ratio,
no_speech_prob) are passed through from the transcript's segments: the whisperx backend records
faster-whisper's own values per decoded chunk (captionbus/services/asr/whisperx_backend.py says how), the mlx
backend mlx-whisper's. Where a backend reported none they are `null`: a made-up 0.0 would claim
things (no_speech_prob 0.0 is "certainly speech").
"""
from __future__ import annotations

import re

from captionbus.contracts.languages import LANGUAGES
from captionbus.contracts.transcript import Segment, Transcript

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")


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


def speaker_letter(label: str | None) -> str:
    """SPEAKER_00 -> A, SPEAKER_01 -> B, ... (OpenAI labels unnamed speakers with capital letters);
    a known speaker's name (known_speaker_names[]) as it is; a segment no turn reached -> "unknown"
    (the field is required)."""
    if label is None:
        return "unknown"
    unnamed = re.fullmatch(r"SPEAKER_(\d+)", label)
    return chr(ord("A") + int(unnamed.group(1))) if unnamed and int(unnamed.group(1)) < 26 else label


def as_diarized_json(transcript: Transcript) -> dict:
    """OpenAI's `diarized_json` (gpt-4o-transcribe-diarize): one segment per run of one speaker's
    words (a Whisper segment that holds a change of speaker is split at it, by the words'
    speakers from transcript_join), each `{type, id, start, end, speaker, text}`; usage in seconds."""
    segments: list[dict] = []
    for segment in transcript.segments:
        timed = [w for w in segment.words if w.start is not None and w.end is not None]
        runs: list[list] = []
        for word in timed:
            if runs and runs[-1][0] == word.speaker:
                runs[-1][1].append(word)
            else:
                runs.append([word.speaker, [word]])
        if len(runs) <= 1:  # one speaker (or no timed words): the segment as it is
            spans = [(segment.start, segment.end, segment.speaker, segment.text.strip())]
        else:
            spans = [(words[0].start, words[-1].end, speaker, " ".join(w.text.strip() for w in words))
                     for speaker, words in runs]
        for start, end, speaker, text in spans:
            segments.append({"type": "transcript.text.segment", "id": f"seg_{len(segments)}", "start": start,
                             "end": end, "speaker": speaker_letter(speaker), "text": text})
    duration = float(transcript.duration or (transcript.segments[-1].end if transcript.segments else 0.0))
    return {"task": "transcribe", "duration": duration, "text": transcript.text, "segments": segments,
            "usage": {"type": "duration", "seconds": duration}}
