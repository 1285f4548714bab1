r"""Cues to and from files. SRT, WebVTT and ASS go through pysubs2; JSON (cues with their words) and
plain text are ours, since pysubs2 has no format that carries words.

Speakers: WebVTT wraps each speaker's lines in a voice span, `<v Anna>-Are you coming?</v>`
(WebVTT, W3C, "cue voice span"), from the cue's `voices`; SRT and plain text carry only what the
lines say (dialogue dashes, names when asked for); ASS names the first speaker in the event's Name
field; JSON keeps `speaker`, the words' speakers and `voices`. A cue without voices is written as
it always was.

Text is written as the words are, whatever characters they hold. pysubs2 keeps an event's text in
ASS markup, so by default it reads `{…}` in a line as an override block and drops it from SRT and
WebVTT ("{laughs} hi" came out as "hi"); SRT and WebVTT are therefore written with
`keep_ssa_tags=True` (we never put style tags in a cue). WebVTT reads `<` as the start of a tag and
`&` as the start of a character reference, and a line holding `-->` as a timing line, so WebVTT
cue text is escaped (`&amp;`, `&lt;`, `&gt;`) and read back unescaped; pysubs2 does neither. A
literal `\N`, `\n` or `\h` inside a word still reads as a break or a space in every pysubs2
format (ASS has no escape for it); no model output seen here holds one. Reading is pysubs2's:
it still drops a `{…}` from SRT and WebVTT lines, and SRT itself has no escape for `-->`.

Writes are atomic (temp file + rename): a reader never sees half a subtitle file.
"""
from __future__ import annotations

import codecs
import html
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import pysubs2

from captionbus.contracts.transcript import Word
from captionbus.core.subtitles.cues import Cue
from captionbus.core.subtitles.speakers import vtt_voice

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


def vtt_escape(line: str) -> str:
    """A line of WebVTT cue text: `&`, `<` and `>` as character references (WebVTT, W3C, "cue text")."""
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def voiced_text(cue: Cue) -> str:
    """The cue's lines, escaped for WebVTT, with a voice span around each speaker's run of lines."""
    lines = [vtt_escape(line) for line in cue.lines]
    if len(cue.voices) != len(lines):
        return "\n".join(lines)
    runs: list[tuple[str, list[str]]] = []
    for voice, line in zip(cue.voices, lines):
        if runs and runs[-1][0] == voice:
            runs[-1][1].append(line)
        else:
            runs.append((voice, [line]))
    return "\n".join(f"<v {vtt_voice(voice)}>" + "\n".join(lines) + "</v>" for voice, lines in runs)


def to_ssafile(cues: Sequence[Cue], style: pysubs2.SSAStyle | None = None,
               voices: bool = False) -> pysubs2.SSAFile:
    subs = pysubs2.SSAFile()
    subs.info.update({"PlayResX": "1920", "PlayResY": "1080", "WrapStyle": "2"})  # 2: we break lines
    subs.styles["Default"] = style or default_ass_style()
    for cue in cues:
        event = pysubs2.SSAEvent(start=cue.start_ms, end=cue.end_ms, name=cue.speaker or "")
        event.plaintext = voiced_text(cue) if voices else cue.text
        subs.append(event)
    return subs


def _cue_json(c: Cue) -> dict:
    out = {"start": c.start, "end": c.end, "lines": c.lines, "speaker": c.speaker,
           "words": [w.model_dump() for w in c.words]}
    if c.voices:
        out["voices"] = c.voices
    return out


def _cues_json(cues: Sequence[Cue]) -> str:
    doc = {"schema": JSON_SCHEMA, "cues": [_cue_json(c) for c in cues]}
    return json.dumps(doc, ensure_ascii=False, indent=1) + "\n"


def render(cues: Sequence[Cue], fmt: str, style: pysubs2.SSAStyle | None = None) -> str:
    if fmt == "json":
        return _cues_json(cues)
    if fmt == "txt":
        return "".join(" ".join(c.lines) + "\n" for c in cues)
    if fmt not in FORMATS:
        raise ValueError(f"unknown subtitle format {fmt!r}; use one of {', '.join(FORMATS)}")
    subs = to_ssafile(cues, style, voices=fmt == "vtt")
    if fmt == "ass":
        return subs.to_string(fmt)
    return subs.to_string(fmt, keep_ssa_tags=True)


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
                    [Word.model_validate(w) for w in c.get("words", [])], c.get("speaker"),
                    [str(v) for v in c.get("voices") or []])
                for c in doc["cues"]]
    if fmt == "txt":
        raise ValueError("plain text has no times: it can be written, not read back as cues")
    subs = pysubs2.SSAFile.from_string(text, format_=fmt if fmt != "ass" else None)
    cues = []
    for e in subs:
        if e.is_comment:
            continue
        text = html.unescape(e.plaintext) if fmt == "vtt" else e.plaintext
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        cues.append(Cue(e.start, e.end, lines, speaker=e.name or None))
    return cues


class SubtitleFileError(ValueError):
    """A file that cannot be read as subtitles; the message says where (line N) and why."""


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode_subtitles(data: bytes, encoding: str | None = None) -> tuple[str, str]:
    """(text, the encoding it was read with).

    Without `encoding`: a byte-order mark says it; else UTF-8 when the bytes are valid UTF-8 (a
    legacy 8-bit file almost never is: its accented letters are lone high bytes); else Windows-1252,
    the superset of Latin-1 that legacy Western subtitle files are written in (Latin-1 itself for
    the five bytes cp1252 leaves undefined). NUL bytes without a UTF-16/32 mark mean binary, not text.
    A file in another legacy code page (KOI8-R, ISCII ...) needs --encoding; no guess is made for it.
    """
    if encoding:
        try:
            return data.decode(encoding), encoding
        except LookupError:
            raise SubtitleFileError(f"unknown encoding {encoding!r}") from None
        except UnicodeDecodeError as e:
            raise SubtitleFileError(f"not {encoding}: line {_line_of(data, e.start)} has bytes "
                                    f"{data[e.start:e.start + 4]!r} that {encoding} cannot decode") from None
    for bom, name in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(name), name
            except UnicodeDecodeError:
                break
    if b"\x00" in data:
        at = data.index(b"\x00")
        raise SubtitleFileError(f"not a text subtitle file (a NUL byte at offset {at}, line {_line_of(data, at)})")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


_SRT_TIME = r"\d{1,3}:\d{1,2}:\d{1,2}[,.]\d{1,3}"
_VTT_TIME = r"(?:\d{1,3}:)?\d{2}:\d{2}\.\d{3}"
_TIMING = {
    "srt": re.compile(rf"\s*{_SRT_TIME}\s*-->\s*{_SRT_TIME}\s*(?:[xXyY]\d.*)?"),
    "vtt": re.compile(rf"\s*{_VTT_TIME}\s*-->\s*{_VTT_TIME}(?:\s+.*)?"),
}


def check_timing_lines(text: str, fmt: str) -> None:
    """SRT and WebVTT cue times, strictly: pysubs2 skips a line it cannot read (`00:00:2x,000 -->
    ...`) and would fold it into the cue text; here it is an error that names the line. In SRT a
    cue number must be followed by its times."""
    pattern = _TIMING.get(fmt)
    if pattern is None:
        return
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if "-->" in line and not pattern.fullmatch(line):
            raise SubtitleFileError(f"line {n}: cue times not readable as {fmt.upper()}: {line.strip()[:80]!r}")
        if (fmt == "srt" and line.strip().isdigit() and (n == 1 or not lines[n - 2].strip())
                and n < len(lines) and lines[n].strip() and "-->" not in lines[n]):
            raise SubtitleFileError(f"line {n + 1}: cue {line.strip()} has no times "
                                    f"(HH:MM:SS,mmm --> HH:MM:SS,mmm): {lines[n].strip()[:80]!r}")


def read_subtitles(path: str | Path, fmt: str | None = None, encoding: str | None = None) -> list[Cue]:
    """Cues from SRT, WebVTT, ASS/SSA or our JSON, in file order (times as written, in ms).

    The encoding is detected (decode_subtitles) unless given; cue times are read strictly
    (check_timing_lines). Raises SubtitleFileError naming the line."""
    path = Path(path)
    fmt = fmt or format_for(path)
    text, _ = decode_subtitles(path.read_bytes(), encoding)
    check_timing_lines(text, fmt)
    return parse_subtitles(text, fmt)
