"""A tiny, randomly initialised wav2vec2 CTC model per language, for the alignment stage.

No wav2vec2 alignment weights can be had offline (shared/FACTS.md), so tests build one with
transformers' own classes and `save_pretrained`, and point the service at the folder, which
`whisperx.load_align_model(model_name=<folder>)` loads the way it loads a Hugging Face model.
The vocabulary is the language's script in lower case (whisperx keeps only transcript
characters found in the model's vocabulary and maps the rest to a wildcard), `<pad>` is the
CTC blank and `|` the word delimiter, as in real wav2vec2 CTC checkpoints. Its outputs are
random, so alignments from it are valid CTC paths but not accurate times.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.envtools import publish_build, run_in_env

# The characters each test language's vocabulary holds, besides <pad>, <unk> and "|".
SCRIPTS = {
    "en": "abcdefghijklmnopqrstuvwxyz'",
    "hi": "".join(chr(code) for code in range(0x0900, 0x0980)),  # the Devanagari block
}
BUILD_VERSION = 1  # bump to rebuild cached models after a change here

BUILD = r"""
import json, sys
from pathlib import Path
import torch
from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                          Wav2Vec2ForCTC, Wav2Vec2Processor)

out, characters = Path(sys.argv[1]), json.loads(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
vocab = {"<pad>": 0, "<unk>": 1, "|": 2}
for character in characters:
    vocab.setdefault(character, len(vocab))
(out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
tokenizer = Wav2Vec2CTCTokenizer(str(out / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                     do_normalize=True, return_attention_mask=False)
Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)

torch.manual_seed(0)
config = Wav2Vec2Config(
    vocab_size=len(tokenizer), pad_token_id=0, ctc_loss_reduction="mean",
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    # three conv layers with total stride 320: 20 ms frames, like full-size wav2vec2
    conv_dim=(32, 32, 32), conv_kernel=(10, 8, 8), conv_stride=(5, 8, 8),
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    mask_time_prob=0.0,
)
model = Wav2Vec2ForCTC(config).eval()
model.save_pretrained(out)
print("RESULT " + json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(vocab)}))
"""


def ensure_wav2vec2(root: Path, language: str) -> Path:
    """The folder of a tiny wav2vec2 CTC model (with processor) for `language` under `root`;
    built once inside the whisperx env, then reused."""
    if language not in SCRIPTS:
        raise ValueError(f"no test vocabulary for {language!r}; known: {sorted(SCRIPTS)}")
    folder = Path(root) / f"wav2vec2-tiny-{language}-v{BUILD_VERSION}"
    if (folder / "config.json").exists() and (folder / "preprocessor_config.json").exists():
        return folder
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    run_in_env(
        "whisperx", BUILD, str(building), json.dumps(SCRIPTS[language]), timeout=600,
        extra_env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    publish_build(building, folder, lambda done: (done / "config.json").exists())
    return folder
