"""chunk: the vad stage's speech regions -> chunks cut at silences (captionbus.contracts.speech.SpeechChunks
JSON), one asr request each: the workflow fans out over them (`for_each: chunk.chunks`), and the
count goes back to the coordinator in `StageCompleted.items`. Cutting rules: captionbus/services/chunk/plan.py.
Params (declaration.ChunkParams): target_s (0: one chunk), min_silence_s, max_s, chunk_above_s
(audio no longer than it is one chunk while target_s is unset: the default workflows chunk only films
long enough to gain from it; captionbus.core.settings chunk_above_s says why its default).
No model, no audio: it reads a few kilobytes of JSON, in the common env. It also writes the
`language` output (SpokenLanguage): the job's language (-s), so the chunks need no
language-detection request on the asr queue first (one queue wait less for every such job), or
none (null) without -s. The workflows' `language` node detects once for a job of several chunks
(`when_items: chunk.chunks > 1`); a job of one chunk (every clip under chunk_above_s) reads the
null and detects in its one asr request, on the same speech the separate request heard."""
from __future__ import annotations

import math
from pathlib import Path

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.chunk import CHUNK, ChunkParams
from captionbus.contracts.speech import SpeechRegions, SpokenLanguage
from captionbus.core.settings import load as load_settings
from captionbus.services.chunk.plan import plan_chunks
from captionbus.services.runtime import BadInput, StageContext, StageDefinition

# Every chunk is a node of the job's state (one KV value, about 1 KB a node, under NATS's 1 MB
# message limit): 300 chunks is 2.5 to 4.5 hours of film at the default 30 s (a chunk runs to the
# next pause, or to Whisper's next window: 30-55 s). A longer film with target_s
# unset gets longer chunks (the default stretches); a target_s the job gave is kept, and too many
# chunks is refused with the --chunk-s that would fit.
MAX_CHUNKS = 300


def fitting_target_s(duration_s: float) -> float:
    """A target length that cuts `duration_s` into at most MAX_CHUNKS chunks: a chunk ends at the
    first pause after the target, so chunks run a little longer than it and the count stays under
    duration / target; the 1.5 margin covers chunks that end early (max_s, the audio's end)."""
    return float(math.ceil(duration_s / MAX_CHUNKS * 1.5))


def chunk_above_s(params: ChunkParams) -> float:
    """The length above which unset target_s cuts: the job's (or workflow's) chunk_above_s, else
    this worker's CAPTIONBUS_CHUNK_ABOVE_S (captionbus.core.settings: why its default)."""
    return params.chunk_above_s if params.chunk_above_s is not None else load_settings().chunk_above_s


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    params: ChunkParams = ctx.params
    regions = ctx.input("regions", SpeechRegions)
    spans = [(r.start, r.end) for r in regions.regions]
    if "target_s" not in params.model_fields_set and regions.duration <= chunk_above_s(params):
        params = params.model_copy(update={"target_s": 0.0})  # short audio: one chunk, one asr request
    chunks = plan_chunks(spans, regions.duration, params.target_s, params.min_silence_s, params.max_length_s)
    if len(chunks.chunks) > MAX_CHUNKS and "target_s" not in params.model_fields_set:
        stretched = params.model_copy(update={"target_s": fitting_target_s(regions.duration)})
        ctx.progress(0.0, f"{regions.duration / 3600:.1f} h of audio: chunks of {stretched.target_s:g} s, not "
                          f"{params.target_s:g} s (at most {MAX_CHUNKS} chunks a job)")
        params = stretched
        chunks = plan_chunks(spans, regions.duration, params.target_s, params.min_silence_s, params.max_length_s)
    if len(chunks.chunks) > MAX_CHUNKS:
        raise BadInput(f"target_s {params.target_s:g} cuts this {regions.duration / 60:.0f}-minute audio into "
                       f"{len(chunks.chunks)} chunks; at most {MAX_CHUNKS} (every chunk is a node in the job's "
                       f"state): use --chunk-s {fitting_target_s(regions.duration):.0f} or more")
    out = ctx.work_dir / "chunks.json"
    out.write_text(chunks.model_dump_json(indent=1))
    ctx.items["chunks"] = len(chunks.chunks)
    lengths = [c.end - c.start for c in chunks.chunks]
    ctx.metrics.update(chunks=float(len(lengths)), longest_chunk_s=max(lengths, default=0.0),
                       split_chunks=float(sum(c.split for c in chunks.chunks)))
    if any(c.split for c in chunks.chunks):
        ctx.warn(f"speech ran longer than max_s ({params.max_length_s:g} s) without a pause: "
                 f"cut inside speech {sum(c.split for c in chunks.chunks)} time(s); raise max_s to avoid it")
    ctx.progress(1.0, f"{len(lengths)} chunks")
    language = ctx.work_dir / "language.json"
    given = (params.source_language or "").strip().lower() or None
    language.write_text(SpokenLanguage(language=given).model_dump_json())
    return {"chunks": out, "language": language}


STAGE = StageDefinition(spec=CHUNK, handle=handle)
