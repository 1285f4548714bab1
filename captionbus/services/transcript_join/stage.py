"""transcript_join: the transcripts of a film's chunks (each already in film times, from the asr
stage's `item` requests) -> one transcript, segments in time order. Inputs: `transcripts` (a list,
in chunk order), optional `language` (captionbus.contracts.speech.SpokenLanguage: the language detected once
for the job, which an empty list still needs), optional `turns` (captionbus.contracts.speech.SpeakerTurns, the
diarization stage's whole-film turns): each word then takes the speaker of the turn covering most
of it and each segment its words' majority speaker (captionbus/core/speakers.py). A workflow without chunks
runs this stage on its one transcript for that alone (speech.yaml's `speaker_assign` node).
Nothing to load: the common env runs it."""
from __future__ import annotations

from pathlib import Path

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.transcript_join import TRANSCRIPT_JOIN
from captionbus.contracts.speech import SpeakerTurns, SpokenLanguage
from captionbus.contracts.transcript import Transcript
from captionbus.core.speakers import assign_speakers
from captionbus.services.runtime import BadInput, StageContext, StageDefinition


def join(parts: list[Transcript], language: SpokenLanguage | None) -> Transcript:
    """One transcript: segments of every part in time order; languages must agree. A `language`
    that says none (the chunk stage's without -s: one chunk detected it in its decode) is left out."""
    if language is not None and language.language is None:
        language = None
    languages = {p.language for p in parts} | ({language.language} if language else set())
    if len(languages) > 1:
        raise BadInput(f"chunk transcripts are in different languages ({', '.join(sorted(languages))}); "
                       "every chunk must decode with the job's one language")
    first = parts[0] if parts else None
    segments = sorted((s for p in parts for s in p.segments), key=lambda s: (s.start, s.end))
    durations = [p.duration for p in parts if p.duration is not None]
    return Transcript(
        language=language.language if language else (first.language if first else "en"),
        language_probability=language.probability if language else (first.language_probability if first else None),
        duration=max(durations) if durations else None,
        model=first.model if first else None,
        aligned=bool(parts) and all(p.aligned for p in parts),
        segments=segments,
    )


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    parts = ctx.input_list("transcripts", Transcript) if "transcripts" in request.input_lists else []
    language = ctx.input("language", SpokenLanguage) if "language" in request.inputs else None
    joined = join(parts, language)
    if "turns" in request.inputs:
        speakers = ctx.input("turns", SpeakerTurns)
        joined = assign_speakers(joined, speakers.turns)
        words = [w for s in joined.segments for w in s.words]
        ctx.metrics.update(speakers=float(len(speakers.speakers)),
                           words_without_speaker=float(sum(w.speaker is None for w in words)))
    out = ctx.work_dir / "transcript.json"
    out.write_text(joined.model_dump_json(indent=1))
    ctx.metrics.update(chunks=float(len(parts)), segments=float(len(joined.segments)))
    ctx.progress(1.0, f"{len(parts)} chunks, {len(joined.segments)} segments")
    return {"transcript": out}


STAGE = StageDefinition(spec=TRANSCRIPT_JOIN, handle=handle)
