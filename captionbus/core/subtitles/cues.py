"""The values the engine hands out: cues, and problems it could not avoid."""
from __future__ import annotations

from dataclasses import dataclass, field

from captionbus.contracts.transcript import Word


@dataclass
class Cue:
    start_ms: int
    end_ms: int
    lines: list[str]
    words: list[Word] = field(default_factory=list)
    speaker: str | None = None
    # Per line, the WebVTT voice of whoever says it (a name, or the diarizer's label); empty when
    # the transcript has no speakers. Two different voices: a dialogue cue.
    voices: list[str] = field(default_factory=list)

    @property
    def start(self) -> float:
        return self.start_ms / 1000

    @property
    def end(self) -> float:
        return self.end_ms / 1000

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class Problem:
    """A rule a cue breaks because the input left no way to meet it (e.g. a word longer than a line)."""
    rule: str
    cue: int | None
    message: str


@dataclass
class CueResult:
    cues: list[Cue]
    problems: list[Problem] = field(default_factory=list)
