"""translation_indictrans2 and translation_nllb: transcript -> translated transcript.

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_options import DEVICE, THREADS, Device, ServiceOptions, comma_list
from captionbus.contracts.stage_params import NOT_BOOL, BranchParams

# translation: units per generate() call (beams x batch x length is what memory holds).
MAX_TRANSLATION_BATCH = 64

MAX_CONTEXT_SEGMENTS = 100

# A job's glossary travels in its request: bounded so it cannot make every unit slow.
MAX_GLOSSARY_TERMS = 5000

MAX_TERM_CHARS = 200

MAX_GLOSSARY_CHARS = MAX_GLOSSARY_TERMS * (2 * MAX_TERM_CHARS + 40)  # TSV: source, target, languages

GlossaryText = Annotated[str, Field(max_length=MAX_TERM_CHARS)]

GlossaryEntry = GlossaryText | Annotated[list[GlossaryText | None], Field(min_length=1, max_length=2)]

Glossary = (
    Annotated[str, Field(max_length=MAX_GLOSSARY_CHARS)]
    | Annotated[list[GlossaryEntry], Field(max_length=MAX_GLOSSARY_TERMS)]
    | Annotated[dict[GlossaryText, GlossaryText | None], Field(max_length=MAX_GLOSSARY_TERMS)]
)


class TranslationParams(BranchParams):
    """Every translation backend (translation_indictrans2, translation_nllb) takes these."""

    glossary: Glossary | None = Field(
        None, description="terms to keep or map: TSV text (source<TAB>target[<TAB>languages]), "
                          "a list of [source, target] pairs or terms, or a {source: target} mapping")
    batch_size: Annotated[int, Field(ge=1, le=MAX_TRANSLATION_BATCH), NOT_BOOL] | None = Field(
        None, description="sentence units per model call; unset: the service's")
    context: bool | Annotated[int, Field(ge=1, le=MAX_CONTEXT_SEGMENTS), NOT_BOOL] = Field(
        True, description="true: join segments into sentence units; false: each segment alone; "
                          "a number: at most that many segments per unit")


class TranslationOptions(ServiceOptions):
    """What every translation backend's service takes."""

    glossary: str | None = Field(None, validation_alias="CAPTIONBUS_TRANSLATION_GLOSSARY",
                                 description="TSV file applied to every job (a job's own terms win)")
    batch_size: int = Field(16, ge=1, le=64, validation_alias="CAPTIONBUS_TRANSLATION_BATCH_SIZE",
                              description="default of the batch_size param")


class NllbOptions(TranslationOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_NLLB_"

    model: str | None = Field(None, description="Hugging Face id or local folder; unset: config/translation.yaml's")
    device: Device | None = Field(None, description=DEVICE)
    num_beams: int = Field(4, ge=1, le=32, description="beam search width")
    threads: int | None = Field(None, ge=1, description=THREADS + " (cpu only)")


class IndicTrans2Options(TranslationOptions):
    env_prefix: ClassVar[str] = "CAPTIONBUS_INDICTRANS2_"

    model_en_indic: str | None = Field(None, validation_alias="CAPTIONBUS_INDICTRANS2_EN_INDIC_MODEL",
                                       description="en -> Indic model; unset: config/translation.yaml's")
    model_indic_en: str | None = Field(None, validation_alias="CAPTIONBUS_INDICTRANS2_INDIC_EN_MODEL",
                                       description="Indic -> en model; unset: config/translation.yaml's")
    model_indic_indic: str | None = Field(None, validation_alias="CAPTIONBUS_INDICTRANS2_INDIC_INDIC_MODEL",
                                          description="Indic -> Indic model; unset: config/translation.yaml's")
    device: Device | None = Field(None, description=DEVICE + " (float16 there, float32 on cpu)")
    num_beams: int = Field(5, ge=1, le=32, description="beam search width (IndicTrans2's own default)")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="cap per output")
    warm_models: int = Field(2, ge=1, description="direction models kept loaded (a 1B model is ~4 GB in float32)")
    preload: Annotated[list[Literal["en-indic", "indic-en", "indic-indic"]], BeforeValidator(comma_list)] = Field(
        default_factory=list, description="directions loaded at start, comma-separated")
    threads: int | None = Field(None, ge=1, description=THREADS + " (cpu only)")


TRANSLATION_INDICTRANS2 = StageSpec(
    name="translation_indictrans2",
    summary="transcript -> translated transcript (IndicTrans2)",
    env="indictrans2",
    params=TranslationParams,
    inputs=("transcript",),
    outputs=("transcript",),
    options=IndicTrans2Options,
    module="indictrans2_stage",
    note="Indic <-> English, Indic <-> Indic (config/translation.yaml routes)",
)


TRANSLATION_NLLB = StageSpec(
    name="translation_nllb",
    summary="transcript -> translated transcript (NLLB-200)",
    env="nllb",
    params=TranslationParams,
    inputs=("transcript",),
    outputs=("transcript",),
    options=NllbOptions,
    module="nllb_stage",
    note="NLLB-200: every other pair",
)

SPECS = (TRANSLATION_INDICTRANS2, TRANSLATION_NLLB)
