"""subtitle_gen: transcript JSON -> SRT and WebVTT (pysubs2).

Params: `language` (ISO 639-1, names the files: subtitles.<lang>.srt/.vtt; default: the
transcript's language).
Outputs: `srt`, `vtt`.

The cue layout here is deliberately simple (see `simple_cues`); the full rule engine
(captionbus/subtitles, issue 3) replaces that one function when it lands.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydantic
import pysubs2

from contracts.languages import UnknownLanguage, check_language
from contracts.transcript import Segment, Transcript, Word
from services.runtime import BadInput, StageContext, StageDefinition
from contracts import StageRequest

MAX_LINE_CHARS = 42
MAX_LINES = 2
MAX_CUE_SECONDS = 7.0
MIN_CUE_SECONDS = 0.7  # shorter cues flash by unread; extended into the gap when there is one


@dataclass
class SimpleCue:
    start: float
    end: float
    lines: list[str]


def wrap_lines(text: str, max_chars: int = MAX_LINE_CHARS) -> list[str] | None:
    """One line if it fits, else two lines split at the most balanced word boundary;
    None when the text cannot fit in two lines."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return [text]
    words = text.split(" ")
    best: tuple[int, list[str]] | None = None
    for cut in range(1, len(words)):
        top, bottom = " ".join(words[:cut]), " ".join(words[cut:])
        if len(top) <= max_chars and len(bottom) <= max_chars:
            imbalance = abs(len(top) - len(bottom))
            if best is None or imbalance < best[0]:
                best = (imbalance, [top, bottom])
    return best[1] if best else None


def _timed_words(segment: Segment) -> list[Word]:
    """The segment's words with times; words without times get them by spreading the segment
    span over characters, so every word can be placed."""
    words = [w for w in segment.words if w.text.strip()]
    if not words:
        words = [Word(text=t) for t in segment.text.split()]
    if all(w.start is not None and w.end is not None for w in words):
        return words
    total_chars = sum(len(w.text.strip()) + 1 for w in words) or 1
    span = max(segment.end - segment.start, 0.0)
    cursor, timed = segment.start, []
    for w in words:
        length = span * (len(w.text.strip()) + 1) / total_chars
        timed.append(Word(text=w.text, start=cursor, end=cursor + length, score=w.score))
        cursor += length
    return timed


def simple_cues(transcript: Transcript) -> list[SimpleCue]:
    """Greedy layout: fill a cue word by word while it fits in MAX_LINES lines of
    MAX_LINE_CHARS and lasts at most MAX_CUE_SECONDS; a segment never shares a cue with
    the next one (segments end at sentences or pauses)."""
    cues: list[SimpleCue] = []
    for segment in transcript.segments:
        pending: list[Word] = []
        for word in _timed_words(segment):
            candidate = pending + [word]
            text = " ".join(w.text.strip() for w in candidate)
            too_long = candidate[-1].end - candidate[0].start > MAX_CUE_SECONDS
            if pending and (too_long or wrap_lines(text) is None):
                cues.append(_cue_of(pending))
                pending = [word]
            else:
                pending = candidate
        if pending:
            cues.append(_cue_of(pending))
    return _fix_timing(cues)


def _cue_of(words: list[Word]) -> SimpleCue:
    text = " ".join(w.text.strip() for w in words)
    lines = wrap_lines(text) or [text]  # a single over-long word stays whole
    return SimpleCue(start=float(words[0].start), end=float(words[-1].end), lines=lines)


def _fix_timing(cues: list[SimpleCue]) -> list[SimpleCue]:
    """No overlaps; too-short cues stretched into the following gap."""
    for i, cue in enumerate(cues):
        next_start = cues[i + 1].start if i + 1 < len(cues) else None
        if cue.end - cue.start < MIN_CUE_SECONDS:
            cue.end = cue.start + MIN_CUE_SECONDS
        if next_start is not None and cue.end > next_start:
            cue.end = max(next_start, cue.start + 0.001)
    return cues


def write_subtitles(cues: list[SimpleCue], srt_path: Path, vtt_path: Path) -> None:
    subs = pysubs2.SSAFile()
    for cue in cues:
        subs.append(pysubs2.SSAEvent(start=round(cue.start * 1000), end=round(cue.end * 1000), text=r"\N".join(cue.lines)))
    subs.save(str(srt_path), format_="srt")
    subs.save(str(vtt_path), format_="vtt")


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    try:
        transcript = Transcript.model_validate_json(ctx.input_path("transcript").read_bytes())
    except pydantic.ValidationError as invalid:
        raise BadInput(f"transcript is not valid transcript JSON: {invalid.errors()[0]['msg']}")
    try:
        language = check_language(request.params.get("language") or transcript.language)
    except UnknownLanguage as unknown:
        raise BadInput(str(unknown))

    cues = simple_cues(transcript)
    if not cues:
        ctx.warn("the transcript has no speech; the subtitle files have no cues")
    srt_path = ctx.work_dir / f"subtitles.{language}.srt"
    vtt_path = ctx.work_dir / f"subtitles.{language}.vtt"
    write_subtitles(cues, srt_path, vtt_path)
    ctx.metrics["cues"] = float(len(cues))
    ctx.progress(1.0, f"{len(cues)} cues")
    return {"srt": srt_path, "vtt": vtt_path}


STAGE = StageDefinition(name="subtitle_gen", handle=handle, report_packages=("pysubs2", "pydantic"))
