"""translation_indictrans2: transcript -> translated transcript with IndicTrans2 (AI4Bharat), for
English <-> Indic and Indic <-> Indic pairs (config/translation.yaml routes them here; NLLB takes
the rest).

Params, input and output: captionbus.services.translation.core (the stage every backend shares).
Service options: declaration.IndicTrans2Options (`captionbus stages
translation_indictrans2`): a model per direction, device, beams, warm models, preloads.

How a batch is translated (IndicTrans2's documented inference path): IndicTransToolkit's
IndicProcessor normalises each text, puts numbers/URLs/e-mails behind `<ID n>` placeholders,
transliterates Indic scripts to Devanagari (the models share one script) and prefixes the FLORES
tags ("hin_Deva eng_Latn ..."); the direction's tokenizer and model (their code comes with the
weights: trust_remote_code) generate with beam search; decoding happens in the tokenizer's target
mode (IndicTrans2 has separate source and target vocabularies); IndicProcessor puts placeholders
back, transliterates to the target script and detokenises. A model is loaded the first time its
direction is asked for and kept warm (least recently used goes first).

indic-nlp-library-itt 0.1.1 (IndicProcessor's normaliser) has a broken visarga rule: its pattern
matches ASCII digits and capitals instead of the script's letters and its replacement drops the
character, so Hindi "3:45" reaches the model as "\\1ः45". `_repair_visarga_rule` restores the
rule the models were trained with (a colon after a letter of the script becomes visarga).
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captionbus.contracts.declarations.translation import TRANSLATION_INDICTRANS2, IndicTrans2Options
from captionbus.core.hardware import usable_cores
from captionbus.core.translation_routes import Backend, backend_for_stage
from captionbus.services.runtime import SetupContext
from captionbus.services.runtime.options import default_device
from captionbus.services.translation.core import translation_stage
from captionbus.services.translation.hub import local_files_only

STAGE_NAME = TRANSLATION_INDICTRANS2.name
DIRECTIONS = ("en-indic", "indic-en", "indic-indic")
ENGLISH = "en"
# IndicTrans2 models have 256 source positions; longer inputs are cut (and logged).
MAX_INPUT_TOKENS = 256
# Outputs are bounded by the input's length too, so a degenerate model cannot loop to the cap:
# Indic tokenisations run longer than English ones, hence the generous factor.
NEW_TOKENS_PER_INPUT_TOKEN = 3.0
NEW_TOKENS_SLACK = 16


def direction(source: str, target: str) -> str:
    """Which of the three IndicTrans2 models translates source -> target (ISO 639-1)."""
    if source == ENGLISH:
        return "en-indic"
    if target == ENGLISH:
        return "indic-en"
    return "indic-indic"


def _option_key(direction_name: str) -> str:
    return "model_" + direction_name.replace("-", "_")


@dataclass
class LoadedModel:
    source: str
    tokenizer: Any
    model: Any
    load_seconds: float


@dataclass
class IndicTrans2Translator:
    backend: Backend
    sources: dict[str, str]  # direction -> HF id or local dir
    device: str
    dtype: Any  # torch dtype
    num_beams: int
    max_new_tokens: int
    warm_models: int
    log: Any
    processor: Any = None  # IndicTransToolkit IndicProcessor(inference=True)
    warm: "OrderedDict[str, LoadedModel]" = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # IndicProcessor keeps per-batch state

    def describe(self) -> str:
        """Every direction's model: stable for the service's lifetime (worker info, cache keys)."""
        return ", ".join(f"{d}={s}" for d, s in self.sources.items()) + f" ({self.device}, beams {self.num_beams})"

    def describe_pair(self, source: str, target: str) -> str:
        """The one model that translates source -> target (what a translated transcript names)."""
        return f"{self.sources[direction(source, target)]} ({self.device}, beams {self.num_beams})"

    def loaded(self, name: str) -> LoadedModel:
        if name in self.warm:
            self.warm.move_to_end(name)
            return self.warm[name]
        while len(self.warm) >= self.warm_models:
            evicted, _ = self.warm.popitem(last=False)
            self.log.info("indictrans2 model unloaded", direction=evicted)
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
        loaded = load_model(self.sources[name], name, self.device, self.dtype)
        self.log.info("indictrans2 model loaded", direction=name, model=loaded.source,
                      seconds=round(loaded.load_seconds, 2))
        self.warm[name] = loaded
        return loaded

    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        import torch

        src_flores, tgt_flores = self.backend.flores(source), self.backend.flores(target)
        wanted = [i for i, text in enumerate(texts) if text.strip()]  # nothing to translate in blanks
        outputs = ["" for _ in texts]
        if not wanted:
            return outputs
        with self.lock:
            name = direction(source, target)
            loaded = self.loaded(name)
            # An empty postprocess call empties the processor's placeholder queue, in case an
            # earlier batch failed between preprocess and postprocess.
            self.processor.postprocess_batch([], lang=tgt_flores)
            batch = self.processor.preprocess_batch([texts[i] for i in wanted], src_lang=src_flores, tgt_lang=tgt_flores)
            inputs = loaded.tokenizer(batch, truncation=True, padding="longest", max_length=MAX_INPUT_TOKENS,
                                      return_tensors="pt", return_attention_mask=True)
            input_tokens = int(inputs["input_ids"].shape[1])
            if input_tokens >= MAX_INPUT_TOKENS:
                self.log.warning("indictrans2 input cut to the model's length", tokens=MAX_INPUT_TOKENS, direction=name)
            max_new_tokens = min(self.max_new_tokens, int(input_tokens * NEW_TOKENS_PER_INPUT_TOKEN) + NEW_TOKENS_SLACK)
            with torch.inference_mode():
                generated = loaded.model.generate(
                    **inputs.to(self.device),
                    num_beams=self.num_beams,
                    num_return_sequences=1,
                    max_new_tokens=max_new_tokens,
                    min_length=0,
                    use_cache=True,
                )
            # Target vocabulary: decoding with the source one gives gibberish (IndicTransToolkit README).
            with loaded.tokenizer.as_target_tokenizer():
                decoded = loaded.tokenizer.batch_decode(generated.detach().cpu().tolist(), skip_special_tokens=True,
                                                        clean_up_tokenization_spaces=True)
            translated = self.processor.postprocess_batch(decoded, lang=tgt_flores)
        for i, text in zip(wanted, translated):
            outputs[i] = text.strip()
        return outputs


def load_model(source: str, name: str, device: str, dtype: Any) -> LoadedModel:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    started = time.monotonic()
    slot_env = backend_for_stage(STAGE_NAME).models[name].model_env
    local = local_files_only(source, slot_env, f"IndicTrans2 {name} model")  # offline: fails now
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True, local_files_only=local)
        model = AutoModelForSeq2SeqLM.from_pretrained(source, trust_remote_code=True, local_files_only=local,
                                                      torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"cannot load the IndicTrans2 {name} model {source!r} ({err}); set {slot_env} (or --option "
            f"{_option_key(name)}=) to a local folder saved with save_pretrained, or a Hugging Face id in the local cache"
        ) from err
    model.to(device).eval()
    return LoadedModel(source, tokenizer, model, time.monotonic() - started)


def _repair_visarga_rule() -> None:
    """Give indicnlp's script normalisers the visarga rule they were meant to have (see the module
    docstring): a colon after a letter of the script becomes that script's visarga."""
    import regex
    from indicnlp.normalize import indic_normalize

    class VisargaRule:
        def __init__(self, first: int, last: int):
            self.pattern = regex.compile(f"([{chr(first)}-{chr(last)}]):")
            self.visarga = chr(first + 3)  # U+0903, U+0983, U+0A03 ...: the 4th code point of each block

        def sub(self, _broken_replacement: str, text: str) -> str:
            return self.pattern.sub(lambda m: m.group(1) + self.visarga, text)

    range_in_broken_pattern = regex.compile(r"u([0-9a-fA-F]{4})-\\+u([0-9a-fA-F]{4})")
    for cls in vars(indic_normalize).values():
        if (not isinstance(cls, type) or not issubclass(cls, indic_normalize.NormalizerI)
                or "_captionbus_visarga_repaired" in vars(cls)):
            continue

        def init(self, *args, _original=cls.__init__, **kwargs):
            _original(self, *args, **kwargs)
            broken = getattr(self, "visarga_pattern", None)
            found = range_in_broken_pattern.search(getattr(broken, "pattern", "") or "")
            if found and not isinstance(broken, VisargaRule):
                self.visarga_pattern = VisargaRule(int(found.group(1), 16), int(found.group(2), 16))

        cls.__init__ = init
        cls._captionbus_visarga_repaired = True


def indictrans2_sources(ctx: SetupContext) -> dict[str, str]:
    """direction -> the model load_indictrans2() reads: the option, else the env var
    config/translation.yaml names for that direction, else the configured default."""
    options: IndicTrans2Options = ctx.options
    backend = backend_for_stage(STAGE_NAME)
    sources = {}
    for name in DIRECTIONS:
        slot = backend.models[name]
        source = (getattr(options, _option_key(name))
                  or (os.environ.get(slot.model_env) if slot.model_env else None) or slot.model)
        sources[name] = str(Path(source).expanduser()) if source.startswith("~") else source
    return sources


def load_indictrans2(ctx: SetupContext) -> IndicTrans2Translator:
    import torch
    from IndicTransToolkit import IndicProcessor

    options: IndicTrans2Options = ctx.options
    backend = backend_for_stage(STAGE_NAME)
    sources = indictrans2_sources(ctx)
    device = options.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        ctx.log.warning("cuda asked for but this torch has no usable GPU; translating on cpu", torch=torch.__version__)
        device = "cpu"
    if device == "cpu":
        torch.set_num_threads(options.threads or usable_cores())
    warm_models = options.warm_models
    preload = list(options.preload)  # directions, checked by the options model
    missing = [f"{d}: {s}" for d, s in sources.items() if s.startswith((".", "/", "~")) and not Path(s).is_dir()]
    if missing:
        raise RuntimeError(f"IndicTrans2 model folders not found ({'; '.join(missing)})")

    _repair_visarga_rule()
    translator = IndicTrans2Translator(
        backend=backend,
        sources=sources,
        device=device,
        dtype=torch.float16 if device.startswith("cuda") else torch.float32,
        num_beams=options.num_beams,
        max_new_tokens=options.max_new_tokens,
        warm_models=max(warm_models, len(preload)),
        log=ctx.log,
        processor=IndicProcessor(inference=True),
    )
    for name in preload:
        translator.loaded(name)
    return translator


STAGE = translation_stage(
    TRANSLATION_INDICTRANS2,
    load_indictrans2,
    report_packages=("IndicTransToolkit", "transformers", "torch", "sentencepiece", "indic-nlp-library-itt"),
    declare=indictrans2_sources,
)
