"""mux: the original media + SRT tracks -> soft-subtitled mp4 (mov_text) and mkv (srt).

Inputs: `media` (the original), input list `subtitles` (SRT files).
Params: declaration.MuxParams: `languages` (ISO 639-1 codes, same order as
`subtitles`); when absent, each file's language comes from its name as subtitle_gen writes it
(subtitles.<lang>.srt).
Outputs: `mp4`, `mkv`.

Video and audio are stream-copied (-c copy), never re-encoded. Each subtitle track is tagged
with its ISO 639-2 code and a title; the first is marked default so players show it.

Audio-only input (a podcast, an .m4a): both outputs are still written, holding the audio and
the subtitle tracks; an mp4 without video is a valid "audio with captions" file and keeps the
workflow's outputs uniform. Audio codecs mp4 cannot hold (PCM, Vorbis, TrueHD...) are
re-encoded to AAC in the mp4 only, with a warning event (the mkv keeps the original); a
video codec mp4 cannot hold is a BadInput naming it.
"""
from __future__ import annotations

import re
from pathlib import Path

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.mux import MUX, MuxParams
from captionbus.contracts.languages import LANGUAGES, UnknownLanguage, check_language
from captionbus.core import mediatools
from captionbus.services import media
from captionbus.services.runtime import BadInput, StageContext, StageDefinition

SUBTITLE_NAME = re.compile(r"^.*\.(?P<lang>[A-Za-z]{2,3})\.srt$")
# Which subtitle codec each container gets.
CONTAINERS = {"mp4": ("mp4", "mov_text"), "mkv": ("matroska", "srt")}


def subtitle_languages(request: StageRequest, params: MuxParams) -> list[str]:
    """One language per subtitle file: the `languages` param when given, else the code in each
    file's artifact name as subtitle_gen writes it (subtitles.<lang>.srt), so the transcribe
    graph need not know the detected language. Every code is validated either way."""
    refs = request.input_lists.get("subtitles", [])
    languages = params.languages
    if not languages:
        languages = []
        for ref in refs:
            named = SUBTITLE_NAME.match(ref.name)
            if not named:
                raise BadInput(f"cannot tell the language of subtitle file {ref.name!r}; pass the mux param languages")
            languages.append(named.group("lang"))
    if len(languages) != len(refs):
        raise BadInput(f"mux got {len(refs)} subtitle file(s) but {len(languages)} language(s): {list(languages)}")
    try:
        return [check_language(code) for code in languages]
    except UnknownLanguage as unknown:
        raise BadInput(str(unknown))


def mux_args(probed: media.ProbeResult, subtitles: list[Path], languages: list[str], container: str, out: Path,
             audio_codec: str = "copy") -> list[str]:
    muxer, subtitle_codec = CONTAINERS[container]
    args = [*media.guarded_input(probed)]
    for srt in subtitles:
        args += media.plain_input(srt, "srt")
    # 0:V = video that is not cover art; '?' keeps audio-only (or video-only) sources working.
    args += ["-map", "0:V?", "-map", "0:a?"]
    for i in range(len(subtitles)):
        args += ["-map", f"{i + 1}:s:0"]
    args += ["-c:v", "copy", "-c:a", audio_codec, "-c:s", subtitle_codec]
    if audio_codec != "copy":
        args += ["-b:a", "192k"]
    args += ["-map_metadata", "0", "-map_chapters", "0"]
    for i, code in enumerate(languages):
        iso639_2, name = LANGUAGES[code]
        args += [f"-metadata:s:s:{i}", f"language={iso639_2}", f"-metadata:s:s:{i}", f"title={name}"]
        args += [f"-disposition:s:{i}", "default" if i == 0 else "0"]
    if container == "mp4":
        args += ["-movflags", "+faststart"]
    args += ["-f", muxer, mediatools.file_url(out)]
    return args


def _cannot_hold(failed: media.FfmpegFailed) -> bool:
    return "codec not currently supported in container" in failed.stderr or "Could not find tag for codec" in failed.stderr


def _refused_codec(failed: media.FfmpegFailed) -> str | None:
    """The codec a muxer refused ("Could not find tag for codec pcm_s16le in stream #1 ...")."""
    found = re.search(r"(?:tag for codec|codec) (\w+) in stream", failed.stderr)
    return found.group(1) if found else None


def write_container(ctx: StageContext, probed: media.ProbeResult, subtitles: list[Path], languages: list[str],
                    container: str, report_progress) -> Path:
    out = ctx.work_dir / f"subtitled.{container}"

    def run(audio_codec: str) -> None:
        media.run_ffmpeg(
            mux_args(probed, subtitles, languages, container, out, audio_codec),
            duration=probed.duration,
            timeout_s=media.timeout_for(probed.duration, realtime_fraction=0.1),
            on_progress=report_progress,
        )

    try:
        run("copy")
    except media.FfmpegFailed as failed:
        audio_codecs = {s.get("codec_name") for s in probed.audio_streams}
        if not (container == "mp4" and _cannot_hold(failed) and _refused_codec(failed) in audio_codecs):
            raise
        # mp4 cannot hold some audio codecs (PCM, Vorbis, TrueHD...). Rather than fail a job
        # whose transcription is done, the mp4 alone gets AAC audio; the mkv keeps the original.
        ctx.warn(f"mp4 cannot hold {_refused_codec(failed)} audio: re-encoded to AAC in the mp4 only; the mkv has the original audio")
        run("aac")
    return out


def _require_srt(path: Path, name: str) -> None:
    """Decide "bad subtitle file" before ffmpeg, whose errors can't tell it from a full disk."""
    import pysubs2

    try:
        pysubs2.load(str(path), format_="srt")
    except Exception as e:  # pysubs2 raises several parse error types
        raise BadInput(f"subtitle file {name} is not valid SRT: {e}") from None


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    source = ctx.input_path("media")
    name = request.inputs["media"].name
    subtitles = ctx.input_paths("subtitles")
    languages = subtitle_languages(request, ctx.params)
    for ref, path in zip(request.input_lists.get("subtitles", []), subtitles):
        _require_srt(path, ref.name)
    probed = media.probe(source, display_name=name)
    if not probed.video_streams and not probed.audio_streams:
        raise BadInput(f"{name} has neither video nor audio to put subtitles on")
    if not probed.video_streams:
        ctx.warn(f"{name} has no video stream; the mp4 and mkv hold audio and subtitles only")

    outputs: dict[str, Path] = {}
    containers = list(CONTAINERS)
    for n, container in enumerate(containers):
        report = lambda f, n=n, c=container: ctx.progress((n + f) / len(containers), f"writing {c}")  # noqa: E731
        try:
            outputs[container] = write_container(ctx, probed, subtitles, languages, container, report)
        except media.FfmpegFailed as failed:
            if _cannot_hold(failed):
                raise BadInput(f"{name}: a stream cannot be copied into {container} ({failed.last_line}); the mkv takes any codec")
            raise
    ctx.metrics["subtitle_tracks"] = float(len(subtitles))
    return outputs


STAGE = StageDefinition(spec=MUX, handle=handle, report_packages=("pydantic",))
