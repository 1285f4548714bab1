"""Cues to and from files. SRT, WebVTT and ASS go through pysubs2; JSON (cues with their words) and
plain text are ours, since pysubs2 has no format that carries words.

Writes are atomic (temp file + rename): a reader never sees half a subtitle file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import pysubs2

from contracts.transcript import Word
from core.subtitles.cues import Cue

FORMATS = ("srt", "vtt", "ass", "json", "txt")
_SUFFIX = {".srt": "srt", ".vtt": "vtt", ".ass": "ass", ".ssa": "ass", ".json": "json", ".txt": "txt"}
JSON_SCHEMA = "captionbus.cues/1"


def format_for(path: str | Path) -> str:
    fmt = _SUFFIX.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"can't tell the subtitle format of {path}; use one of {', '.join(FORMATS)}")
    return fmt


def default_ass_style() -> pysubs2.SSAStyle:
    """Broadcast-looking: white sans on a dark outline, bottom centre, sized for 1080p."""
    return pysubs2.SSAStyle(
        fontname="Arial", fontsize=54, primarycolor=pysubs2.Color(255, 255, 255, 0),
        outlinecolor=pysubs2.Color(0, 0, 0, 0), backcolor=pysubs2.Color(0, 0, 0, 128),
        bold=False, outline=2.5, shadow=1.0, alignment=pysubs2.Alignment.BOTTOM_CENTER,
        marginl=96, marginr=96, marginv=60,
    )


def to_ssafile(cues: Sequence[Cue], style: pysubs2.SSAStyle | None = None) -> pysubs2.SSAFile:
    subs = pysubs2.SSAFile()
    subs.info.update({"PlayResX": "1920", "PlayResY": "1080", "WrapStyle": "2"})  # 2: we break lines
    subs.styles["Default"] = style or default_ass_style()
    for cue in cues:
        event = pysubs2.SSAEvent(start=cue.start_ms, end=cue.end_ms, name=cue.speaker or "")
        event.plaintext = cue.text
        subs.append(event)
    return subs


def _cues_json(cues: Sequence[Cue]) -> str:
    doc = {"schema": JSON_SCHEMA, "cues": [
        {"start": c.start, "end": c.end, "lines": c.lines, "speaker": c.speaker,
         "words": [w.model_dump() for w in c.words]} for c in cues]}
    return json.dumps(doc, ensure_ascii=False, indent=1) + "\n"


def render(cues: Sequence[Cue], fmt: str, style: pysubs2.SSAStyle | None = None) -> str:
    if fmt == "json":
        return _cues_json(cues)
    if fmt == "txt":
        return "".join(" ".join(c.lines) + "\n" for c in cues)
    if fmt not in FORMATS:
        raise ValueError(f"unknown subtitle format {fmt!r}; use one of {', '.join(FORMATS)}")
    return to_ssafile(cues, style).to_string(fmt)


def write_subtitles(cues: Sequence[Cue], path: str | Path, fmt: str | None = None,
                    style: pysubs2.SSAStyle | None = None) -> Path:
    path = Path(path)
    text = render(cues, fmt or format_for(path), style)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def parse_subtitles(text: str, fmt: str) -> list[Cue]:
    if fmt == "json":
        doc = json.loads(text)
        return [Cue(_ms(c["start"]), _ms(c["end"]), list(c["lines"]),
                    [Word.model_validate(w) for w in c.get("words", [])], c.get("speaker"))
                for c in doc["cues"]]
    if fmt == "txt":
        raise ValueError("plain text has no times: it can be written, not read back as cues")
    subs = pysubs2.SSAFile.from_string(text, format_=fmt if fmt != "ass" else None)
    cues = []
    for e in subs:
        if e.is_comment:
            continue
        lines = [line.strip() for line in e.plaintext.split("\n") if line.strip()]
        cues.append(Cue(e.start, e.end, lines, speaker=e.name or None))
    return cues


def read_subtitles(path: str | Path, fmt: str | None = None) -> list[Cue]:
    """Cues from SRT, WebVTT, ASS/SSA or our JSON, in file order (times as written, in ms)."""
    path = Path(path)
    return parse_subtitles(path.read_text(encoding="utf-8-sig"), fmt or format_for(path))
