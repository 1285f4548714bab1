"""Check cues against the rules: used on the engine's own output and on any file a user has."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Sequence

from captionbus.core.subtitles.cues import Cue
from captionbus.core.subtitles.formats import read_subtitles
from captionbus.core.subtitles.graphemes import display_len
from captionbus.core.subtitles.rules import Rules
from captionbus.core.subtitles.speakers import dashed, dialogue_words

# Every rule a file can break, in report order. `sync` needs word times, so only the engine checks it.
# speaker_line: no line holds two speakers' words (needs words with speakers: the engine's cues, our
# JSON); dialogue: a cue holding two speakers, or a line starting with the dialogue dash and speech
# (speakers.dialogue_words: "-20 degrees" is not one), has exactly two lines, each starting with the
# dash, one speaker each -- never three speakers in one cue.
RULE_NAMES = ("line_length", "line_count", "min_duration", "max_duration", "reading_speed",
              "min_gap", "overlap", "order", "speaker_line", "dialogue")
CPS_BUCKETS = (10.0, 12.0, 15.0, 17.0, 20.0, 25.0)


@dataclass(frozen=True)
class Violation:
    rule: str
    cue: int
    message: str


def cue_chars(lines: Sequence[str]) -> int:
    """Characters a viewer reads: graphemes, spaces included, line breaks not."""
    return sum(display_len(line) for line in lines)


def cue_cps(cue: Cue) -> float:
    dur = cue.end_ms - cue.start_ms
    chars = cue_chars(cue.lines)
    if dur <= 0:
        return float("inf") if chars else 0.0
    return chars * 1000.0 / dur


def _line_speakers(cue: Cue) -> list[set[str]] | None:
    """The speakers of each line's words, found by locating each word's text in the lines in order
    (so a dash or a name before a word does not matter); None when the words carry no speakers or
    do not match the lines (a hand-edited file)."""
    if not any(w.speaker is not None for w in cue.words):
        return None
    stream, line_of = "", []
    for k, line in enumerate(cue.lines):
        piece = "".join(line.split())
        stream += piece
        line_of += [k] * len(piece)
    found: list[set[str]] = [set() for _ in cue.lines]
    pos = 0
    for w in cue.words:
        text = "".join(w.text.split())
        if not text:
            continue
        at = stream.find(text, pos)
        if at < 0:
            return None
        if w.speaker is not None:
            found[line_of[at]].add(w.speaker)
        pos = at + len(text)
    return found


def _runs(labels: Sequence[str | None]) -> list[str]:
    out: list[str] = []
    for label in labels:
        if label is not None and (not out or out[-1] != label):
            out.append(label)
    return out


def speaker_violations(i: int, cue: Cue, rules: Rules) -> list[Violation]:
    out: list[Violation] = []
    dash = rules.dialogue_dash.strip() or rules.dialogue_dash
    per_line = _line_speakers(cue)
    if per_line is not None:
        for k, who in enumerate(per_line):
            if len(who) > 1:
                out.append(Violation("speaker_line", i, f"line {k + 1} holds {len(who)} speakers "
                                                        f"({', '.join(sorted(who))})"))
        runs = _runs([w.speaker for w in cue.words])
    else:
        runs = _runs(cue.voices)
    # a line is a speaker's by its dash only when speech follows it ("-20 degrees" is a number:
    # speakers.dialogue_words); a cue known to hold two speakers needs the dash on both lines
    spoken = any(dialogue_words(line, rules.dialogue_dash) is not None for line in cue.lines)
    if len(runs) > 2:
        out.append(Violation("dialogue", i, f"{len(set(runs))} speakers in {len(runs)} turns: a cue holds "
                                            f"at most two speakers, one line each"))
    elif (len(runs) == 2 or spoken) and (len(cue.lines) != 2 or
                                         not all(dashed(line, rules.dialogue_dash) for line in cue.lines)):
        what = "two speakers" if len(runs) == 2 else f"a line starting with {dash!r}"
        out.append(Violation("dialogue", i, f"{what} but not two lines each starting with {dash!r}"))
    return out


def check_cues(cues: Sequence[Cue], rules: Rules, fps: float | None = None) -> list[Violation]:
    out: list[Violation] = []
    gap = rules.min_gap_check_ms(fps)
    for i, cue in enumerate(cues):
        for line in cue.lines:
            if display_len(line) > rules.max_chars_per_line:
                out.append(Violation("line_length", i, f"{display_len(line)} > {rules.max_chars_per_line} chars: {line!r}"))
        if len(cue.lines) > rules.max_lines:
            out.append(Violation("line_count", i, f"{len(cue.lines)} lines > {rules.max_lines}"))
        dur = cue.end_ms - cue.start_ms
        if dur < rules.min_duration_check_ms:
            out.append(Violation("min_duration", i, f"{dur} ms < {rules.min_duration_check_ms} ms"))
        if dur > rules.max_duration * 1000:
            out.append(Violation("max_duration", i, f"{dur} ms > {rules.max_duration * 1000:.0f} ms"))
        cps = cue_cps(cue)
        if cps > rules.max_cps + 1e-9:
            out.append(Violation("reading_speed", i, f"{cps:.1f} chars/s > {rules.max_cps:g}"))
        if i:
            prev = cues[i - 1]
            if cue.start_ms < prev.start_ms:
                out.append(Violation("order", i, "starts before the previous cue"))
            elif cue.start_ms < prev.end_ms:
                out.append(Violation("overlap", i, f"overlaps the previous cue by {prev.end_ms - cue.start_ms} ms"))
            elif cue.start_ms - prev.end_ms < gap:
                out.append(Violation("min_gap", i, f"{cue.start_ms - prev.end_ms} ms after the previous cue < {gap} ms"))
        out += speaker_violations(i, cue, rules)
    return out


@dataclass
class Report:
    path: str | None
    rules: Rules
    cues: int
    violations: list[Violation]
    cps: list[float] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(RULE_NAMES, 0)
        for v in self.violations:
            counts[v.rule] = counts.get(v.rule, 0) + 1
        return counts

    @property
    def cues_with_violations(self) -> int:
        return len({v.cue for v in self.violations})

    @property
    def ok(self) -> bool:
        return not self.violations

    def cps_histogram(self) -> list[tuple[str, int]]:
        edges = (0.0, *CPS_BUCKETS, float("inf"))
        rows = []
        for lo, hi in zip(edges, edges[1:]):
            label = f"{lo:g}–{hi:g}" if hi != float("inf") else f"> {lo:g}"
            rows.append((label, sum(1 for c in self.cps if lo <= c < hi or (hi == float("inf") and c >= lo))))
        return rows

    def render(self, max_examples: int = 5) -> str:
        r = self.rules
        out = [f"{self.path or 'cues'}: {self.cues} cues, {self.cues_with_violations} with violations "
               f"(profile {r.profile}, {r.max_chars_per_line} chars x {r.max_lines} lines, "
               f"{r.min_duration:g}–{r.max_duration:g} s, {r.max_cps:g} chars/s, {r.min_gap_frames} frames gap)",
               "", f"{'rule':<16}{'violations':>10}"]
        out += [f"{rule:<16}{n:>10}" for rule, n in self.counts.items()]
        finite = sorted(c for c in self.cps if c != float("inf"))
        out += ["", "reading speed (chars/s)"]
        if finite:
            p90 = finite[min(len(finite) - 1, int(0.9 * len(finite)))]
            out.append(f"  median {median(finite):.1f}  p90 {p90:.1f}  max {max(self.cps):.1f}")
        out += [f"  {label:<10}{n:>6}" for label, n in self.cps_histogram()]
        if self.violations and max_examples:
            out += ["", "examples"]
            out += [f"  cue {v.cue + 1}: {v.rule}: {v.message}" for v in self.violations[:max_examples]]
        return "\n".join(out)


def check(cues: Sequence[Cue], rules: Rules, fps: float | None = None, path: str | None = None) -> Report:
    return Report(path, rules, len(cues), check_cues(cues, rules, fps), [cue_cps(c) for c in cues])


def check_file(path: str | Path, rules: Rules, fps: float | None = None, encoding: str | None = None) -> Report:
    return check(read_subtitles(path, encoding=encoding), rules, fps, str(path))
