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
import unicodedata
from typing import Iterable, Literal, Mapping, Sequence

NameStyle = Literal["brackets", "colon"]
NAME_STYLES: tuple[str, ...] = ("brackets", "colon")


def appearance_order(labels: Iterable[str | None]) -> list[str]:
    """Distinct labels in order of first appearance (None, no speaker, is skipped)."""
    return list(dict.fromkeys(label for label in labels if label is not None))


def _dash_and_rest(line: str, dash: str) -> tuple[str, str] | None:
    mark = dash.strip() or dash  # "- " also reads "-Hi" and "-" also "- Hi": files differ in spacing
    line = line.strip()
    if not mark or not line.startswith(mark) or not line[len(mark):].strip():
        return None
    return mark, line[len(mark):]


def dialogue_words(line: str, dash: str) -> str | None:
    """What the speaker says on a dialogue line (`line` without its dash), or None when the line
    is not one: only text decides here, as in a file someone hands `subs check`.

    The dash is a speaker's only when it is followed by a space, or directly by the start of speech
    (a letter, an opening quote or bracket, an ellipsis: "-Are you coming?", "-¿Vienes?",
    "-[Anna] Hi."). Text that merely starts with the dash character is not dialogue: "-20 degrees
    outside" (a minus sign before a number or an amount), "--" or a line of dashes ("-----",
    "- - -"). The Netflix style the engine writes has no space after the dash, so "-20 degrees"
    alone is ambiguous; it is read as the number. In a cue where another line is dialogue it is a
    speaker's (dialogue_cue)."""
    found = _dash_and_rest(line, dash)
    if found is None:
        return None
    mark, rest = found
    said = rest.lstrip()
    first = unicodedata.category(said[0])
    if first == "Pd" or said.startswith(mark):  # "--", "-----", "- - -"
        return None
    if said is rest and (first.startswith("N") or first == "Sc"):  # "-20", "-$5": a minus sign
        return None
    return said


def dialogue_cue(lines: Sequence[str], dash: str) -> list[str] | None:
    """The speakers' words, one per line, when `lines` read as a dialogue cue by their text: at
    least one line is a dialogue line (dialogue_words) and every line starts with the dash
    ("-Yes.", "-20 degrees." is two speakers); else None."""
    found = [_dash_and_rest(line, dash) for line in lines]
    if not lines or None in found or all(dialogue_words(line, dash) is None for line in lines):
        return None
    return [rest.strip() for _, rest in found]


def dashed(line: str, dash: str) -> bool:
    """Whether `line` starts with the dialogue dash and says something after it (the form every
    line of a cue known to hold two speakers must have)."""
    return _dash_and_rest(line, dash) is not None


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
