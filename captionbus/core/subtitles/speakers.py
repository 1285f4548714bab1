"""Who speaks, on screen: dialogue dashes, SDH speaker names, WebVTT voices.

The style follows the Netflix Timed Text Style Guides (English (USA) and the English SDH guide,
partnerhelp.netflixstudios.com/hc/en-us/articles/217350977, "Dual Speakers"): "Use a hyphen
without a space to indicate two speakers in one subtitle, with a maximum of one speaker per line":

    -Are you coming?
    -In a minute.

So the default dash is "-" with no space (`Rules.dialogue_dash`, config/subtitles.yaml); other
languages' guides differ (several put a space or an en dash after it), which is why it is a rule a
language or profile can set, and a subtitle_gen param.

Speaker names (SDH): Netflix's SDH guides enclose speaker IDs in brackets ("Use brackets [ ] to
enclose speaker IDs or sound effects"; the Greek SDH guide, which follows the English one, words it
so), hence the default style "brackets": `[Anna] Hello.`; "colon" gives the US broadcast-caption
form `ANNA: Hello.`. A name is written where a speaker starts talking (a change of speaker, or the
first words of the film), not on every cue: a speaker who carries on after a pause keeps the
screen without it, as a caption editor would write it.

Names map diarization labels ("SPEAKER_00"), which mean nothing to a viewer, to people. A key is,
in this order: a label exactly as the transcript has it; or the speaker's place in order of first
appearance, as a number ("1" = whoever speaks first) or a letter ("A" = first, "B" = second ...).
So `A=Anna,B=Ben` names the first two voices heard whatever labels the diarizer gave them, and
`SPEAKER_03=Ben` names one label. A label the mapping does not name keeps no visible name (its
WebVTT voice is the label).
"""
from __future__ import annotations

import string
from typing import Iterable, Literal, Mapping

NameStyle = Literal["brackets", "colon"]
NAME_STYLES: tuple[str, ...] = ("brackets", "colon")


def appearance_order(labels: Iterable[str | None]) -> list[str]:
    """Distinct labels in order of first appearance (None, no speaker, is skipped)."""
    return list(dict.fromkeys(label for label in labels if label is not None))


def _ordinal(key: str) -> int | None:
    """0-based place for "1", "2" ... or "A", "B" ...; None for anything else."""
    if key.isdigit() and int(key) >= 1:
        return int(key) - 1
    if len(key) == 1 and key in string.ascii_uppercase:
        return string.ascii_uppercase.index(key)
    return None


def resolve_names(names: Mapping[str, str] | None, order: list[str]) -> dict[str, str]:
    """label -> name, from a mapping whose keys are labels or places in `order` (see above).
    A raw label wins over a place: with labels "A" and "B", "A" is the label A."""
    if not names:
        return {}
    labels = set(order)
    out: dict[str, str] = {}
    for key, name in names.items():
        key = str(key).strip()
        if key in labels:
            out[key] = name
            continue
        place = _ordinal(key)
        if place is not None and place < len(order):
            out.setdefault(order[place], name)
    return out


def name_prefix(name: str, style: str = "brackets") -> str:
    if style == "colon":
        return f"{name.upper()}: "
    if style == "brackets":
        return f"[{name}] "
    raise ValueError(f"unknown speaker name style {style!r}; use one of {', '.join(NAME_STYLES)}")


def vtt_voice(name: str) -> str:
    """A voice span's annotation: WebVTT ends it at '>' and reads '&' as an escape, and a line break
    would end the cue; so they are escaped (and whitespace runs become one space)."""
    text = " ".join(name.split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
