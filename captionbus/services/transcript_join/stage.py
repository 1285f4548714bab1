"""transcript_join: the transcripts of a film's chunks (each already in film times, from the asr
stage's `item` requests) -> one transcript, segments in time order. Inputs: `transcripts` (a list,
in chunk order), optional `language` (captionbus.contracts.speech.SpokenLanguage: the language detected once
for the job, which an empty list still needs), optional `turns` (captionbus.contracts.speech.SpeakerTurns, the
diarization stage's whole-film turns): each word then takes the speaker of the turn covering most
of it and each segment its words' majority speaker (captionbus/core/speakers.py). A workflow without chunks
runs this stage on its one transcript for that alone (speech.yaml's `speaker_assign` node).
Nothing to load: the common env runs it."""
from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.transcript_join import TRANSCRIPT_JOIN
from captionbus.contracts.speech import SpeakerTurns, SpokenLanguage
from captionbus.contracts.transcript import Segment, Transcript
from captionbus.core.speakers import assign_segment, assign_speakers
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


def _key(segment: Segment) -> tuple[float, float]:
    return segment.start, segment.end


def _segment_json(segment: Segment) -> str:
    """A segment as it appears inside `Transcript.model_dump_json(indent=1)`: its own indent=1
    dump, two levels deeper (JSON strings hold no raw newline, so every line is shifted)."""
    return "\n".join("  " + line for line in segment.model_dump_json(indent=1).split("\n"))


class _Heads:
    """Segment-less copies of the chunks that decide join()'s header, whatever the film's length:
    the first (model, probability), the one with the longest duration (join takes the max), the
    first not aligned (aligned only if all are), the first in each language (the languages must
    agree). join() over these gives the header join() over every chunk gives."""

    def __init__(self):
        self.count = 0
        self.first: Transcript | None = None
        self.longest: Transcript | None = None
        self.unaligned: Transcript | None = None
        self.languages: dict[str, Transcript] = {}

    def add(self, part: Transcript) -> None:
        head = part.model_copy(update={"segments": []})
        self.count += 1
        if self.first is None:
            self.first = head
        if head.duration is not None and (self.longest is None or head.duration > self.longest.duration):
            self.longest = head
        if not head.aligned and self.unaligned is None:
            self.unaligned = head
        self.languages.setdefault(head.language, head)

    def kept(self) -> list[Transcript]:
        return [h for h in (self.first, self.longest, self.unaligned, *self.languages.values()) if h is not None]


class Unordered(Exception):
    """A chunk's segments start before an earlier chunk's last one: the stream cannot be joined
    in one pass (join_in_memory sorts them all)."""


def join_streaming(parts: Iterable[Transcript], language: SpokenLanguage | None, turns: SpeakerTurns | None, out: Path) -> dict[str, float]:
    """`parts` (an iterable of Transcript, parsed one at a time) joined into `out`, byte for byte
    what join_in_memory writes, holding one chunk's transcript at a time; raises Unordered when a
    chunk starts before the previous one ends (then the caller joins in memory).

    Why (issue 22): the in-memory join held every chunk's parsed transcript, the joined copy and its
    JSON text at once: pydantic models of every word, ~10x the JSON's size. On generated chunk
    transcripts like the asr stage's (30 s chunks of word-timed segments, 1.0 MB of JSON per hour
    of film) the stage's peak RSS grew +1.3 MB over the 55 MB of the process at rest for 10
    minutes of film, +9.8 MB for 1 hour and +19.9 MB for 2 hours; streamed: +0.2, +0.2 and +0.3 MB
    (`benchmarks/fanout.py --stages`: the handler alone in a fresh process, both ways in one run,
    the same file byte for byte). Through a plain `captionbus run` (`fanout.py --memory`): 50 vs
    50 MB peak RSS for a 10-minute vs a 1-hour film, where it was 50 vs 59 MB.

    How: the chunks come in film order, so the time-sorted segments of the whole film are each
    chunk's own sorted segments one chunk after another, provided no chunk starts before the last
    one's segments (checked, chunk by chunk: sorted() is stable, so equal keys keep chunk order
    either way). Each chunk's segments are written as they come to a spool file; the header
    (language, duration, model, aligned), which needs every chunk, is computed by join() itself
    from segment-less copies of the few chunks that decide it (_Heads) and written in front.
    """
    turns_sorted = sorted(turns.turns, key=lambda t: (t.start, t.end)) if turns is not None else None
    heads = _Heads()
    latest: tuple[float, float] | None = None
    counts = {"segments": 0, "words": 0, "words_without_speaker": 0}
    spool = out.with_name(out.name + ".segments")
    try:
        with open(spool, "w", encoding="utf-8") as body:
            for part in parts:
                heads.add(part)
                for segment in sorted(part.segments, key=_key):
                    # `not <=` and not `>`: a NaN time compares false both ways, and only sorting
                    # every segment together says where the old join put it
                    if latest is not None and not latest <= _key(segment):
                        raise Unordered(f"chunk {heads.count - 1} has a segment at {segment.start:g} s, "
                                        f"before an earlier one at {latest[0]:g} s")
                    latest = _key(segment)
                    if turns_sorted is not None:
                        segment = assign_segment(segment, turns_sorted)
                        counts["words_without_speaker"] += sum(w.speaker is None for w in segment.words)
                    body.write((",\n" if counts["segments"] else "") + _segment_json(segment))
                    counts["segments"] += 1
                    counts["words"] += len(segment.words)
        head = join(heads.kept(), language).model_dump_json(indent=1)
        assert head.endswith('"segments": []\n}'), head[-40:]
        with open(out, "wb") as whole, open(spool, "rb") as body:
            if counts["segments"]:
                whole.write((head[:-len("[]\n}")] + "[\n").encode())
                shutil.copyfileobj(body, whole)
                whole.write(b"\n ]\n}")
            else:
                whole.write(head.encode())
    finally:
        spool.unlink(missing_ok=True)
    return {"chunks": float(heads.count), **{k: float(v) for k, v in counts.items()}}


def join_in_memory(parts: list[Transcript], language: SpokenLanguage | None, turns: SpeakerTurns | None,
                   out: Path) -> dict[str, float]:
    """Every chunk parsed at once, sorted together: the join before issue 22, kept for chunks that
    overlap in time (never from the chunk stage's plan) and as the reference the streamed join is
    tested against (tests/unit/stages/test_transcript_join_stream.py)."""
    joined = join(parts, language)
    if turns is not None:
        joined = assign_speakers(joined, turns.turns)
    words = [w for s in joined.segments for w in s.words]
    out.write_text(joined.model_dump_json(indent=1))
    return {"chunks": float(len(parts)), "segments": float(len(joined.segments)), "words": float(len(words)),
            "words_without_speaker": float(sum(w.speaker is None for w in words) if turns is not None else 0)}


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    chunked = "transcripts" in request.input_lists
    language = ctx.input("language", SpokenLanguage) if "language" in request.inputs else None
    turns = ctx.input("turns", SpeakerTurns) if "turns" in request.inputs else None
    out = ctx.work_dir / "transcript.json"
    try:
        counts = join_streaming(ctx.input_items("transcripts", Transcript) if chunked else [], language, turns, out)
    except Unordered as unordered:
        ctx.log.info("chunks overlap in time: joined in memory", reason=str(unordered))
        counts = join_in_memory(ctx.input_list("transcripts", Transcript), language, turns, out)
    if turns is not None:
        ctx.metrics.update(speakers=float(len(turns.speakers)), words_without_speaker=counts["words_without_speaker"])
    ctx.metrics.update(chunks=counts["chunks"], segments=counts["segments"])
    ctx.progress(1.0, f"{counts['chunks']:.0f} chunks, {counts['segments']:.0f} segments")
    return {"transcript": out}


STAGE = StageDefinition(spec=TRANSCRIPT_JOIN, handle=handle)
