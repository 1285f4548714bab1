"""The rules a cue must meet, and where they come from (config/subtitles.yaml)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from captionbus.core import settings


@dataclass(frozen=True)
class Rules:
    max_chars_per_line: int = 42
    max_lines: int = 2
    min_duration: float = 0.833
    max_duration: float = 7.0
    max_cps: float = 17.0
    min_gap_frames: int = 2
    default_fps: float = 24.0
    max_lead: float = 0.5
    max_lag: float = 1.5
    max_start_delay: float = 0.3
    hard_pause: float = 2.0
    soft_pause: float = 0.4
    time_quantum_ms: int = 10
    word_separator: str = " "
    sentence_end: str = ".?!…"
    clause_end: str = ",;:–—"
    break_before: frozenset[str] = field(default_factory=frozenset)
    no_break_after: frozenset[str] = field(default_factory=frozenset)
    no_break_before: frozenset[str] = field(default_factory=frozenset)
    dialogue_dash: str = "-"  # starts each line of a two-speaker cue (captionbus.core.subtitles.speakers)
    profile: str = "default"
    language: str | None = None

    def replace(self, **changes: Any) -> "Rules":
        return dataclasses.replace(self, **changes)

    # Times in the engine are integer ms on a grid of time_quantum_ms, so that every
    # constraint that holds in memory still holds after a format rounds the times.
    def _up(self, ms: float) -> int:
        q = self.time_quantum_ms
        return int(math.ceil(ms / q - 1e-9)) * q

    def _down(self, ms: float) -> int:
        q = self.time_quantum_ms
        return int(math.floor(ms / q + 1e-9)) * q

    def min_gap_ms(self, fps: float | None = None) -> int:
        """What the engine produces: two frames, rounded up to the grid."""
        return self._up(self.min_gap_frames * 1000.0 / (fps or self.default_fps))

    def min_gap_check_ms(self, fps: float | None = None) -> int:
        """What the checker accepts: two frames, rounded down to whole ms (83 ms at 24 fps)."""
        return int(math.floor(self.min_gap_frames * 1000.0 / (fps or self.default_fps)))

    @property
    def min_duration_ms(self) -> int:
        return self._up(self.min_duration * 1000)

    @property
    def min_duration_check_ms(self) -> int:
        return int(math.floor(self.min_duration * 1000 + 1e-9))

    @property
    def max_duration_ms(self) -> int:
        return self._down(self.max_duration * 1000)

    @property
    def max_cue_chars(self) -> int:
        return self.max_chars_per_line * self.max_lines


_LIST_FIELDS = {"break_before", "no_break_after", "no_break_before"}
_FIELDS = {f.name for f in dataclasses.fields(Rules)} - {"profile", "language"}


def default_config_path() -> Path:
    return settings.config_path("subtitles.yaml")


def _apply(values: dict[str, Any], overrides: dict[str, Any] | None, where: str) -> None:
    for key, value in (overrides or {}).items():
        if key == "languages":
            continue
        if key not in _FIELDS:
            raise ValueError(f"{where}: unknown subtitle rule {key!r}")
        values[key] = value


def load_rules(profile: str = "default", language: str | None = None,
               path: Path | str | None = None, **overrides: Any) -> Rules:
    """Rules for a profile and language: defaults <- language <- profile <- profile's language <- overrides."""
    path = Path(path) if path else default_config_path()
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    profiles = config.get("profiles") or {}
    if profile not in profiles:
        raise ValueError(f"unknown subtitle profile {profile!r}; known: {', '.join(sorted(profiles))}")
    lang = (language or "").split("-")[0].lower() or None
    values: dict[str, Any] = {}
    _apply(values, config.get("defaults"), "defaults")
    if lang:
        _apply(values, (config.get("languages") or {}).get(lang), f"languages.{lang}")
    prof = profiles[profile] or {}
    _apply(values, prof, f"profiles.{profile}")
    if lang:
        _apply(values, (prof.get("languages") or {}).get(lang), f"profiles.{profile}.languages.{lang}")
    _apply(values, overrides, "overrides")
    for key in _LIST_FIELDS & values.keys():
        values[key] = frozenset(str(w).lower() for w in values[key] or ())
    return Rules(profile=profile, language=lang, **values)
