"""demux on real media: espeak speech video in, 16 kHz mono WAV out; bad inputs fail fast
with one line a person can act on."""
from __future__ import annotations

import json
import time
import wave
from pathlib import Path

import pytest

from captionbus.services.demux.stage import STAGE
from captionbus.services.runtime import BadInput
from tests import media as test_media

pytestmark = pytest.mark.skipif(not test_media.tools_available(), reason=test_media.MISSING)


def test_demux_gives_16k_mono_wav_and_probe(speech_clip, make_context):
    video, _ = speech_clip
    ctx = make_context("demux", inputs={"media": video})
    outputs = STAGE.handle(ctx.request, ctx)

    assert set(outputs) == {"audio", "probe"}
    with wave.open(str(outputs["audio"])) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        seconds = wav.getnframes() / wav.getframerate()
    probe = json.loads(outputs["probe"].read_text())
    assert probe["has_video"] and probe["fps"] == pytest.approx(25.0)
    assert seconds == pytest.approx(probe["duration"], abs=0.2)
    assert ctx.metrics["audio_duration_s"] == pytest.approx(seconds)
    assert ctx.progress_events and ctx.progress_events[-1][0] == 1.0


def test_demux_reads_names_that_look_like_options_or_urls(speech_clip, make_context, tmp_path):
    video, _ = speech_clip
    odd = tmp_path / "-i http:evil.mp4"
    odd.write_bytes(video.read_bytes())
    ctx = make_context("demux", inputs={"media": odd})
    assert STAGE.handle(ctx.request, ctx)["audio"].stat().st_size > 1000


def _bad_inputs(tmp_path: Path, speech: Path) -> dict[str, tuple[Path, str]]:
    secret = tmp_path / "secret.wav"
    test_media.speech_wav(secret, "this should never be read")
    return {
        "empty": (test_media.empty_file(tmp_path / "empty.mp4"), "is empty"),
        "text": (test_media.text_named_mp4(tmp_path / "notes.mp4"), "not a media file ffmpeg can read"),
        "no_audio": (test_media.video_without_audio(tmp_path / "silent.mp4"), "has no audio stream"),
        "hls": (test_media.hls_playlist(tmp_path / "list.m3u8", secret), "playlist"),
        "hls_named_mp4": (test_media.hls_playlist(tmp_path / "list.mp4", secret), "playlist"),
        "truncated": (test_media.truncated_copy(speech, tmp_path / "cut.mp4"), "truncated or corrupt"),
        "concat": (_concat_list(tmp_path / "list.mp4", secret), "playlist"),
    }


def _concat_list(path: Path, target: Path) -> Path:
    path.write_text(f"ffconcat version 1.0\nfile '{target}'\n")
    return path


@pytest.mark.parametrize("kind", ["empty", "text", "no_audio", "hls", "hls_named_mp4", "truncated", "concat"])
def test_bad_input_fails_fast_with_one_clear_line(kind, speech_clip, make_context, tmp_path):
    path, expected = _bad_inputs(tmp_path, speech_clip[0])[kind]
    ctx = make_context("demux", inputs={"media": path})
    started = time.monotonic()
    with pytest.raises(BadInput) as caught:
        STAGE.handle(ctx.request, ctx)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message and path.name in message
    assert time.monotonic() - started < 10
    assert not (ctx.work_dir / "audio.wav").exists() or kind == "truncated"


def test_truncated_file_with_index_first_is_caught_by_decoded_length(speech_clip, make_context, tmp_path):
    """A faststart mp4 keeps its index at the front, so a cut-off copy still probes fine; the
    short decode gives it away."""
    import subprocess

    video, _ = speech_clip
    faststart = tmp_path / "faststart.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(video), "-c", "copy", "-movflags", "+faststart", str(faststart)],
        check=True, timeout=60,
    )
    cut = test_media.truncated_copy(faststart, tmp_path / "cut-faststart.mp4", keep_fraction=0.5)
    ctx = make_context("demux", inputs={"media": cut})
    with pytest.raises(BadInput, match="truncated or corrupt"):
        STAGE.handle(ctx.request, ctx)


def test_audio_track_out_of_range_is_bad_input(speech_clip, make_context):
    ctx = make_context("demux", inputs={"media": speech_clip[0]}, params={"audio_track": 3})
    with pytest.raises(BadInput, match="audio_track=3"):
        STAGE.handle(ctx.request, ctx)


def test_audio_only_input_is_fine_and_says_it_has_no_video(make_context, tmp_path):
    audio, _ = test_media.speech_audio_only(tmp_path / "podcast.m4a")
    ctx = make_context("demux", inputs={"media": audio})
    outputs = STAGE.handle(ctx.request, ctx)
    probe = json.loads(outputs["probe"].read_text())
    assert probe["has_video"] is False and probe["fps"] is None and probe["audio_codecs"] == ["aac"]
    assert ctx.metrics["audio_duration_s"] > 5
