"""source_separation's windowing, cross-fade and WAV checks (captionbus.services.source_separation.streaming),
in the plain interpreter: no torch, the per-window function is numpy. The model side runs in
tests/integration/test_stage_source_separation.py."""
from __future__ import annotations

import tracemalloc
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captionbus.services.runtime import BadInput
from captionbus.services.source_separation.streaming import (
    SAMPLE_RATE,
    fade_in,
    plan_windows,
    scan,
    stream_windows,
)
from captionbus.services.runtime.testing import make_fake_context


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE, channels: int = 1, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(width), w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return path


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)
    return np.clip(signal * 32768, -32768, 32767).astype("<i2")


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 5000), window=st.integers(1, 800), overlap_share=st.floats(0, 1 / 3))
def test_windows_cover_everything_with_at_most_two_windows_per_sample(total, window, overlap_share):
    overlap = min(int(window * overlap_share), window // 3)
    windows = plan_windows(total, window, overlap)
    assert windows[0][0] == 0 and windows[-1][1] == total
    coverage = np.zeros(total, int)
    for start, end in windows:
        assert 0 < end - start <= window
        coverage[start:end] += 1
    assert coverage.min() >= 1 and coverage.max() <= 2
    for (s0, e0), (s1, e1) in zip(windows, windows[1:]):
        assert s0 < s1 and e0 < e1 and overlap <= e0 - s1 <= overlap + len(windows)  # ~`overlap`
    lengths = {end - start for start, end in windows}
    assert len(lengths) == 1  # all equally long


def test_windows_for_a_two_hour_film():
    total = 2 * 3600 * SAMPLE_RATE
    windows = plan_windows(total, 60 * SAMPLE_RATE, 3 * SAMPLE_RATE)
    assert len(windows) == 127 and windows[-1][1] == total
    assert 59 * SAMPLE_RATE < windows[0][1] <= 60 * SAMPLE_RATE


def test_a_file_just_over_one_window_is_cut_in_two_halves():
    assert plan_windows(61, 60, 3) == [(0, 32), (29, 61)]


def test_plan_refuses_an_overlap_over_a_third_of_the_window():
    with pytest.raises(ValueError):
        plan_windows(1000, 100, 34)


def test_identity_windows_give_back_the_input_sample_for_sample(tmp_path):
    """Windows read, cross-faded and written back in order: nothing lost, doubled or shifted."""
    source = write_wav(tmp_path / "in.wav", speechlike(7.3))
    windows = plan_windows(int(7.3 * SAMPLE_RATE), 2 * SAMPLE_RATE, SAMPLE_RATE // 2)
    assert len(windows) == 5
    done = []
    stream_windows(source, tmp_path / "out.wav", windows, lambda i, x: x, on_window=done.append)
    assert np.array_equal(read_wav(tmp_path / "out.wav"), read_wav(source))
    assert done == list(range(len(windows)))


def test_overlaps_are_linear_crossfades(tmp_path):
    """Window i returns the constant (i+1)/10: between windows the output ramps linearly from
    one level to the next across exactly the overlap, and holds the level elsewhere."""
    total, window, overlap = 10_000, 4_000, 1_000
    source = write_wav(tmp_path / "in.wav", np.zeros(total, "<i2"))
    windows = plan_windows(total, window, overlap)
    stream_windows(source, tmp_path / "out.wav", windows, lambda i, x: np.full_like(x, (i + 1) / 10))
    out = read_wav(tmp_path / "out.wav") / 32768.0
    assert out.size == total
    for i, ((s0, e0), (s1, e1)) in enumerate(zip(windows, windows[1:])):
        low, high = (i + 1) / 10, (i + 2) / 10
        expected = low + (high - low) * fade_in(e0 - s1)
        assert np.allclose(out[s1:e0], expected, atol=1 / 32768)
        assert np.allclose(out[e0 : min(e1, windows[i + 2][0]) if i + 2 < len(windows) else e1], high, atol=1 / 32768)
    assert np.allclose(out[: windows[1][0]], 0.1, atol=1 / 32768)


def peak_memory_of_a_run(tmp_path: Path, minutes: int) -> int:
    """numpy's peak allocation (tracemalloc sees numpy's buffers) while checking and streaming
    `minutes` of audio through 60 s windows that overlap by 3 s."""
    source = tmp_path / f"long{minutes}.wav"
    block = speechlike(60)
    with wave.open(str(source), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SAMPLE_RATE)
        for _ in range(minutes):
            w.writeframes(block.tobytes())
    total = minutes * 60 * SAMPLE_RATE
    tracemalloc.start()
    try:
        stats = scan(source)
        windows = plan_windows(stats.frames, 60 * SAMPLE_RATE, 3 * SAMPLE_RATE)
        stream_windows(source, tmp_path / "out.wav", windows, lambda i, x: x * 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.frames == total and (tmp_path / "out.wav").stat().st_size == source.stat().st_size
    return peak


def test_memory_does_not_grow_with_length(tmp_path):
    """20 minutes peak no higher than 3 minutes, and a few windows' worth: far under the
    77 MB the 20 minutes take as float32."""
    short, long = peak_memory_of_a_run(tmp_path, 3), peak_memory_of_a_run(tmp_path, 20)
    window_bytes = 60 * SAMPLE_RATE * 4  # one float32 window
    print(f"peak {short / 1e6:.1f} MB for 3 min, {long / 1e6:.1f} MB for 20 min; one window {window_bytes / 1e6:.1f} MB")
    assert long <= short * 1.05 + 100_000
    assert long < 6 * window_bytes


def test_scan_measures_level_and_checks_length(tmp_path):
    samples = speechlike(3)
    stats = scan(write_wav(tmp_path / "a.wav", samples))
    assert stats.frames == samples.size and stats.duration_s == 3
    assert stats.mean == pytest.approx(samples.mean() / 32768, abs=1e-6)
    assert stats.std == pytest.approx(samples.std() / 32768, rel=1e-4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: written(p, b"This is a shopping list, not a soundtrack."), "not a readable PCM WAV"),
        (lambda p: write_wav(p, np.zeros(0, "<i2")), "no samples"),
        (lambda p: write_wav(p, speechlike(1).repeat(2), channels=2), "2 channel(s)"),
        (lambda p: write_wav(p, speechlike(1), rate=44100), "got 44100 Hz"),
        (lambda p: write_wav(p, np.zeros(100, np.uint8), width=1), "8-bit"),
        (lambda p: written(p, write_wav(p, speechlike(2)).read_bytes()[:20_001]), "cut short"),  # mid-sample
    ],
    ids=["text", "zero-length", "stereo", "44k", "8-bit", "truncated"],
)
def test_bad_audio_is_bad_input_with_a_reason(tmp_path, make, message):
    path = make(tmp_path / "audio.wav")
    with pytest.raises(BadInput) as raised:
        scan(path)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "params, message",
    [({"chunk_s": "soon"}, "chunk_s='soon': Input should be a valid number"),
     ({"chunk_s": 0.5}, "greater than or equal to 1"),
     ({"chunk_s": float("inf")}, "less than or equal to 600"), ({"chunk_s": 1e6}, "less than or equal to 600"),
     ({"chunk_s": 10, "overlap_s": 4}, "a third of chunk_s"), ({"overlap_s": -1}, "greater than or equal to 0")],
)
def test_bad_window_params_are_bad_input(tmp_path, params, message):
    """The bounds live in captionbus/contracts/declarations/source_separation.py (SourceSeparationParams); the runtime (here the
    fake context) refuses a request outside them as BadInput before the handler runs."""
    ctx = make_fake_context(tmp_path, "source_separation", params=params)
    with pytest.raises(BadInput) as raised:
        ctx.params
    assert message in str(raised.value) and "bad source_separation params" in str(raised.value)


def test_default_window_params():
    ctx = make_fake_context(Path("/tmp/unused"), "source_separation", params={"source_language": "en"})
    assert (ctx.params.chunk_s, ctx.params.window_overlap_s) == (60.0, 3.0)
    ctx = make_fake_context(Path("/tmp/unused"), "source_separation", params={"chunk_s": 6})
    assert (ctx.params.chunk_s, ctx.params.window_overlap_s) == (6.0, 2.0)
