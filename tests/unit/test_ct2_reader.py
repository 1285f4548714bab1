"""The CTranslate2 model.bin reader and the CTranslate2 -> MLX Whisper mapping
(tests/model_factory/whisper_mlx.py), on a tiny Whisper written here byte for byte the way
ctranslate2's `ModelSpec._serialize` writes one (so no ctranslate2 is needed): fused q/k/v,
a zero key bias, the projection aliased to the embedding, scalar settings, float16 weights.
Also the real Whisper base model.bin's header when it is installed, and the MLX backend's
pure region helpers (captionbus/services/asr/mlx_backend.py)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")

from tests.model_factory.whisper_mlx import (  # noqa: E402
    CT2_DTYPES,
    Ct2FormatError,
    convert,
    read_ct2_model,
    sinusoids,
    to_mlx_weights,
)

STATE, HEADS, MELS, VOCAB, AUDIO_CTX, TEXT_CTX = 8, 2, 4, 12, 6, 5


def _string(text: str) -> bytes:
    return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"


def write_ct2(path: Path, variables: dict, aliases: dict | None = None, version: int = 6) -> None:
    """model.bin as ctranslate2 writes it: version, spec name, revision, variables sorted by
    name (name, rank, dims, dtype id, byte count, bytes), aliases."""
    out = struct.pack("<I", version) + _string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    for name, value in sorted(variables.items()):
        value = np.asarray(value)
        out += _string(name) + struct.pack("<B", value.ndim) + b"".join(struct.pack("<I", d) for d in value.shape)
        out += struct.pack("<B", CT2_DTYPES.index(value.dtype.name)) + struct.pack("<I", value.nbytes) + value.tobytes()
    out += struct.pack("<I", len(aliases or {}))
    for alias, target in (aliases or {}).items():
        out += _string(alias) + _string(target)
    path.write_bytes(out)


def tiny_whisper(rng) -> dict:
    """A 1-encoder-layer, 2-decoder-layer Whisper in CTranslate2 naming, float16."""

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float16)

    def fused(parts: int):  # q,k,v or k,v; the key bias is zero, as ctranslate2 pads it
        bias = r(parts * STATE)
        key = parts - 2
        bias[key * STATE : (key + 1) * STATE] = 0
        return r(parts * STATE, STATE), bias

    v = {
        "encoder/num_heads": np.int16(HEADS), "decoder/num_heads": np.int16(HEADS),
        "decoder/scale_embeddings": np.int8(0), "decoder/pre_norm": np.int8(1),
        "decoder/start_from_zero_embedding": np.int8(0), "decoder/activation": np.int8(1),
        "encoder/conv1/weight": r(STATE, MELS, 3), "encoder/conv1/bias": r(STATE),
        "encoder/conv2/weight": r(STATE, STATE, 3), "encoder/conv2/bias": r(STATE),
        "encoder/position_encodings/encodings": sinusoids(AUDIO_CTX, STATE).astype(np.float16),
        "encoder/layer_norm/gamma": r(STATE), "encoder/layer_norm/beta": r(STATE),
        "decoder/embeddings/weight": r(VOCAB, STATE),
        "decoder/position_encodings/encodings": r(TEXT_CTX, STATE),
        "decoder/layer_norm/gamma": r(STATE), "decoder/layer_norm/beta": r(STATE),
    }

    def layer(prefix: str, cross: bool):
        v[f"{prefix}/self_attention/linear_0/weight"], v[f"{prefix}/self_attention/linear_0/bias"] = fused(3)
        for sub in ("self_attention/linear_1",) + (("attention/linear_0", "attention/linear_2") if cross else ()):
            v[f"{prefix}/{sub}/weight"], v[f"{prefix}/{sub}/bias"] = r(STATE, STATE), r(STATE)
        if cross:
            v[f"{prefix}/attention/linear_1/weight"], v[f"{prefix}/attention/linear_1/bias"] = fused(2)
        v[f"{prefix}/ffn/linear_0/weight"], v[f"{prefix}/ffn/linear_0/bias"] = r(4 * STATE, STATE), r(4 * STATE)
        v[f"{prefix}/ffn/linear_1/weight"], v[f"{prefix}/ffn/linear_1/bias"] = r(STATE, 4 * STATE), r(STATE)
        for norm in ("self_attention", "ffn") + (("attention",) if cross else ()):
            v[f"{prefix}/{norm}/layer_norm/gamma"], v[f"{prefix}/{norm}/layer_norm/beta"] = r(STATE), r(STATE)

    layer("encoder/layer_0", cross=False)
    layer("decoder/layer_0", cross=True)
    layer("decoder/layer_1", cross=True)
    return v


ALIASES = {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_reader_returns_every_variable_and_alias_exactly(tmp_path: Path):
    variables = tiny_whisper(np.random.default_rng(0))
    variables["extra/int32_scalar"] = np.int32(-7)
    variables["extra/float32"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_ct2(tmp_path / "model.bin", variables, ALIASES)
    model = read_ct2_model(tmp_path / "model.bin")
    assert (model.binary_version, model.spec_name, model.spec_revision) == (6, "WhisperSpec", 3)
    assert set(model.variables) == set(variables)
    for name, value in variables.items():
        got = model.variables[name]
        assert got.dtype == np.asarray(value).dtype and got.shape == np.shape(value), name
        assert np.array_equal(got, value), name
    assert model.aliases == ALIASES
    assert model.get("decoder/projection/weight") is model.variables["decoder/embeddings/weight"]


def test_mapping_splits_fused_projections_and_transposes_convolutions(tmp_path: Path):
    ct2 = tiny_whisper(np.random.default_rng(1))
    write_ct2(tmp_path / "model.bin", ct2, ALIASES)
    dims, weights = to_mlx_weights(read_ct2_model(tmp_path / "model.bin"))
    assert dims == {"n_mels": MELS, "n_audio_ctx": AUDIO_CTX, "n_audio_state": STATE, "n_audio_head": HEADS,
                    "n_audio_layer": 1, "n_vocab": VOCAB, "n_text_ctx": TEXT_CTX, "n_text_state": STATE,
                    "n_text_head": HEADS, "n_text_layer": 2}
    fused = ct2["decoder/layer_1/self_attention/linear_0/weight"]
    assert np.array_equal(weights["decoder.blocks.1.attn.query.weight"], fused[:STATE])
    assert np.array_equal(weights["decoder.blocks.1.attn.key.weight"], fused[STATE : 2 * STATE])
    assert np.array_equal(weights["decoder.blocks.1.attn.value.weight"], fused[2 * STATE :])
    assert np.array_equal(weights["decoder.blocks.1.attn.value.bias"], ct2["decoder/layer_1/self_attention/linear_0/bias"][2 * STATE :])
    assert "decoder.blocks.1.attn.key.bias" not in weights  # Whisper's key has no bias
    kv = ct2["decoder/layer_0/attention/linear_1/weight"]
    assert np.array_equal(weights["decoder.blocks.0.cross_attn.key.weight"], kv[:STATE])
    assert np.array_equal(weights["decoder.blocks.0.cross_attn.value.weight"], kv[STATE:])
    assert np.array_equal(weights["decoder.blocks.0.cross_attn.out.weight"], ct2["decoder/layer_0/attention/linear_2/weight"])
    assert np.array_equal(weights["encoder.ln_post.weight"], ct2["encoder/layer_norm/gamma"])
    assert np.array_equal(weights["decoder.ln.bias"], ct2["decoder/layer_norm/beta"])
    assert weights["encoder.conv1.weight"].shape == (STATE, 3, MELS)  # MLX Conv1d: [out, kernel, in]
    assert np.array_equal(weights["encoder.conv1.weight"][:, 2, :], ct2["encoder/conv1/weight"][:, :, 2])
    # Every MLX Whisper parameter of a 1+2 layer model, nothing else.
    per_block = {"attn.query.weight", "attn.query.bias", "attn.key.weight", "attn.value.weight", "attn.value.bias",
                 "attn.out.weight", "attn.out.bias", "attn_ln.weight", "attn_ln.bias", "mlp1.weight", "mlp1.bias",
                 "mlp2.weight", "mlp2.bias", "mlp_ln.weight", "mlp_ln.bias"}
    cross = {n.replace("attn", "cross_attn", 1) for n in per_block if n.startswith("attn")}
    expected = {f"encoder.blocks.0.{n}" for n in per_block}
    expected |= {f"decoder.blocks.{i}.{n}" for i in (0, 1) for n in per_block | cross}
    expected |= {"encoder.conv1.weight", "encoder.conv1.bias", "encoder.conv2.weight", "encoder.conv2.bias",
                 "encoder.ln_post.weight", "encoder.ln_post.bias", "decoder.token_embedding.weight",
                 "decoder.positional_embedding", "decoder.ln.weight", "decoder.ln.bias"}
    assert set(weights) == expected


def test_convert_writes_mlx_folder_with_alignment_heads(tmp_path: Path):
    ct2_dir = tmp_path / "ct2"
    ct2_dir.mkdir()
    write_ct2(ct2_dir / "model.bin", tiny_whisper(np.random.default_rng(2)), ALIASES)
    (ct2_dir / "config.json").write_text(json.dumps({"alignment_heads": [[1, 0], [1, 1]], "lang_ids": []}))
    report = convert(ct2_dir, tmp_path / "mlx")
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config == {"model_type": "whisper", **report["dims"]}
    with np.load(tmp_path / "mlx" / "weights.npz") as saved:
        assert saved["alignment_heads"].tolist() == [[1, 0], [1, 1]]
        assert saved["decoder.token_embedding.weight"].dtype == np.float16
        assert len(saved.files) == report["tensors"]


def test_quantized_int8_weights_are_dequantized(tmp_path: Path):
    ct2 = tiny_whisper(np.random.default_rng(3))
    weight = ct2["encoder/layer_0/ffn/linear_0/weight"].astype(np.float32)
    scale = (127.0 / np.abs(weight).max(axis=1)).astype(np.float32)
    ct2["encoder/layer_0/ffn/linear_0/weight"] = np.round(weight * scale[:, None]).astype(np.int8)
    ct2["encoder/layer_0/ffn/linear_0/weight_scale"] = scale
    write_ct2(tmp_path / "model.bin", ct2, ALIASES)
    _, weights = to_mlx_weights(read_ct2_model(tmp_path / "model.bin"))
    assert np.allclose(weights["encoder.blocks.0.mlp1.weight"], weight, atol=np.abs(weight).max() / 127)


@pytest.mark.parametrize("damage", ["version", "truncated", "untied_projection", "key_bias", "learned_encoder_positions"])
def test_models_it_cannot_convert_fail_with_a_reason(tmp_path: Path, damage: str):
    ct2, aliases, version = tiny_whisper(np.random.default_rng(4)), dict(ALIASES), 6
    if damage == "version":
        version = 5
    elif damage == "untied_projection":
        aliases = {}
        ct2["decoder/projection/weight"] = ct2["decoder/embeddings/weight"] + np.float16(1)
    elif damage == "key_bias":
        ct2["decoder/layer_0/self_attention/linear_0/bias"][STATE] = 1
    elif damage == "learned_encoder_positions":
        ct2["encoder/position_encodings/encodings"] = ct2["encoder/position_encodings/encodings"] + np.float16(0.5)
    write_ct2(tmp_path / "model.bin", ct2, aliases, version=version)
    if damage == "truncated":
        data = (tmp_path / "model.bin").read_bytes()
        (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    expected = {"version": "binary version 5", "truncated": "cut short|ends early", "untied_projection": "ties",
                "key_bias": "key bias", "learned_encoder_positions": "sinusoids"}[damage]
    with pytest.raises(Ct2FormatError, match=expected):
        to_mlx_weights(read_ct2_model(tmp_path / "model.bin"))


def test_real_whisper_base_reads_and_maps(whisper_model):
    # whisper_model installs it when missing: a fresh machine reads the real model too, no skip.
    model = read_ct2_model(whisper_model / "model.bin")
    dims, weights = to_mlx_weights(model)
    assert dims == {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 512, "n_audio_head": 8, "n_audio_layer": 6,
                    "n_vocab": 51865, "n_text_ctx": 448, "n_text_state": 512, "n_text_head": 8, "n_text_layer": 6}
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert len(weights) == 244  # Whisper base's parameter count in MLX naming (alignment heads aside)


# ---------------------------------------------------------------- mlx backend helpers


def test_backend_region_helpers():
    from captionbus.services.asr import mlx_backend as b

    assert b._clean_regions([(5, 6), (-1, 1), (0.5, 2), (9, 12), (3, 3)], duration=10) == [(0.0, 2.0), (5.0, 6.0), (9.0, 10.0)]
    assert b._group([(0, 5), (10, 29), (29.5, 40), (41, 42), (75, 120)]) == [
        [(0, 5), (10, 29)], [(29.5, 40), (41, 42)], [(75, 120)]]
    audio = np.ones(b.SAMPLE_RATE * 4, dtype=np.float32)
    kept = b._silenced_outside(audio, [(0.5, 1.0), (2.0, 3.0)])
    assert kept.sum() == b.SAMPLE_RATE * 1.5 and kept[int(0.75 * b.SAMPLE_RATE)] == 1 and kept[int(1.5 * b.SAMPLE_RATE)] == 0
    sample = b._speech_sample(np.arange(b.SAMPLE_RATE * 40, dtype=np.float32), [(1, 21), (30, 40)], seconds=25)
    assert len(sample) == 25 * b.SAMPLE_RATE and sample[0] == b.SAMPLE_RATE and sample[-1] == 35 * b.SAMPLE_RATE - 1
    segments = b._segments(
        [{"text": " Hello there.", "start": 0.0, "end": 1.5,
          "words": [{"word": " Hello", "start": 0.1, "end": 0.5, "probability": 0.9},
                    {"word": " there.", "start": 0.5, "end": 1.9, "probability": 0.8}]},
         {"text": " ", "start": 1.5, "end": 2.0, "words": []}],
        offset=10.0, limit=11.6)
    assert len(segments) == 1 and segments[0].text == "Hello there."
    assert [(w.text, w.start, w.end) for w in segments[0].words] == [("Hello", 10.1, 10.5), ("there.", 10.5, 11.6)]
    assert (segments[0].start, segments[0].end) == (10.1, 11.6)


def test_backend_decodes_each_region_group_from_its_own_clip_with_absolute_times(monkeypatch):
    """transcribe() with regions further apart than GROUP_MAX_S: each group is cut out and decoded
    on its own (the gaps inside it silenced, nothing outside it), its times shifted back to the
    audio's, progress rising to 1 over the groups. mlx-whisper's decode is replaced by one that
    'hears' where the clip is loud: this is the arithmetic around it. The real decode (one group,
    Whisper base) is tests/integration/test_asr_mlx.py's."""
    import threading
    from types import SimpleNamespace

    from captionbus.services.asr import mlx_backend as b

    rate = b.SAMPLE_RATE
    audio = np.zeros(rate * 40, dtype=np.float32)
    for start, end in ((1.0, 2.0), (3.0, 4.0), (5.0, 6.0), (20.0, 23.0)):  # "speech"; 3-4 s is outside every region
        audio[int(start * rate):int(end * rate)] = 0.5
    clips = []

    def decode(model, clip, language, report, task="transcribe"):
        clips.append((len(clip) / rate, np.count_nonzero(clip > 0.1) / rate))
        loud = np.flatnonzero(clip > 0.1)
        report(0.5)
        first, last = loud[0] / rate, (loud[-1] + 1) / rate
        return {"segments": [{"text": " heard", "start": first, "end": last,
                              "words": [{"word": " heard", "start": first, "end": last, "probability": 0.9}]}]}

    monkeypatch.setattr(b, "_decode", decode)
    monkeypatch.setattr(b, "GROUP_MAX_S", 6.0)
    monkeypatch.setattr(b, "supported_languages", lambda model: ["en"])
    model = SimpleNamespace(name="stub", lock=threading.Lock())
    progress = []
    language, probability, segments = b.transcribe(model, audio, "en", [(0.5, 2.5), (4.5, 6.5), (19.5, 23.5)],
                                                   lambda f, m: progress.append((f, m)))
    assert (language, probability) == ("en", None)
    # 0.5-6.5 (two regions; the 3-4 s sound between them silenced), then 19.5-23.5: seconds, loud seconds
    assert clips == [(6.0, 2.0), (4.0, 3.0)]
    assert [(w.start, w.end) for s in segments for w in s.words] == [(1.0, 6.0), (20.0, 23.0)]
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {m for _, m in progress} == {"transcribing speech 1/2", "transcribing speech 2/2"}
