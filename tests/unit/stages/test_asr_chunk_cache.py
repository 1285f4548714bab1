"""The asr stage's cache key for one chunk is what that chunk hears: a film with one changed
scene redoes only that scene's chunk. Real WAVs; no model is loaded (cache_inputs reads none)."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from captionbus.contracts.speech import SpeechChunk, SpeechChunks, SpeechRegion
from captionbus.services.asr.stage import cache_inputs
from captionbus.services.audio import read_wav
from captionbus.services.runtime.testing import make_fake_context

RATE = 16000


def write_wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def test_a_chunk_key_changes_only_with_its_own_samples(tmp_path):
    rng = np.random.default_rng(0)
    film = rng.uniform(-0.5, 0.5, 30 * RATE).astype(np.float32)
    changed = film.copy()
    changed[20 * RATE:21 * RATE] = 0.0  # a scene inside the second chunk
    chunks = SpeechChunks(duration=30.0, chunks=[
        SpeechChunk(start=0.0, end=12.0, regions=[SpeechRegion(start=1, end=11)]),
        SpeechChunk(start=12.0, end=30.0, regions=[SpeechRegion(start=13, end=29)]),
    ])
    (tmp_path / "chunks.json").write_text(chunks.model_dump_json())

    def key(audio: Path, item: int):
        ctx = make_fake_context(tmp_path / f"w-{audio.stem}-{item}", "asr",
                                inputs={"audio": audio, "chunks": tmp_path / "chunks.json"}, params={"item": item})
        return cache_inputs(ctx.request, ctx)

    a, b = write_wav(tmp_path / "a.wav", film), write_wav(tmp_path / "b.wav", changed)
    assert key(a, 0) == key(b, 0)
    assert key(a, 1) != key(b, 1)
    assert key(a, 0) != key(a, 1)
    whole = make_fake_context(tmp_path / "whole", "asr", inputs={"audio": a})
    assert cache_inputs(whole.request, whole) is None  # not a chunk: every input's hash
    # The window a chunk decodes is exactly what it is keyed on.
    assert np.array_equal(read_wav(a, start_s=12.0, end_s=30.0), read_wav(a)[12 * RATE:])
