"""The translation stage, written once for every backend (IndicTrans2, NLLB): a backend supplies
only a `Translator` (batch of texts in, batch out) and a loader for it.

Input: `transcript` (Transcript JSON in the source language, from asr/alignment).
Params: declaration.TranslationParams (`target_language` from the coordinator's
fan-out branch, `source_language` (default: the transcript's), `glossary`, `batch_size`,
`context`); service options: declaration.TranslationOptions and each backend's
subclass (`captionbus stages translation_nllb`).
Output: `transcript` (transcript.<target>.json): language=target, translated_from=source, one
segment per source segment with the same start/end, speaker and flags, the translated text,
no word times.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.translation import TranslationOptions, TranslationParams
from captionbus.contracts.languages import UnknownLanguage, check_language
from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.transcript import Segment, Transcript
from captionbus.core.subtitles import load_rules
from captionbus.core.translation_routes import Backend, backend_for_stage
from captionbus.services.runtime import BadInput, SetupContext, StageContext, StageDefinition
from captionbus.services.runtime.cache import model_identity
from captionbus.services.translation.glossary import (
    Glossary,
    GlossaryError,
    Term,
    parse_glossary,
    read_glossary_file,
    restore,
)
from captionbus.services.translation.units import (
    MAX_UNIT_SEGMENTS,
    SegmentText,
    group_units,
    split_translation,
)

UNTRANSLATED_FLAG = "untranslated"


class Translator(Protocol):
    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        """One output per input, same order. source/target are ISO 639-1 codes; the backend maps
        them to FLORES codes itself (captionbus.core.translation_routes). Called with batches."""

    def describe(self) -> str:
        """The loaded model for worker info, e.g. "facebook/nllb-200-distilled-600M (cpu)"."""


@dataclass
class TranslationService:
    """What setup() returns: the warm translator and what every job shares."""

    translator: Translator
    backend: Backend
    glossary: list[Term]
    batch_size: int
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)


def language_pair(params: TranslationParams, transcript: Transcript, backend: Backend) -> tuple[str, str]:
    target = params.target_language
    if not target:
        raise BadInput("no target_language given: say which language to translate into (-t)")
    source = params.source_language or transcript.language
    try:
        source, target = check_language(str(source)), check_language(str(target))
    except UnknownLanguage as unknown:
        raise BadInput(str(unknown))
    if source == target:
        raise BadInput(f"source and target language are both {source!r}: nothing to translate")
    if not backend.knows(source, target):
        missing = [code for code in (source, target) if code not in backend.languages]
        why = f"it has no {', '.join(missing)}" if missing else "config/translation.yaml routes this pair elsewhere"
        raise BadInput(
            f"{backend.stage} does not translate {source} -> {target} ({why}); "
            f"it knows {', '.join(sorted(backend.languages))}"
        )
    return source, target


def segments_per_unit(context: bool | int) -> int:
    """The `context` param as the most segments one unit may join."""
    if context is True:
        return MAX_UNIT_SEGMENTS
    if context is False:
        return 1
    return context


def setup_service(ctx: SetupContext, load: Callable[[SetupContext], Translator]) -> TranslationService:
    options: TranslationOptions = ctx.options
    # A broken service-wide glossary is the operator's error: fail at start, not per job.
    glossary = read_glossary_file(options.glossary) if options.glossary else []
    batch_size = options.batch_size
    started = time.monotonic()
    translator = load(ctx)
    load_seconds = time.monotonic() - started
    ctx.log.info("translator loaded", model=translator.describe(), seconds=round(load_seconds, 2),
                 glossary_terms=len(glossary))
    return TranslationService(translator, backend_for_stage(ctx.stage), glossary, batch_size, load_seconds)


def translate_transcript(service: TranslationService, transcript: Transcript, source: str, target: str,
                         glossary: Glossary, batch_size: int, max_segments: int,
                         ctx: StageContext) -> tuple[list[Segment], dict[str, float]]:
    """The translated segments (same count and times as the source) and the stage's metrics."""
    source_separator = load_rules(language=source).word_separator
    target_separator = load_rules(language=target).word_separator
    segments = transcript.segments
    units = group_units(
        [SegmentText(s.text, s.start, s.end, s.speaker) for s in segments],
        max_segments=max_segments, separator=source_separator,
    )
    protected = [glossary.protect(unit.text) for unit in units]
    texts: list[str] = ["" for _ in segments]
    untranslated: set[int] = set()
    lost_terms = 0
    started = time.monotonic()
    batches = [range(i, min(i + batch_size, len(units))) for i in range(0, len(units), batch_size)]
    for b, batch in enumerate(batches):
        ctx.progress(b / len(batches), f"translating {source} -> {target}: batch {b + 1}/{len(batches)}")
        with service.lock:
            outputs = service.translator.translate([protected[i].text for i in batch], source, target)
        ctx.check_cancelled()  # a batch can take a while on cpu; stop before the next one
        if len(outputs) != len(batch):
            raise RuntimeError(f"translator returned {len(outputs)} texts for {len(batch)}")
        for i, output in zip(batch, outputs):
            unit = units[i]
            output, lost = restore(protected[i], output or "", target_separator)
            lost_terms += lost
            if not output.strip():
                untranslated.update(unit.indices)  # keep the source words rather than show nothing
                parts = [segments[k].text.strip() for k in unit.indices]
            else:
                parts = split_translation(output, [segments[k].text for k in unit.indices], target_separator)
            for k, part in zip(unit.indices, parts):
                texts[k] = part
    seconds = time.monotonic() - started

    translated = [
        Segment(start=s.start, end=s.end, text=texts[k], words=[], speaker=s.speaker,
                flags=list(s.flags) + ([UNTRANSLATED_FLAG] if k in untranslated and UNTRANSLATED_FLAG not in s.flags else []))
        for k, s in enumerate(segments)
    ]
    if untranslated:
        ctx.warn(f"{len(untranslated)} segment(s) came back empty from the model and keep their source text "
                 f"(flagged {UNTRANSLATED_FLAG!r})")
    if lost_terms:
        ctx.warn(f"the model dropped {lost_terms} glossary placeholder(s); those terms were put back at about "
                 "their source position")
    metrics = {
        "translation_s": seconds,
        "units": float(len(units)),
        "segments": float(len(segments)),
        "batches": float(len(batches)),
        "chars_in": float(sum(len(u.text) for u in units)),
        "chars_out": float(sum(len(t) for t in texts)),
        "glossary_terms_protected": float(sum(len(p.replacements) for p in protected)),
        "glossary_placeholders_lost": float(lost_terms),
    }
    return translated, metrics


def translation_stage(spec: StageSpec, load: Callable[[SetupContext], Translator], report_packages: tuple[str, ...],
                      declare: Callable[[SetupContext], dict[str, str]] | None = None) -> StageDefinition:
    """The StageDefinition of a translation backend's service (`spec`: its declaration, whose
    name is its stage name in config/translation.yaml and whose options model is one of the
    TranslationOptions in captionbus/contracts/declarations/translation.py); `load` builds the
    Translator once per process; `declare` names the models `load` will read (slot -> source) without importing torch, so
    cache hits need not wait for them."""
    name = spec.name

    def setup(ctx: SetupContext) -> TranslationService:
        return setup_service(ctx, load)

    def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
        service: TranslationService = ctx.resources
        transcript = ctx.input("transcript", Transcript)
        params: TranslationParams = ctx.params
        source, target = language_pair(params, transcript, service.backend)
        try:
            job_terms = parse_glossary(params.glossary)
        except GlossaryError as bad:
            raise BadInput(str(bad))
        glossary = Glossary.for_target(service.glossary + job_terms, target)
        batch_size = params.batch_size or service.batch_size
        max_segments = segments_per_unit(params.context)

        segments, metrics = translate_transcript(service, transcript, source, target, glossary, batch_size,
                                                 max_segments, ctx)
        if not any(s.text.strip() for s in transcript.segments):
            ctx.warn("the transcript has no text; the translation is empty too")
        result = Transcript(
            language=target,
            duration=transcript.duration,
            model=_model_for_pair(service.translator, source, target),
            translated_from=source,
            segments=segments,
        )
        out = ctx.work_dir / f"transcript.{target}.json"
        out.write_text(result.model_dump_json(indent=1))
        ctx.metrics.update(model_load_s=service.load_seconds, **metrics)
        ctx.progress(1.0, f"{len(segments)} segments translated into {target}")
        return {"transcript": out}

    def describe_model(resources: TranslationService | None) -> str | None:
        return resources.translator.describe() if resources is not None else None

    def declare_model(ctx: SetupContext) -> str:
        sources = declare(ctx)  # type: ignore[misc]
        table = {slot: model_identity(name, source) for slot, source in sorted(sources.items())}
        return f"{name}|" + json.dumps(table, sort_keys=True)

    return StageDefinition(spec=spec, handle=handle, setup=setup, report_packages=report_packages,
                           describe_model=describe_model,
                           declare_model=declare_model if declare is not None else None)


def _model_for_pair(translator: Translator, source: str, target: str) -> str:
    """The model that translated this pair (a backend with one model per direction says which);
    describe() names them all, which keeps worker info and cache keys stable."""
    describe_pair = getattr(translator, "describe_pair", None)
    return describe_pair(source, target) if describe_pair is not None else translator.describe()
