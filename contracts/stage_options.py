"""Service options: how an operator sets up one stage service (`serve STAGE --option k=v`,
`CAPTIONBUS_OPTION_<KEY>`, or the stage's own environment variable, e.g. CAPTIONBUS_ASR_MODEL).
One pydantic model per stage; `ServiceOptions.load` merges the sources and validates.

Why here and not in services/<stage>/: the launcher (`captionbus stages`, `captionbus serve`,
`run`) checks and prints them without a stage's environment, and contracts are what every
interpreter can import (pydantic only, no ML library). The stage's setup() receives the parsed
model as `SetupContext.options`.

Sources, first wins: the command line / CAPTIONBUS_OPTION_<KEY> (`options`), then the field's
environment variable (`env_var`: the model's `env_prefix` + the upper-cased name unless the field
names its own under json_schema_extra "env"), then the default. An empty value counts as unset.
Unknown keys and bad values are refused with the allowed ones (e.g. `backend: Input should be
'whisperx' or 'mlx'`). Defaults that depend on the host (a GPU, the number of cores, the models
folder) are None here and resolved by the stage; the description says how.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

Device = Literal["cpu", "cuda"]
DEVICE = "cpu | cuda; unset: cuda where the hardware cache found a GPU this env's torch can use"
THREADS = "CPU threads; unset: all cores"


class ServiceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    env_prefix: ClassVar[str] = ""

    @classmethod
    def env_var(cls, name: str) -> str | None:
        extra = cls.model_fields[name].json_schema_extra
        if isinstance(extra, dict) and "env" in extra:
            return str(extra["env"]) or None
        return f"{cls.env_prefix}{name.upper()}" if cls.env_prefix else None

    @classmethod
    def raw_values(cls, options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            env = cls.env_var(name)
            if env and environ.get(env, "") != "":
                values[name] = environ[env]
        values.update({k: v for k, v in options.items() if v not in (None, "")})
        return values

    @classmethod
    def load(cls, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None):
        """The options of one service process; raises pydantic.ValidationError."""
        return cls.model_validate(cls.raw_values(options or {}, environ or {}))


class NoOptions(ServiceOptions):
    """The stage has no service options."""


class AsrOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_ASR_"

    backend: Literal["whisperx", "mlx"] | None = Field(
        None, description="unset: whisperx where it is installed, else mlx where mlx_whisper is (the mlx env)")
    model: str | None = Field(
        None, description="whisperx: CTranslate2 Whisper folder or Hugging Face id, default "
                          "<models>/whisper-base-ct2; mlx: MLX Whisper folder, default <models>/whisper-base-mlx")
    device: Device | None = Field(None, description=DEVICE + " (whisperx)")
    compute_type: str | None = Field(None, description="CTranslate2 compute type; unset: int8 on cpu, float16 on cuda")
    threads: int | None = Field(None, ge=1, description=THREADS)
    batch_size: int = Field(4, ge=1, le=256, description="speech chunks decoded together (whisperx)")
    mlx_openblas: bool = Field(True, json_schema_extra={"env": "CAPTIONBUS_MLX_OPENBLAS"},
                               description="mlx on Linux: load OpenBLAS before mlx (its bundled BLAS is ~20x slower)")


class VadOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_VAD_"

    model: str | None = Field(None, description="silero_vad.onnx; unset: <models>/silero-vad/silero_vad.onnx")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (a frame is tiny: more only add overhead)")


class VadPyannoteOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_VAD_PYANNOTE_"

    model: str | None = Field(
        None, json_schema_extra={"env": "CAPTIONBUS_PYANNOTE_SEGMENTATION"},
        description="segmentation checkpoint (pytorch_model.bin); unset: <models>/pyannote-segmentation/pytorch_model.bin")
    device: Device | None = Field(None, description=DEVICE)
    threads: int = Field(1, ge=1, description="torch threads (the model is small; 2 threads on a busy "
                                                 "2-core host ran ~20x slower than 1)")
    step: float | None = Field(None, gt=0, description="seconds between model windows; unset: a tenth of the "
                                                       "window (0.5 s), as pyannote and whisperx do")
    batch_size: int = Field(32, ge=1, le=4096, description="windows per forward pass")


class SourceSeparationOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_DEMUCS_"

    model: str = Field("htdemucs", min_length=1, description="demucs model name or signature")
    repo: str | None = Field(None, description="local demucs model folder (as `demucs --repo` takes); unset: "
                                               "demucs fetches its pretrained weights the usual way")
    device: Device | None = Field(None, description=DEVICE)
    threads: int | None = Field(None, ge=1, description=THREADS)
    shifts: int = Field(0, ge=0, le=20, description="random-shift passes (each one a full extra pass for ~0.2 dB)")


class AlignmentOptions(ServiceOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_ALIGN_"

    config: str | None = Field(None, description="language -> model file; unset: config/alignment.yaml")
    models: dict[str, str | None] = Field(
        default_factory=dict, json_schema_extra={"env": "CAPTIONBUS_ALIGN_MODEL_<LANG>", "option": "model_<lang>"},
        description="model_<lang>=folder|id overrides one language (empty: no alignment for it)")
    device: Device | None = Field(None, description=DEVICE)
    threads: int | None = Field(None, ge=1, description=THREADS)
    cache_size: int = Field(2, ge=1, description="languages kept loaded (least recently used goes)")
    cache_dir: str | None = Field(None, description="download folder for hub models; unset: the libraries' own")

    @classmethod
    def raw_values(cls, options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
        """model_<lang> keys (and CAPTIONBUS_ALIGN_MODEL_<LANG>) gather into `models`; an empty
        value switches alignment off for that language."""
        models: dict[str, str | None] = {}
        for key, value in environ.items():
            if key.startswith("CAPTIONBUS_ALIGN_MODEL_") and len(key) > len("CAPTIONBUS_ALIGN_MODEL_"):
                models[key[len("CAPTIONBUS_ALIGN_MODEL_"):].lower()] = value or None
        rest = {}
        for key, value in options.items():
            if key.lower().startswith("model_") and len(key) > len("model_"):
                models[key[len("model_"):].lower()] = str(value) if value else None
            else:
                rest[key] = value
        values = super().raw_values(rest, {k: v for k, v in environ.items()
                                           if not k.startswith("CAPTIONBUS_ALIGN_MODEL_")})
        return {**values, "models": {**models, **(values.get("models") or {})}}


class TranslationOptions(ServiceOptions):
    """What every translation backend's service takes."""

    glossary: str | None = Field(None, json_schema_extra={"env": "CAPTIONBUS_TRANSLATION_GLOSSARY"},
                                 description="TSV file applied to every job (a job's own terms win)")
    batch_size: int = Field(16, ge=1, le=64, json_schema_extra={"env": "CAPTIONBUS_TRANSLATION_BATCH_SIZE"},
                              description="default of the batch_size param")


class NllbOptions(TranslationOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_NLLB_"

    model: str | None = Field(None, description="Hugging Face id or local folder; unset: config/translation.yaml's")
    device: Device | None = Field(None, description=DEVICE)
    num_beams: int = Field(4, ge=1, le=32, description="beam search width")
    threads: int | None = Field(None, ge=1, description=THREADS + " (cpu only)")


class IndicTrans2Options(TranslationOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_INDICTRANS2_"

    model_en_indic: str | None = Field(None, json_schema_extra={"env": "CAPTIONBUS_INDICTRANS2_EN_INDIC_MODEL"},
                                       description="en -> Indic model; unset: config/translation.yaml's")
    model_indic_en: str | None = Field(None, json_schema_extra={"env": "CAPTIONBUS_INDICTRANS2_INDIC_EN_MODEL"},
                                       description="Indic -> en model; unset: config/translation.yaml's")
    model_indic_indic: str | None = Field(None, json_schema_extra={"env": "CAPTIONBUS_INDICTRANS2_INDIC_INDIC_MODEL"},
                                          description="Indic -> Indic model; unset: config/translation.yaml's")
    device: Device | None = Field(None, description=DEVICE + " (float16 there, float32 on cpu)")
    num_beams: int = Field(5, ge=1, le=32, description="beam search width (IndicTrans2's own default)")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="cap per output")
    warm_models: int = Field(2, ge=1, description="direction models kept loaded (a 1B model is ~4 GB in float32)")
    preload: list[Literal["en-indic", "indic-en", "indic-indic"]] = Field(
        default_factory=list, description="directions loaded at start, comma-separated")
    threads: int | None = Field(None, ge=1, description=THREADS + " (cpu only)")

    @classmethod
    def raw_values(cls, options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
        values = super().raw_values(options, environ)
        if isinstance(values.get("preload"), str):  # "en-indic,indic-en"
            values["preload"] = [d.strip() for d in values["preload"].split(",") if d.strip()]
        return values


class NoopOptions(ServiceOptions):
    """The runtime tests' stage keeps whatever it is given (setup() returns it)."""

    model_config = ConfigDict(extra="allow", frozen=True)
