"""mux: subtitles go in as soft tracks with language tags; video and audio are copied; cue
times survive the mux (AAC priming once shifted cues by ~23 ms, see shared/FACTS.md)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pysubs2
import pytest

from captionbus.services.mux.stage import STAGE
from captionbus.services.runtime import BadInput
from tests import media as test_media

pytestmark = pytest.mark.skipif(not test_media.tools_available(), reason=test_media.MISSING)

CUES = [(600, 2400, "The quick brown fox"), (2500, 5200, "jumps over the lazy dog"), (5300, 8000, "from the quiet harbour")]


def _srt(path: Path, cues=CUES) -> Path:
    subs = pysubs2.SSAFile()
    for start, end, text in cues:
        subs.append(pysubs2.SSAEvent(start=start, end=end, text=text))
    subs.save(str(path), format_="srt")
    return path


def _cues_after_mux(path: Path, subtitle_index: int) -> list[tuple[int, int, str]]:
    """The track read back as a player would: extracted by ffmpeg, which times it from the
    file's presentation start (so any shift of the whole file shows up here)."""
    srt = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", f"0:s:{subtitle_index}", "-f", "srt", "-"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    return [(e.start, e.end, e.plaintext) for e in pysubs2.SSAFile.from_string(srt, format_="srt")]


def _video_start(streams: list[dict]) -> float:
    return float(next(s for s in streams if s["codec_type"] == "video").get("start_time") or 0)


def test_mux_adds_tagged_tracks_copies_av_and_keeps_cue_times(speech_clip, make_context, tmp_path):
    video, _ = speech_clip
    english, hindi = _srt(tmp_path / "en.srt"), _srt(tmp_path / "hi.srt", [(1000, 2000, "नमस्ते दुनिया")])
    ctx = make_context("mux", inputs={"media": video}, input_lists={"subtitles": [english, hindi]}, params={"languages": ["en", "hi"]})
    outputs = STAGE.handle(ctx.request, ctx)
    assert set(outputs) == {"mp4", "mkv"}

    source = test_media.ffprobe_json(video)
    for container, codec in (("mp4", "mov_text"), ("mkv", "subrip")):
        streams = test_media.ffprobe_json(outputs[container])["streams"]
        subtitles = [s for s in streams if s["codec_type"] == "subtitle"]
        assert [s["codec_name"] for s in subtitles] == [codec, codec]
        assert [s["tags"]["language"] for s in subtitles] == ["eng", "hin"]
        assert subtitles[0]["disposition"]["default"] == 1
        for kind in ("video", "audio"):
            before = [s["codec_name"] for s in source["streams"] if s["codec_type"] == kind]
            after = [s["codec_name"] for s in streams if s["codec_type"] == kind]
            assert before == after, (container, kind)
        for stream in ("v:0", "a:0"):
            assert test_media.packet_hash(outputs[container], stream) == test_media.packet_hash(video, stream), (container, stream)
        muxed_cues = _cues_after_mux(outputs[container], 0)
        assert [text for *_, text in muxed_cues] == [text for *_, text in CUES], (container, muxed_cues)
        # Copying AAC into mkv shifts every stream by the encoder priming (~23 ms) so no
        # timestamp is negative; what must hold is that cues stay on the same video frames.
        video_shift_ms = round((_video_start(streams) - _video_start(source["streams"])) * 1000)
        for (start, end, _), (cue_start, cue_end, _) in zip(muxed_cues, CUES):
            assert abs(start - cue_start) <= 50 and abs(end - cue_end) <= 50, (container, muxed_cues)
            assert abs(start - video_shift_ms - cue_start) <= 2, (container, video_shift_ms, muxed_cues)
    assert ctx.progress_events[-1][0] == 1.0


def test_audio_only_source_still_gives_both_files(make_context, tmp_path):
    audio, _ = test_media.speech_audio_only(tmp_path / "talk.m4a")
    ctx = make_context("mux", inputs={"media": audio}, input_lists={"subtitles": [_srt(tmp_path / "en.srt")]}, params={"languages": ["en"]})
    outputs = STAGE.handle(ctx.request, ctx)
    for container in ("mp4", "mkv"):
        kinds = [s["codec_type"] for s in test_media.ffprobe_json(outputs[container])["streams"]]
        assert kinds == ["audio", "subtitle"], (container, kinds)
    assert ctx.warnings and "no video stream" in ctx.warnings[0]


def test_empty_subtitle_file_still_muxes(speech_clip, make_context, tmp_path):
    empty = tmp_path / "empty.srt"
    empty.write_text("")
    ctx = make_context("mux", inputs={"media": speech_clip[0]}, input_lists={"subtitles": [empty]}, params={"languages": ["en"]})
    outputs = STAGE.handle(ctx.request, ctx)
    assert outputs["mkv"].stat().st_size > 0


@pytest.mark.parametrize(
    "languages, expected",
    [(["xx"], "unknown language code 'xx'"), (["en", "hi"], "1 subtitle file(s) but 2 language(s)")],
)
def test_language_problems_are_bad_input(languages, expected, speech_clip, make_context, tmp_path):
    ctx = make_context("mux", inputs={"media": speech_clip[0]}, input_lists={"subtitles": [_srt(tmp_path / "en.srt")]}, params={"languages": languages})
    with pytest.raises(BadInput) as caught:
        STAGE.handle(ctx.request, ctx)
    assert expected in str(caught.value)


def test_playlist_as_media_is_refused(make_context, tmp_path, speech_clip):
    playlist = test_media.hls_playlist(tmp_path / "list.m3u8", speech_clip[0])
    ctx = make_context("mux", inputs={"media": playlist}, input_lists={"subtitles": [_srt(tmp_path / "en.srt")]}, params={"languages": ["en"]})
    with pytest.raises(BadInput, match="playlist"):
        STAGE.handle(ctx.request, ctx)


def test_languages_come_from_subtitle_gen_file_names_when_not_given(speech_clip, make_context, tmp_path):
    tamil, hindi = _srt(tmp_path / "subtitles.ta.srt"), _srt(tmp_path / "subtitles.hi.srt")
    ctx = make_context("mux", inputs={"media": speech_clip[0]}, input_lists={"subtitles": [tamil, hindi]}, params={"source_language": None})
    outputs = STAGE.handle(ctx.request, ctx)
    streams = test_media.ffprobe_json(outputs["mkv"])["streams"]
    assert [s["tags"]["language"] for s in streams if s["codec_type"] == "subtitle"] == ["tam", "hin"]

    unnamed = make_context("mux", inputs={"media": speech_clip[0]}, input_lists={"subtitles": [_srt(tmp_path / "track.srt")]})
    with pytest.raises(BadInput, match="cannot tell the language of subtitle file 'track.srt'"):
        STAGE.handle(unnamed.request, unnamed)


def test_audio_mp4_cannot_hold_is_aac_in_the_mp4_only(make_context, tmp_path):
    speech, _ = test_media.speech_wav(tmp_path / "speech.wav")
    source = tmp_path / "pcm.mkv"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-i", str(speech),
         "-shortest", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "pcm_s16le", str(source)],
        check=True, timeout=60,
    )
    ctx = make_context("mux", inputs={"media": source}, input_lists={"subtitles": [_srt(tmp_path / "subtitles.en.srt")]})
    outputs = STAGE.handle(ctx.request, ctx)
    codecs = {c: [s["codec_name"] for s in test_media.ffprobe_json(outputs[c])["streams"]] for c in ("mp4", "mkv")}
    assert codecs == {"mp4": ["h264", "aac", "mov_text"], "mkv": ["h264", "pcm_s16le", "subrip"]}
    assert test_media.packet_hash(outputs["mp4"], "v:0") == test_media.packet_hash(source, "v:0")
    assert any("pcm_s16le" in w and "mkv has the original" in w for w in ctx.warnings)
