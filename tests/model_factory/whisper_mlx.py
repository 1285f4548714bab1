"""Whisper in the MLX layout mlx-whisper loads, converted offline from the CTranslate2 Whisper
model we do have (`captionbus models fetch-test`: Whisper base, CTranslate2, float16).

No MLX Whisper weights can be had offline and mlx-whisper only converts OpenAI `.pt` checkpoints,
so this reads CTranslate2's `model.bin` itself (the format `ctranslate2.specs.ModelSpec._serialize`
writes, binary version 6) and renames each variable to the OpenAI/MLX Whisper parameter it came
from. The output folder holds what `mlx_whisper.load_models.load_model` reads:

  config.json          ModelDimensions only (load_model passes every key to it)
  weights.npz          float16 weights; plus `alignment_heads` ([layer, head] rows, the heads
                       whose cross-attention times words), which mlx-whisper's `Whisper` keeps as
                       a module array and `load_model` restores from the weights file, as in
                       the mlx-community conversions
  tokenizer files      none needed: mlx-whisper ships its tiktoken vocabularies

CTranslate2 conventions undone here (verified on shapes, see `to_mlx_weights`):
- self-attention q/k/v are fused into one `linear_0` ([3*d, d]), cross-attention k/v into
  `linear_1` ([2*d, d]); the key projection has no bias in Whisper, CTranslate2 stores zeros;
- `decoder/projection/weight` is an alias of the token embedding (MLX ties them too);
- the encoder's sinusoidal position encodings are stored, MLX recomputes them (checked equal);
- Conv1d weights are [out, in, kernel] (PyTorch); MLX wants [out, kernel, in].
Dimensions are derived from the weights, alignment heads from the CTranslate2 config.json.

The reader (`read_ct2_model`) needs numpy only; `ensure_whisper_mlx` runs the conversion inside
the `mlx` env (which has numpy) like the other model builders.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

BUILD_VERSION = 1  # bump to rebuild cached models after a change here
SUPPORTED_BINARY_VERSION = 6
# CTranslate2's DataType enum order (include/ctranslate2/types.h, specs/model_spec.py).
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


class Ct2FormatError(ValueError):
    """model.bin is not a CTranslate2 model this reader understands; the message says why."""


@dataclass
class Ct2Model:
    """The contents of a CTranslate2 model.bin."""

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict = field(default_factory=dict)  # name -> numpy array (0-d for scalars)
    aliases: dict = field(default_factory=dict)  # alias name -> variable name

    def get(self, name: str):
        return self.variables[self.aliases.get(name, name)]


def _unpack(stream: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    raw = stream.read(size)
    if len(raw) != size:
        raise Ct2FormatError(f"model.bin ends early (wanted {size} more bytes at offset {stream.tell()})")
    return struct.unpack("<" + fmt, raw)[0]


def _string(stream: BinaryIO) -> str:
    length = _unpack(stream, "H")  # includes the trailing NUL
    raw = stream.read(length)
    if len(raw) != length or not raw.endswith(b"\0"):
        raise Ct2FormatError(f"model.bin has a malformed string at offset {stream.tell()}")
    return raw[:-1].decode("utf-8")


def read_ct2_model(path: Path) -> Ct2Model:
    """Parse a CTranslate2 model.bin: version, spec name, revision, the variables (name, rank,
    dims, dtype id, byte count, data) and the aliases, all little-endian."""
    import numpy as np

    with open(path, "rb") as stream:
        version = _unpack(stream, "I")
        if version != SUPPORTED_BINARY_VERSION:
            raise Ct2FormatError(
                f"{path}: CTranslate2 binary version {version}; this reader understands "
                f"version {SUPPORTED_BINARY_VERSION} (ctranslate2 >= 3)"
            )
        model = Ct2Model(version, _string(stream), _unpack(stream, "I"))
        for _ in range(_unpack(stream, "I")):
            name = _string(stream)
            shape = tuple(_unpack(stream, "I") for _ in range(_unpack(stream, "B")))
            type_id = _unpack(stream, "B")
            if type_id >= len(CT2_DTYPES):
                raise Ct2FormatError(f"{path}: variable {name} has unknown dtype id {type_id}")
            dtype_name = CT2_DTYPES[type_id]
            num_bytes = _unpack(stream, "I")
            data = stream.read(num_bytes)
            if len(data) != num_bytes:
                raise Ct2FormatError(f"{path}: variable {name} is cut short")
            if dtype_name == "bfloat16":  # numpy has none: widen to float32 via the high half
                array = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(data, dtype=np.dtype(dtype_name).newbyteorder("<"))
            if array.size != int(np.prod(shape, dtype=np.int64)):
                raise Ct2FormatError(f"{path}: variable {name} holds {array.size} values for shape {shape}")
            model.variables[name] = array.reshape(shape)
        for _ in range(_unpack(stream, "I")):
            alias = _string(stream)
            model.aliases[alias] = _string(stream)
        if stream.read(1):
            raise Ct2FormatError(f"{path}: unexpected bytes after the aliases")
    return model


def _dequantized(model: Ct2Model, name: str):
    """A weight as float; int8/int16 weights come with `<name>_scale` (value = q / scale,
    one scale per output row for int8)."""
    import numpy as np

    weight = model.get(name)
    if weight.dtype.kind in "iu":
        scale = model.get(name + "_scale").astype(np.float32)
        weight = weight.astype(np.float32) / (scale.reshape(-1, *([1] * (weight.ndim - 1))) if scale.ndim else scale)
    return weight


def _layer_count(model: Ct2Model, prefix: str) -> int:
    indices = {int(m.group(1)) for n in model.variables if (m := re.match(rf"{prefix}/layer_(\d+)/", n))}
    if indices != set(range(len(indices))):
        raise Ct2FormatError(f"{prefix} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0):
    """Whisper's encoder position encodings (the formula mlx-whisper recomputes at load)."""
    import numpy as np

    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1)


def dimensions(model: Ct2Model) -> dict[str, int]:
    """mlx-whisper's ModelDimensions, read off the weights."""
    conv1 = model.get("encoder/conv1/weight")  # [n_audio_state, n_mels, 3]
    embeddings = model.get("decoder/embeddings/weight")  # [n_vocab, n_text_state]
    return {
        "n_mels": int(conv1.shape[1]),
        "n_audio_ctx": int(model.get("encoder/position_encodings/encodings").shape[0]),
        "n_audio_state": int(conv1.shape[0]),
        "n_audio_head": int(model.get("encoder/num_heads")),
        "n_audio_layer": _layer_count(model, "encoder"),
        "n_vocab": int(embeddings.shape[0]),
        "n_text_ctx": int(model.get("decoder/position_encodings/encodings").shape[0]),
        "n_text_state": int(embeddings.shape[1]),
        "n_text_head": int(model.get("decoder/num_heads")),
        "n_text_layer": _layer_count(model, "decoder"),
    }


def to_mlx_weights(model: Ct2Model) -> tuple[dict[str, int], dict]:
    """(ModelDimensions dict, {mlx parameter name: numpy array}) for a CTranslate2 WhisperSpec."""
    import numpy as np

    if model.spec_name != "WhisperSpec":
        raise Ct2FormatError(f"not a Whisper model: the spec is {model.spec_name}")
    for flag, wanted in (("decoder/scale_embeddings", False), ("decoder/pre_norm", True),
                         ("decoder/start_from_zero_embedding", False)):
        if flag in model.variables and bool(model.get(flag)) != wanted:
            raise Ct2FormatError(f"{flag} is {bool(model.get(flag))}; Whisper has {wanted}")
    dims = dimensions(model)
    out: dict = {}
    used: set[str] = set()

    def take(name: str):
        used.add(name)
        if name + "_scale" in model.variables:
            used.add(name + "_scale")
        return _dequantized(model, name)

    def linear(dst: str, src: str, *, bias: bool = True) -> None:
        out[f"{dst}.weight"] = take(f"{src}/weight")
        if bias:
            out[f"{dst}.bias"] = take(f"{src}/bias")

    def layer_norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = take(f"{src}/gamma")
        out[f"{dst}.bias"] = take(f"{src}/beta")

    def split(dst_names: list[str], src: str, state: int) -> None:
        """A fused projection ([len(dst)*state, state]) into its parts; the key has no bias."""
        weight, fused_bias = take(f"{src}/weight"), take(f"{src}/bias")
        if weight.shape != (len(dst_names) * state, state):
            raise Ct2FormatError(f"{src}/weight is {weight.shape}, expected fused {(len(dst_names) * state, state)}")
        for i, dst in enumerate(dst_names):
            part = slice(i * state, (i + 1) * state)
            out[f"{dst}.weight"] = weight[part]
            if dst.endswith(".key"):
                if np.any(fused_bias[part] != 0):
                    raise Ct2FormatError(f"{src}: the key bias is not zero, but Whisper's key has no bias")
            else:
                out[f"{dst}.bias"] = fused_bias[part]

    def block(dst: str, src: str, state: int, cross: bool) -> None:
        split([f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"], f"{src}/self_attention/linear_0", state)
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        layer_norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        if cross:
            linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            split([f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"], f"{src}/attention/linear_1", state)
            linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
            layer_norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.mlp1", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp2", f"{src}/ffn/linear_1")
        layer_norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")

    for conv in ("conv1", "conv2"):
        out[f"encoder.{conv}.weight"] = take(f"encoder/{conv}/weight").transpose(0, 2, 1)  # -> [out, k, in]
        out[f"encoder.{conv}.bias"] = take(f"encoder/{conv}/bias")
    encodings = take("encoder/position_encodings/encodings").astype(np.float32)
    if not np.allclose(encodings, sinusoids(*encodings.shape), atol=2e-3):
        raise Ct2FormatError("the encoder position encodings are not Whisper's sinusoids, which MLX recomputes")
    for n in range(dims["n_audio_layer"]):
        block(f"encoder.blocks.{n}", f"encoder/layer_{n}", dims["n_audio_state"], cross=False)
    layer_norm("encoder.ln_post", "encoder/layer_norm")

    out["decoder.token_embedding.weight"] = take("decoder/embeddings/weight")
    out["decoder.positional_embedding"] = take("decoder/position_encodings/encodings")
    for n in range(dims["n_text_layer"]):
        block(f"decoder.blocks.{n}", f"decoder/layer_{n}", dims["n_text_state"], cross=True)
    layer_norm("decoder.ln", "decoder/layer_norm")
    # The output projection must be the token embedding: mlx-whisper ties them (as_linear).
    projection = "decoder/projection/weight"
    if model.aliases.get(projection) != "decoder/embeddings/weight" and not (
        projection in model.variables and np.array_equal(model.get(projection), model.get("decoder/embeddings/weight"))
    ):
        raise Ct2FormatError("decoder/projection/weight differs from the token embedding; MLX Whisper ties them")
    used.add(projection)
    if "decoder/projection/bias" in model.variables and np.any(model.get("decoder/projection/bias") != 0):
        raise Ct2FormatError("decoder/projection has a bias; MLX Whisper has none")
    used.add("decoder/projection/bias")

    # Whatever is left must be a scalar setting (num_heads, activation ...), not a weight we dropped.
    leftover = [n for n, v in model.variables.items() if n not in used and v.ndim > 0]
    if leftover:
        raise Ct2FormatError(f"variables with no MLX counterpart: {leftover[:5]}")
    return dims, out


def convert(ct2_dir: Path, out_dir: Path, dtype: str = "float16") -> dict:
    """Write an MLX Whisper folder (config.json, weights.npz) converted from `ct2_dir`."""
    import numpy as np

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    model = read_ct2_model(ct2_dir / "model.bin")
    dims, weights = to_mlx_weights(model)
    weights = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in weights.items()}
    config_path = ct2_dir / "config.json"
    heads = json.loads(config_path.read_text()).get("alignment_heads") if config_path.exists() else None
    if heads:  # without it mlx-whisper times words with all heads of the upper half of layers
        heads = np.asarray(heads, dtype=np.int64).reshape(-1, 2)
        if heads.min() < 0 or heads[:, 0].max() >= dims["n_text_layer"] or heads[:, 1].max() >= dims["n_text_head"]:
            raise Ct2FormatError(f"alignment heads {heads.tolist()} do not fit {dims}")
        weights["alignment_heads"] = heads
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "weights.npz", **weights)
    (out_dir / "config.json").write_text(json.dumps({"model_type": "whisper", **dims}, indent=1))
    return {"dims": dims, "tensors": len(weights), "alignment_heads": None if heads is None else heads.tolist(),
            "spec_revision": model.spec_revision}


CONVERT = r"""
import json, sys
from pathlib import Path
from tests.model_factory.whisper_mlx import convert
print("RESULT " + json.dumps(convert(Path(sys.argv[1]), Path(sys.argv[2]))))
"""


def ensure_whisper_mlx(root: Path, source: Path | None = None) -> Path:
    """The MLX Whisper base folder under `root`, converted once (inside the mlx env) from the
    CTranslate2 Whisper base model (`source`, default: installed by `captionbus models
    fetch-test`), then reused."""
    from tests.envtools import publish_build, run_in_env

    if source is None:
        from captionbus.models import ensure_whisper_base

        source = ensure_whisper_base()
    folder = Path(root) / f"whisper-base-mlx-v{BUILD_VERSION}"
    if (folder / "config.json").exists() and (folder / "weights.npz").exists():
        return folder
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    run_in_env("mlx", CONVERT, str(source), str(building), timeout=600)
    publish_build(building, folder, lambda done: (done / "config.json").exists())
    return folder
