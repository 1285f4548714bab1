"""Subtitles people can read: a rule engine from timed words to cues, formats, and a checker.

A plain library (no bus, no ML): the `subtitle_gen` stage and `captionbus subs` call it.

Public API (stable; everything else in this package is internal)::

    rules = load_rules(profile="default", language=None, path=None, **overrides) -> Rules
        # config/subtitles.yaml (captionbus.core.settings.config_path: packaged, or CAPTIONBUS_CONFIG's):
        # defaults <- languages[lang] <- profiles[profile] <- profiles[profile].languages[lang] <- overrides
    build_cues(transcript: captionbus.contracts.transcript.Transcript, rules: Rules, fps: float | None = None,
               speaker_names: Mapping[str, str] | None = None, name_style="brackets") -> CueResult
        # speakers (word's, else segment's): dialogue cues, voices, SDH names (speakers.py)
    distribute_translation(source_cues: Sequence[Cue], translated_texts: Sequence[str], rules: Rules,
                           fps: float | None = None) -> CueResult
    reflow(cues: Sequence[Cue], rules: Rules, fps: float | None = None) -> CueResult
    stream_cues(segments: Callable[[], Iterable[Segment]], rules, fps=None, speaker_names=None,
                name_style="brackets") -> Iterator[CueResult]   # build_cues in batches, as final
        # a file's dashed dialogue cue keeps its lines apart
    write_subtitles(cues, path, fmt: str | None = None, style=None) -> Path   # fmt: srt vtt ass json txt
    read_subtitles(path, fmt: str | None = None, encoding=None) -> list[Cue]  # srt vtt ass/ssa json
        # encoding detected unless given; a bad cue time raises SubtitleFileError naming the line
    check_cues(cues, rules, fps=None) -> list[Violation]
    check_file(path, rules: Rules, fps: float | None = None, encoding=None) -> Report  # .counts, .cps, .render(), .ok
    fix_file(path, out, rules: Rules, fps: float | None = None, fmt=None, encoding=None) -> CueResult

    Cue(start_ms: int, end_ms: int, lines: list[str], words: list[Word], speaker: str | None,
        voices: list[str])   # voices: per line, its speaker's WebVTT voice; [] without speakers
        .start / .end (seconds), .text ("\\n".join(lines))
    CueResult(cues: list[Cue], problems: list[Problem])
    Problem(rule: str, cue: int | None, message: str)
        # rule: a check rule (line_length, reading_speed, ...) or long_word, sync, empty_text

Guarantees of build_cues / distribute_translation / reflow:
- every input word with non-blank text is in exactly one cue, in input order (blank words are dropped);
- cue times are integer ms on the rules' 10 ms grid, in order, never overlapping, at least two frames
  apart (at `fps`, else the rules' default 24), each between min and max duration;
- no line holds two speakers; a cue holds two only as a dialogue cue (two lines, each starting with
  rules.dialogue_dash), never three; without speakers the output is what it was before speakers;
- every other rule (line length, line count, reading speed, staying with the speech) holds unless the
  input makes it impossible, and then each breach is in `problems` (a word longer than a line is
  reported as `long_word` and left whole, on its own cue).
Lengths are grapheme clusters (what the eye sees), so Devanagari conjuncts count once.
"""
from captionbus.core.subtitles.check import Report, Violation, check_cues, check_file
from captionbus.core.subtitles.cues import Cue, CueResult, Problem
from captionbus.core.subtitles.engine import build_cues, distribute_translation, fix_file, reflow, stream_cues
from captionbus.core.subtitles.formats import FORMATS, SubtitleFileError, read_subtitles, write_subtitles
from captionbus.core.subtitles.graphemes import display_len
from captionbus.core.subtitles.rules import Rules, load_rules

__all__ = [
    "FORMATS", "Cue", "CueResult", "Problem", "Report", "Rules", "SubtitleFileError", "Violation", "build_cues",
    "check_cues", "check_file", "display_len", "distribute_translation", "fix_file", "load_rules",
    "read_subtitles", "reflow", "stream_cues", "write_subtitles",
]
