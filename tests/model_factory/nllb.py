"""A tiny, randomly initialised NLLB model for the translation_nllb stage.

No NLLB weights can be had offline (shared/FACTS.md), so this builds one with the same parts a
real checkpoint has: a sentencepiece BPE model (`sentencepiece.bpe.model`, trained here on a few
English, Hindi and French sentences with a small vocabulary) wrapped as transformers'
NllbTokenizer, whose special tokens are all of NLLB's FLORES-200 language codes (eng_Latn,
hin_Deva, fra_Latn, tam_Taml ...), and an M2M100ForConditionalGeneration (NLLB's architecture)
with a few small layers; both saved with `save_pretrained`, so the service loads them through
the real `AutoTokenizer` / `AutoModelForSeq2SeqLM.from_pretrained` path. Its translations are
gibberish in the right shape.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.envtools import publish_build, run_in_env

BUILD_VERSION = 1  # bump to rebuild cached models after a change here

# Training text for the tokenizer: a few sentences per language, plus the glossary placeholders
# ("[1]" ...) the translation core puts in, so the vocabulary has brackets and digits as NLLB's does.
CORPUS = """\
The weather is nice today and we are going to the market.
My friend Raj lives in Mumbai with his family.
Please turn off the lights before you leave the room.
How are you? I am fine, thank you very much.
She said that the film starts at seven in the evening.
We watched the match on television last night.
Subtitles help people follow a film in another language.
The train was late again, so we took a taxi home.
आज मौसम अच्छा है और हम बाज़ार जा रहे हैं।
मेरा दोस्त राज अपने परिवार के साथ मुंबई में रहता है।
कमरे से जाने से पहले कृपया बत्ती बंद कर दीजिए।
आप कैसे हैं? मैं ठीक हूँ, बहुत धन्यवाद।
उसने कहा कि फ़िल्म शाम सात बजे शुरू होती है।
हमने कल रात टीवी पर मैच देखा।
यार, यह फ़िल्म बहुत अच्छी है।
भाई, चलो घर चलते हैं।
Il fait beau aujourd'hui et nous allons au marché.
Mon ami Raj habite à Mumbai avec sa famille.
Éteignez la lumière avant de quitter la pièce, s'il vous plaît.
Comment allez-vous ? Je vais bien, merci beaucoup.
Elle a dit que le film commence à sept heures du soir.
Nous avons regardé le match à la télévision hier soir.
Les sous-titres aident à suivre un film dans une autre langue.
[1] [2] [3] [4] [5] [6] [7] [8] [9] [10] [11] [12] 0123456789 ! ? . , ; : ' " ( ) - । ॥
"""

BUILD = r"""
import json, sys, time
from pathlib import Path
import sentencepiece as spm
import torch
from transformers import AutoTokenizer, M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer
from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

out, corpus = Path(sys.argv[1]), sys.argv[2]
started = time.monotonic()
spm_dir = out.with_name(out.name + ".spm")
spm_dir.mkdir(parents=True, exist_ok=True)
(spm_dir / "corpus.txt").write_text(corpus, encoding="utf-8")
# BPE with <unk>, <s>, </s> as pieces 0-2, like NLLB's sentencepiece.bpe.model; every character
# of the corpus kept (character_coverage=1.0) so brackets, digits and Devanagari marks are pieces.
spm.SentencePieceTrainer.train(
    input=str(spm_dir / "corpus.txt"), model_prefix=str(spm_dir / "sentencepiece.bpe"),
    model_type="bpe", vocab_size=400, hard_vocab_limit=False, character_coverage=1.0,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
)
# NllbTokenizer converts the sentencepiece model to a `tokenizers` one; the FLORES-200 language
# codes become special tokens after the pieces, as in the real checkpoint (from_pretrained on a
# bare sentencepiece folder does not add them by itself).
tokenizer = NllbTokenizer.from_pretrained(str(spm_dir), model_max_length=256,
                                          extra_special_tokens=list(FAIRSEQ_LANGUAGE_CODES))
tokenizer.save_pretrained(out)
tokenizer = AutoTokenizer.from_pretrained(out)  # what the service will load

torch.manual_seed(0)
config = M2M100Config(
    vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
    max_position_embeddings=256, scale_embedding=True,
    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
)
model = M2M100ForConditionalGeneration(config).eval()
model.save_pretrained(out)
codes = ["eng_Latn", "hin_Deva", "fra_Latn", "tam_Taml"]
assert all(tokenizer.convert_tokens_to_ids(c) != tokenizer.unk_token_id for c in codes), "language codes missing"
print("RESULT " + json.dumps({
    "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
    "tokenizer_class": type(tokenizer).__name__,
    "code_ids": {c: tokenizer.convert_tokens_to_ids(c) for c in codes},
    "seconds": time.monotonic() - started,
}))
"""


def ensure_nllb(root: Path) -> Path:
    """The folder of the tiny NLLB model (tokenizer + M2M100 weights) under `root`; built once
    inside the nllb env, then reused. Point CAPTIONBUS_NLLB_MODEL (or --option model=) at it."""
    folder = Path(root) / f"nllb-tiny-v{BUILD_VERSION}"
    if (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    shutil.rmtree(building.with_name(building.name + ".spm"), ignore_errors=True)
    run_in_env(
        "nllb", BUILD, str(building), CORPUS, timeout=600,
        extra_env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    shutil.rmtree(building.with_name(building.name + ".spm"), ignore_errors=True)
    publish_build(building, folder, lambda done: (done / "config.json").exists())
    return folder
