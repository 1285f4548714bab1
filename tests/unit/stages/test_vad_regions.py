"""The VAD post-processing shared by both backends (captionbus/services/vad/regions.py): pure functions,
checked on hand-made probability sequences."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captionbus.contracts.declarations.vad import VadParams
from captionbus.services.runtime.definition import parse_params as parse
from captionbus.services.runtime.errors import BadInput
from captionbus.services.vad.regions import (
    FrameScores,
    binarize,
    bridge_short_gaps,
    drop_short,
    pad,
    speech_regions,
    split_long,
)

FRAME = 0.1  # seconds per frame in these hand-made sequences


def scores(*probs: float, t0: float = 0.0) -> FrameScores:
    return FrameScores(np.array(probs, dtype=np.float32), FRAME, t0)


def approx(regions):
    return [pytest.approx(r, abs=1e-6) for r in regions]


def test_binarize_uses_hysteresis():
    # starts at >= 0.5; a dip to 0.4 (above 0.35) does not end it; 0.2 does
    s = scores(0.1, 0.6, 0.4, 0.7, 0.2, 0.1, 0.9, 0.9)
    assert binarize(s, onset=0.5, offset=0.35) == approx([(0.1, 0.4), (0.6, 0.8)])
    # a frame between offset and onset alone never starts speech
    assert binarize(scores(0.1, 0.45, 0.1), 0.5, 0.35) == []
    assert binarize(scores(), 0.5, 0.35) == []
    assert binarize(scores(0.9, 0.9, t0=2.0), 0.5, 0.35) == approx([(2.0, 2.2)])


def test_short_pauses_are_bridged_and_short_blips_dropped():
    regions = [(0.0, 1.0), (1.2, 2.0), (3.0, 3.1), (5.0, 6.0)]
    assert bridge_short_gaps(regions, 0.3) == [(0.0, 2.0), (3.0, 3.1), (5.0, 6.0)]
    assert bridge_short_gaps(regions, 0.0) == regions  # nothing overlaps: nothing merges
    assert drop_short(bridge_short_gaps(regions, 0.3), 0.25) == [(0.0, 2.0), (5.0, 6.0)]


def test_padding_is_clipped_to_the_audio_and_merges_overlaps():
    assert pad([(0.05, 1.0), (1.3, 2.0), (4.0, 4.95)], 0.2, 5.0) == approx([(0.0, 2.2), (3.8, 5.0)])
    assert pad([(1.0, 2.0)], 0.0, 5.0) == [(1.0, 2.0)]


def test_long_regions_split_at_the_least_speech_like_frame():
    # 10 frames of 0.1 s = 1 s of speech; the dip at frame 7 (0.7..0.8 s) is the best cut
    probs = [0.9] * 10
    probs[7] = 0.55
    probs[2] = 0.5  # lower, but in the first half of the window: cutting there leaves a tiny piece
    s = FrameScores(np.array(probs, np.float32), FRAME)
    assert split_long([(0.0, 1.0)], 0.8, s) == approx([(0.0, 0.75), (0.75, 1.0)])
    # without scores: even pieces
    assert split_long([(0.0, 10.0)], 3.0) == approx([(0.0, 2.5), (2.5, 5.0), (5.0, 7.5), (7.5, 10.0)])
    assert split_long([(0.0, 3.0)], 3.0) == [(0.0, 3.0)]


def test_speech_regions_runs_the_whole_chain():
    # 0.1 s frames: blip at 0.5 s (dropped), speech 1.0-2.0 with a 0.2 s pause, speech 3.0-3.5
    probs = np.zeros(40, np.float32)
    probs[5] = 0.9
    probs[10:14] = 0.9
    probs[16:20] = 0.9
    probs[30:35] = 0.9
    params = VadParams(threshold=0.5, min_speech_s=0.25, min_silence_s=0.3, pad_s=0.1, max_region_s=30)
    assert speech_regions(FrameScores(probs, FRAME), 4.0, params) == approx([(0.9, 2.1), (2.9, 3.6)])
    # the audio ends mid-frame: the last region ends at the audio's end, not the frame's
    probs = np.array([0.0, 0.9, 0.9, 0.9], np.float32)
    assert speech_regions(FrameScores(probs, FRAME), 0.35, VadParams(pad_s=0.5, min_speech_s=0)) == [(0.0, 0.35)]


@settings(max_examples=200, deadline=None)
@given(
    probs=st.lists(st.floats(0, 1), max_size=400),
    pad_s=st.sampled_from([0.0, 0.05, 0.3]),
    max_region_s=st.sampled_from([1.0, 2.5, 30.0]),
    min_silence_s=st.sampled_from([0.0, 0.2, 1.0]),
)
def test_regions_are_sorted_disjoint_bounded_and_inside_the_audio(probs, pad_s, max_region_s, min_silence_s):
    duration = len(probs) * 0.032 - 0.01 if probs else 0.0
    params = VadParams(pad_s=pad_s, max_region_s=max_region_s, min_silence_s=min_silence_s)
    regions = speech_regions(FrameScores(np.array(probs, np.float32), 0.032), max(duration, 0.0), params)
    for start, end in regions:
        assert 0.0 <= start < end <= max(duration, 0.0) + 1e-9
        assert end - start <= max_region_s + 1e-3
    assert all(a[1] <= b[0] for a, b in zip(regions, regions[1:]))


def parse_params(params: dict) -> VadParams:
    return parse(VadParams, params, "vad")


def test_params_are_parsed_and_checked():
    assert parse_params({}) == VadParams()
    got = parse_params({"threshold": "0.6", "pad_s": 0, "max_region_s": 12, "source_language": "hi"})
    assert (got.threshold, got.pad_s, got.max_region_s) == (0.6, 0.0, 12.0)
    assert got.offset_threshold == pytest.approx(0.45)
    assert parse_params({"threshold": 0.1}).offset_threshold == pytest.approx(0.01)
    for bad, message in [
        ({"threshold": 0}, "threshold=0: Input should be greater than 0"),
        ({"threshold": 1}, "threshold=1: Input should be less than 1"),
        ({"threshold": True}, "a number is needed, not true/false"),
        ({"pad_s": -0.1}, "pad_s=-0.1: Input should be greater than or equal to 0"),
        ({"max_region_s": 0.5}, "max_region_s"),
        ({"min_speech_s": "nan"}, "min_speech_s"),
        ({"min_silence_s": [1]}, "Input should be a valid number"),
        ({"threshhold": 0.4}, "unknown param 'threshhold' (vad params: threshold, min_speech_s"),
    ]:
        with pytest.raises(BadInput) as refused:
            parse_params(bad)
        assert message in str(refused.value)


# ---------------------------------------------------------------- reading the WAV (captionbus/services/vad/audio.py)

def _wav_bytes(samples: np.ndarray, rate: int = 16000, channels: int = 1) -> bytes:
    import io
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def test_blocks_and_ranges_read_the_same_samples(tmp_path):
    from captionbus.services.vad import audio

    samples = np.sin(np.arange(16000 * 3) / 7).astype(np.float32) * 0.5
    path = tmp_path / "a.wav"
    path.write_bytes(_wav_bytes(samples))
    with audio.open_wav(path) as reader:
        blocks = list(audio.iter_blocks(reader, 5000))
        middle = audio.read_samples(reader, 20000, 100)
        tail = audio.read_samples(reader, 16000 * 3 - 10, 100)
    assert [len(b) for b in blocks] == [5000] * 9 + [3000]
    assert np.allclose(np.concatenate(blocks), samples, atol=1e-4)
    assert np.allclose(middle, samples[20000:20100], atol=1e-4) and len(tail) == 10
    # cut short: what is there is read, and the warning says so
    path.write_bytes(_wav_bytes(samples)[: 44 + 2 * 16000 + 1])
    with audio.open_wav(path) as reader:
        assert sum(len(b) for b in audio.iter_blocks(reader, 5000)) == 16000
        assert "header promises 3.0 s, the file holds 1.0 s" in audio.truncation_warning(reader.getnframes(), 16000)
    assert audio.truncation_warning(100, 100) is None


def test_other_formats_are_bad_input(tmp_path):
    from captionbus.services.vad import audio

    path = tmp_path / "stereo.wav"
    path.write_bytes(_wav_bytes(np.zeros(200, np.float32), rate=44100, channels=2))
    with pytest.raises(BadInput, match="got 44100 Hz, 2 channel"):
        with audio.open_wav(path):
            pass


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_damaged_header_is_bad_input_or_readable_never_a_crash(tmp_path_factory, data):
    """Random bytes changed in a WAV header and random cut points: the reader either reads what
    is there or says BadInput; nothing else escapes (Python's wave raises several types)."""
    from captionbus.services.vad import audio

    raw = bytearray(_wav_bytes(np.linspace(-0.5, 0.5, 3000, dtype=np.float32)))
    raw = raw[: data.draw(st.sampled_from([12, 30, 44, 60, 500, len(raw)]))]
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, min(60, len(raw)) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / "x.wav"
    path.write_bytes(bytes(raw))
    try:
        with audio.open_wav(path) as reader:
            read = sum(len(b) for b in audio.iter_blocks(reader, 1000))
            audio.read_samples(reader, reader.getnframes() // 2, 100)
        assert read <= 3000 + len(raw)
    except BadInput as bad:
        assert str(bad).startswith("audio ")
