"""demux: any media file -> 16 kHz mono PCM WAV for ASR (plus the probed facts as JSON).

Params: declaration.DemuxParams (`captionbus stages demux`).
Outputs: `audio` (audio.wav), `probe` (probe.json: duration, fps, codecs, has_video).
"""
from __future__ import annotations

import json
from pathlib import Path

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.demux import DEMUX, DemuxParams
from captionbus.core import mediatools
from captionbus.services import media
from captionbus.services.runtime import BadInput, StageContext, StageDefinition

# A decode that yields much less audio than the container promises means the file is cut
# short (interrupted download) or damaged; tolerate small container/stream length mismatches.
MIN_DECODED_FRACTION = 0.9


def choose_audio_stream(probed: media.ProbeResult, audio_track: int | None, name: str) -> dict:
    streams = probed.audio_streams
    if not streams:
        kind = "video" if probed.video_streams else "file"
        raise BadInput(f"{name} has no audio stream (a {kind} without sound); nothing to transcribe")
    if audio_track is not None:
        if not 0 <= audio_track < len(streams):
            raise BadInput(f"{name} has {len(streams)} audio stream(s); audio_track={audio_track} does not exist")
        return streams[audio_track]
    for stream in streams:
        if stream.get("disposition", {}).get("default"):
            return stream
    return streams[0]


def expected_audio_seconds(probed: media.ProbeResult, stream: dict) -> float | None:
    return media.to_float(stream.get("duration")) or probed.duration


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    source = ctx.input_path("media")
    name = request.inputs["media"].name
    probed = media.probe(source, display_name=name)
    params: DemuxParams = ctx.params
    stream = choose_audio_stream(probed, params.audio_track, name)
    expected = expected_audio_seconds(probed, stream)
    ctx.log.info("probed", format=probed.format_name, duration=probed.duration, audio_stream=stream.get("index"))

    audio_path = ctx.work_dir / "audio.wav"
    args = [
        *media.guarded_input(probed),
        "-map", f"0:{stream['index']}", "-vn", "-sn", "-dn",
        *mediatools.WAV_16K_MONO,
        # RF64 only when the WAV would pass 4 GiB (about 37 hours at 16 kHz mono).
        "-rf64", "auto", "-f", "wav", mediatools.file_url(audio_path),
    ]
    try:
        media.run_ffmpeg(
            args,
            duration=expected,
            timeout_s=media.timeout_for(expected),
            on_progress=lambda f: ctx.progress(f, "decoding audio"),
        )
    except media.FfmpegFailed as failed:
        raise BadInput(f"{name} is truncated or corrupt: ffmpeg could not decode its audio ({failed.last_line})")

    decoded = media.wav_duration(audio_path)
    if expected and expected > 1.0 and decoded < expected * MIN_DECODED_FRACTION:
        raise BadInput(
            f"{name} is truncated or corrupt: only {decoded:.1f} s of its {expected:.1f} s of audio could be decoded"
        )
    if decoded <= 0:
        raise BadInput(f"{name} has an audio stream but no audio could be decoded from it")

    ctx.metrics["media_duration_s"] = float(probed.duration or decoded)
    ctx.metrics["audio_duration_s"] = decoded
    probe_path = ctx.work_dir / "probe.json"
    probe_path.write_text(json.dumps({**probed.summary(), "audio_duration": decoded}, indent=2))
    return {"audio": audio_path, "probe": probe_path}


STAGE = StageDefinition(
    spec=DEMUX,
    handle=handle,
    report_packages=("pydantic",),
    cache_ignores=("source_language",),  # the job's spoken language changes nothing here
)
