"""Glossary: terms a translation must keep as they are (names, Hinglish words) or map to a given
target term. Pure; no ML here.

How: before translation each term occurrence is replaced by a numbered placeholder `[N]`, which
translation models pass through as they pass citation marks and numbers (sentencepiece
vocabularies have `[`, `]` and digits, so the tokenizer keeps it intact); after translation each
placeholder becomes the term's target text. A placeholder the model dropped or mangled is not
lost silently: the term is inserted at about the place it had in the source, and the caller is
told how many were (it warns).

Formats: a list of `[source, target]` pairs (target empty/missing or equal = keep), a list of
plain strings (keep), a `{source: target}` mapping, or TSV text `source<TAB>target[<TAB>langs]`
with `#` comments, where `langs` (comma-separated ISO 639-1 target codes) limits a line to
those target languages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from captionbus.contracts.declarations.translation import MAX_GLOSSARY_TERMS, MAX_TERM_CHARS

PLACEHOLDER = "[{n}]"
# What a model may have made of a placeholder: spaces inside the brackets, native digits
# (\d is any Unicode digit here), full-width brackets.
_PLACEHOLDER_FOUND = regex.compile(r"[\[［]\s*(\d{1,7})\s*[\]］]")
# A job's glossary travels in its request: bounded so it cannot make every unit slow (the same
# bounds the params model holds the request to; a service's glossary file too).
MAX_TERMS = MAX_GLOSSARY_TERMS
_WORD_CHAR = r"[\p{L}\p{M}\p{N}_]"


class GlossaryError(ValueError):
    """The glossary given cannot be read; the message says where and why."""


@dataclass(frozen=True)
class Term:
    source: str
    target: str = ""  # empty = keep the source text as it was written
    languages: frozenset[str] = frozenset()  # target languages this applies to; empty = all

    @property
    def keep(self) -> bool:
        return not self.target or self.target == self.source


@dataclass
class Protected:
    """A text with its glossary terms replaced by placeholders, and what each one stands for."""

    text: str
    replacements: dict[int, str] = field(default_factory=dict)  # placeholder number -> final text
    positions: dict[int, float] = field(default_factory=dict)  # number -> where it was, 0..1 of the text


def parse_glossary(value: Any, where: str = "glossary") -> list[Term]:
    """Terms from a job param or file content (formats in the module docstring)."""
    terms = _parse_glossary(value, where)
    if len(terms) > MAX_TERMS:
        raise GlossaryError(f"{where}: {len(terms)} terms; at most {MAX_TERMS} are allowed")
    long = next((t for t in terms if max(len(t.source), len(t.target)) > MAX_TERM_CHARS), None)
    if long is not None:
        raise GlossaryError(f"{where}: term {long.source[:40]!r}… is longer than {MAX_TERM_CHARS} characters")
    return terms


def _parse_glossary(value: Any, where: str) -> list[Term]:
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        return _parse_tsv(value, where)
    if isinstance(value, dict):
        value = list(value.items())
    if not isinstance(value, (list, tuple)):
        raise GlossaryError(f"{where}: expected a list of [source, target] pairs or TSV text, got {type(value).__name__}")
    terms = []
    for n, entry in enumerate(value, 1):
        if isinstance(entry, str):
            entry = [entry]
        if not isinstance(entry, (list, tuple)) or not 1 <= len(entry) <= 2 or not all(isinstance(e, str) or e is None for e in entry):
            raise GlossaryError(f"{where}: entry {n} ({entry!r}) is not [source, target] text")
        terms.append(_term(entry[0], entry[1] if len(entry) > 1 else "", "", f"{where} entry {n}"))
    return terms


def read_glossary_file(path: str | Path) -> list[Term]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise GlossaryError(f"glossary file {path} cannot be read ({err})") from None
    return _parse_tsv(text, str(path))


def _parse_tsv(text: str, where: str) -> list[Term]:
    terms = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        columns = line.split("\t")
        if len(columns) > 3:
            raise GlossaryError(f"{where} line {n}: expected source<TAB>target[<TAB>languages], got {len(columns)} columns")
        columns += [""] * (3 - len(columns))
        terms.append(_term(columns[0], columns[1], columns[2], f"{where} line {n}"))
    return terms


def _term(source: str | None, target: str | None, languages: str, where: str) -> Term:
    source, target = (source or "").strip(), (target or "").strip()
    if not source:
        raise GlossaryError(f"{where}: the source term is empty")
    codes = frozenset(c.strip().lower() for c in languages.split(",") if c.strip())
    return Term(source, "" if target == source else target, codes)


class Glossary:
    """Terms for one target language, matched as whole words, case-insensitively, longest first."""

    def __init__(self, terms: list[Term]):
        by_key: dict[str, Term] = {}
        for term in terms:  # a later entry (the job's) overrides an earlier one (the service's)
            by_key[term.source.casefold()] = term
        self.terms = sorted(by_key.values(), key=lambda t: len(t.source), reverse=True)
        self._by_key = by_key
        self._pattern = (
            regex.compile(
                rf"(?<!{_WORD_CHAR})(?:{'|'.join(regex.escape(t.source) for t in self.terms)})(?!{_WORD_CHAR})",
                regex.IGNORECASE,
            )
            if self.terms
            else None
        )

    @classmethod
    def for_target(cls, terms: list[Term], target: str) -> "Glossary":
        return cls([t for t in terms if not t.languages or target in t.languages])

    def __len__(self) -> int:
        return len(self.terms)

    def _term_for(self, matched: str) -> Term:
        term = self._by_key.get(matched.casefold())
        if term is None:  # case folding that changes length (rare): find it the slow way
            term = next(t for t in self.terms if regex.fullmatch(regex.escape(t.source), matched, regex.IGNORECASE))
        return term

    def protect(self, text: str) -> Protected:
        if self._pattern is None:
            return Protected(text)
        # Numbers above any bracketed number already in the text, so a literal "[2]" stays literal.
        first = 1 + max((int(m.group(1)) for m in _PLACEHOLDER_FOUND.finditer(text)), default=0)
        protected = Protected(text)
        pieces, last = [], 0
        for n, match in enumerate(self._pattern.finditer(text), first):
            term = self._term_for(match.group(0))
            pieces += [text[last : match.start()], PLACEHOLDER.format(n=n)]
            protected.replacements[n] = match.group(0) if term.keep else term.target
            # where the term sat in the text around it (its own length left out: the translation
            # it may have to be put back into does not have it)
            protected.positions[n] = match.start() / max(len(text) - len(match.group(0)), 1)
            last = match.end()
        pieces.append(text[last:])
        protected.text = "".join(pieces)
        return protected


def restore(protected: Protected, translation: str, separator: str = " ") -> tuple[str, int]:
    """The translation with each placeholder replaced by its term, and how many placeholders the
    model lost (their terms are inserted at about their source position instead)."""
    if not protected.replacements:
        return translation, 0
    seen: set[int] = set()

    def put_back(match: regex.Match) -> str:
        n = int(match.group(1))
        if n not in protected.replacements:
            return match.group(0)
        seen.add(n)
        return protected.replacements[n]

    text = _PLACEHOLDER_FOUND.sub(put_back, translation)
    lost = [n for n in protected.replacements if n not in seen]
    # Insert from the last to the first so earlier positions stay valid.
    for n in sorted(lost, key=lambda n: protected.positions[n], reverse=True):
        text = _insert_at_boundary(text, protected.replacements[n], protected.positions[n], separator)
    return text, len(lost)


def _insert_at_boundary(text: str, term: str, fraction: float, separator: str) -> str:
    if not text.strip():
        return term
    wanted = round(fraction * len(text.strip()))
    if separator:
        # the nearest word boundary (string start, or just after a space)
        text = text.strip()
        boundaries = [0] + [i + 1 for i, c in enumerate(text) if c.isspace()] + [len(text)]
        at = min(boundaries, key=lambda b: abs(b - wanted))
        if at == len(text):
            return text + separator + term
        return text[:at] + term + separator + text[at:]
    return text[:wanted] + term + text[wanted:]
