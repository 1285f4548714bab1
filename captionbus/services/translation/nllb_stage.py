"""translation_nllb: transcript -> translated transcript with NLLB-200 (Meta's No Language Left
Behind, an M2M100 encoder-decoder) through transformers, for every pair config/translation.yaml
routes to NLLB (IndicTrans2 takes English <-> Indic and Indic <-> Indic).

Params, input and output: captionbus.services.translation.core (the stage every backend shares).
Service options: declaration.NllbOptions (`captionbus stages translation_nllb`).

The tokenizer is told the source language (`src_lang`, which sets the language-code token it
puts before the text) and generation is forced to start with the target language's code token
(`forced_bos_token_id`): that is how one NLLB model knows which way to translate.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from captionbus.contracts.declarations.translation import TRANSLATION_NLLB, NllbOptions
from captionbus.core.hardware import usable_cores
from captionbus.core.translation_routes import Backend, backend_for_stage
from captionbus.services.runtime import BadInput, SetupContext
from captionbus.services.runtime.options import default_device
from captionbus.services.translation.core import translation_stage
from captionbus.services.translation.hub import local_files_only

STAGE_NAME = TRANSLATION_NLLB.name
# A translation is rarely more than twice as many tokens as its source; the fixed slack covers
# very short inputs. Bounded, so a degenerate model cannot loop to the position limit.
NEW_TOKENS_PER_INPUT_TOKEN = 2.0
NEW_TOKENS_SLACK = 16


@dataclass
class NllbTranslator:
    model: Any  # transformers M2M100ForConditionalGeneration
    tokenizer: Any  # transformers NllbTokenizer
    backend: Backend
    source: str  # what was loaded: HF id or local dir
    device: str
    num_beams: int

    def describe(self) -> str:
        return f"{self.source} ({self.device})"

    def language_token(self, code: str) -> tuple[str, int]:
        flores = self.backend.flores(code)
        token_id = self.tokenizer.convert_tokens_to_ids(flores)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise BadInput(f"the loaded NLLB model ({self.describe()}) has no language token {flores} for {code!r}")
        return flores, token_id

    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        import torch

        if not texts:
            return []
        source_code, _ = self.language_token(source)
        _, target_id = self.language_token(target)
        self.tokenizer.src_lang = source_code  # the code token the encoder input starts with
        max_positions = int(getattr(self.model.config, "max_position_embeddings", 1024))
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=min(self.tokenizer.model_max_length, max_positions)).to(self.device)
        input_tokens = int(inputs["input_ids"].shape[1])
        max_new_tokens = min(int(input_tokens * NEW_TOKENS_PER_INPUT_TOKEN) + NEW_TOKENS_SLACK, max_positions - 2)
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs,
                forced_bos_token_id=target_id,
                num_beams=self.num_beams,
                max_new_tokens=max_new_tokens,
            )
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]


def nllb_source(ctx: SetupContext) -> dict[str, str]:
    """The model load_nllb() reads: the option, else the env var config/translation.yaml names
    (CAPTIONBUS_NLLB_MODEL), else the configured default."""
    slot = backend_for_stage(STAGE_NAME).models["any"]
    options: NllbOptions = ctx.options
    return {"any": options.model or (os.environ.get(slot.model_env) if slot.model_env else None) or slot.model}


def load_nllb(ctx: SetupContext) -> NllbTranslator:
    backend = backend_for_stage(STAGE_NAME)
    slot = backend.models["any"]
    options: NllbOptions = ctx.options
    source = nllb_source(ctx)["any"]
    # Offline without the weights: fail now, before torch is even imported (captionbus/services/translation/hub.py).
    local = local_files_only(source, slot.model_env, "NLLB model")

    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    device = options.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        ctx.log.warning("cuda asked for but this torch has no usable GPU; translating on cpu", torch=torch.__version__)
        device = "cpu"
    num_beams = options.num_beams
    if device == "cpu":
        torch.set_num_threads(options.threads or usable_cores())

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForSeq2SeqLM.from_pretrained(
            source, local_files_only=local, dtype=torch.float16 if device.startswith("cuda") else torch.float32
        )
    except (OSError, ValueError) as err:  # ValueError: a malformed id or path (HFValidationError)
        raise RuntimeError(
            f"cannot load the NLLB model {source!r} ({err}); set {slot.model_env} (or --option model=) to a "
            "local folder saved with save_pretrained, or a Hugging Face id in the local cache"
        ) from err
    model.to(device).eval()
    return NllbTranslator(model, tokenizer, backend, source, device, num_beams)


STAGE = translation_stage(TRANSLATION_NLLB, load_nllb, declare=nllb_source,
                          report_packages=("transformers", "torch", "tokenizers", "sentencepiece"))
