"""subtitle_gen: transcript JSON -> SRT and WebVTT, laid out by the subtitle rule engine
(captionbus.core.subtitles: line length, line count, reading speed, min/max duration, gaps, sync;
written through pysubs2).

Inputs: `transcript`; optional `probe` (demux's probe JSON: its fps sets the minimum gap of
two frames).
Params: declaration.SubtitleGenParams: `language` (picks the language's rules and
names the files subtitles.<lang>.<format>; default: the transcript's language), `profile` (a
profile of config/subtitles.yaml), `formats` (default [srt, vtt]; also ass, json, txt),
`speaker_names` / `name_style` (SDH names where a speaker starts talking), `dialogue_dash`.

Speakers: when the transcript's words or segments carry speakers (the diarization stage), no
line holds two, a two-speaker cue is a dashed dialogue cue, and WebVTT wraps each speaker's
lines in a voice span `<v SPEAKER_00>` (or the name). Without speakers the files are exactly
what they were before speakers existed (captionbus.core.subtitles.speakers).
Outputs: one per format, named after it: `srt`, `vtt` by default.
"""
from __future__ import annotations

import json
from pathlib import Path

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.subtitle_gen import SUBTITLE_GEN, SubtitleGenParams
from captionbus.contracts.languages import UnknownLanguage, check_language
from captionbus.contracts.transcript import Segment, Transcript
from captionbus.core.subtitles import CueResult, load_rules, stream_cues, write_subtitles
from captionbus.services.runtime import BadInput, StageContext, StageDefinition


def video_fps(request: StageRequest, ctx: StageContext) -> float | None:
    if "probe" not in request.inputs:
        return None
    try:
        fps = json.loads(ctx.input_path("probe").read_text()).get("fps")
    except (OSError, ValueError, AttributeError):
        return None  # timing falls back to the rules' default fps; not worth failing a job
    return float(fps) if fps else None


def lay_out(segments, rules, fps: float | None, params: SubtitleGenParams, keep_words: bool) -> CueResult:
    """build_cues' cues and problems, laid out as the transcript's segments are read (stream_cues).

    Why (issue 22): the stage held the whole film's transcript as pydantic models (every word
    ~1.1 KB, ~8x its JSON), the engine's tokens and the cues with their words, all at once. Now
    it reads the transcript once to find its segments, then one segment at a time from the file,
    a few cues' worth of words, and the cues without their words (the words go into the file
    only for `json`, so then they stay). Measured by `benchmarks/fanout.py --stages` (the handler
    alone in a fresh process on generated asr-like transcripts: 1.06 MB of chunk JSON per hour of
    film), peak RSS over the process at rest (55 MB), whole transcript vs streamed, one run, same
    files byte for byte: 10 minutes +1.5 vs +0.1 MB, 1 hour +12.4 vs +1.4 MB, 2 hours +26.5 vs
    +3.3 MB. What still grows, ~1.5 MB per hour of film, is the subtitles' own text: the
    transcript's JSON while it is scanned (1 MB an hour), then the cues without words (~0.4 MB an
    hour) and the files pysubs2 renders from them at the end (a whole file at a time). Through a
    plain `captionbus run` (`fanout.py --memory`): 56 vs 55 MB peak RSS for a 10-minute vs a
    1-hour film, where it was 55 vs 67 MB.
    """
    cues, problems = [], []
    for batch in stream_cues(segments, rules, fps=fps, speaker_names=params.speaker_names,
                             name_style=params.name_style):
        if not keep_words:
            for cue in batch.cues:
                cue.words = []  # checked: only the json format writes them
        cues += batch.cues
        problems += batch.problems
    return CueResult(cues, problems)


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    params: SubtitleGenParams = ctx.params
    transcript, segments = ctx.input_parts("transcript", Transcript, "segments", Segment)
    try:
        language = check_language(params.language or transcript.language)
    except UnknownLanguage as unknown:
        raise BadInput(str(unknown))
    try:
        dash = {"dialogue_dash": params.dialogue_dash} if params.dialogue_dash is not None else {}
        rules = load_rules(profile=params.profile, language=language, **dash)
    except ValueError as bad_profile:
        raise BadInput(str(bad_profile))

    formats = list(dict.fromkeys(params.formats))
    result = lay_out(segments, rules, video_fps(request, ctx), params, keep_words="json" in formats)
    if not result.cues:
        ctx.warn("the transcript has no speech; the subtitle files have no cues")
    if result.problems:
        # Breaches the input made unavoidable (e.g. a word longer than a line): worth a look.
        rules_broken = sorted({p.rule for p in result.problems})
        ctx.warn(f"{len(result.problems)} cue(s) could not meet every rule ({', '.join(rules_broken)})")

    outputs = {fmt: write_subtitles(result.cues, ctx.work_dir / f"subtitles.{language}.{fmt}", fmt) for fmt in formats}
    ctx.metrics["cues"] = float(len(result.cues))
    ctx.metrics["rule_problems"] = float(len(result.problems))
    ctx.metrics["dialogue_cues"] = float(sum(len(set(c.voices)) > 1 for c in result.cues))
    ctx.progress(1.0, f"{len(result.cues)} cues")
    return outputs


STAGE = StageDefinition(spec=SUBTITLE_GEN, handle=handle, report_packages=("pysubs2", "pydantic", "PyYAML"))
