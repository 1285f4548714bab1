"""Tiny, randomly initialised stand-ins for the three IndicTrans2 models (en-indic, indic-en,
indic-indic), for the translation_indictrans2 stage.

No IndicTrans2 weights, nor their modelling/tokenizer code (which comes with the weights), can be
had offline (shared/FACTS.md). So each direction gets a standard transformers encoder-decoder with
the same shape of vocabulary IndicTrans2 has: MarianMT, whose tokenizer (like IndicTrans2's) holds
separate source and target sentencepiece models and vocabularies and decodes in target mode under
`as_target_tokenizer()`. Both sentencepiece models are trained here on the very text the model
will see: a few English, Hindi and Tamil sentences run through IndicTransToolkit's
IndicProcessor (Moses-tokenised English; Indic text normalised and transliterated to Devanagari,
as IndicTrans2 does), and the source one has every FLORES tag of config/translation.yaml as a
single piece ("hin_Deva eng_Latn ..." is how IndicProcessor prefixes a text). The target
vocabulary is the target side's only (English for indic-en, Devanagari for en-indic and
indic-indic), and the model can never emit </s>, <unk> or <pad> (final logits bias), so every
output is non-empty text in the target's script: gibberish in the right shape and the right
script. Saved with `save_pretrained` and loaded by the service through the real
`AutoTokenizer`/`AutoModelForSeq2SeqLM.from_pretrained(..., trust_remote_code=True)` path.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.envtools import publish_build, run_in_env

BUILD_VERSION = 4  # bump to rebuild cached models after a change here
DIRECTIONS = ("en-indic", "indic-en", "indic-indic")

# Parallel-ish training text (the model is random; the tokenizers only need the characters and
# some frequent pieces). Numbers, a time, a URL-like word and glossary placeholders ([1] ...) are
# in, since IndicProcessor and the translation core put those through.
ENGLISH = """\
The weather is nice today and we are going to the market.
My friend Raj lives in Mumbai with his family.
Please turn off the lights before you leave the room.
How are you? I am fine, thank you very much.
She said that the film starts at 7:30 in the evening.
We watched the match on television last night.
Subtitles help people follow a film in another language.
The train was late again, so we took a taxi home.
Call me at 9876543210 or write to info@example.com before 15/10/2023.
Ask [1] and [2] to meet [3] at the station.
"""
HINDI = """\
आज मौसम अच्छा है और हम बाज़ार जा रहे हैं।
मेरा दोस्त राज अपने परिवार के साथ मुंबई में रहता है।
कमरे से जाने से पहले कृपया बत्ती बंद कर दीजिए।
आप कैसे हैं? मैं ठीक हूँ, बहुत धन्यवाद।
उसने कहा कि फ़िल्म शाम 7:30 बजे शुरू होती है।
हमने कल रात टीवी पर मैच देखा।
उपशीर्षक लोगों को दूसरी भाषा में फ़िल्म समझने में मदद करते हैं।
ट्रेन फिर देर से आई, इसलिए हम टैक्सी से घर गए।
मुझे 9876543210 पर फ़ोन करें या 15/10/2023 से पहले info@example.com पर लिखें।
[1] और [2] से कहो कि [3] से स्टेशन पर मिलें।
"""
TAMIL = """\
இன்று வானிலை நன்றாக உள்ளது, நாங்கள் சந்தைக்குப் போகிறோம்.
என் நண்பர் ராஜ் தன் குடும்பத்துடன் மும்பையில் வசிக்கிறார்.
அறையை விட்டு வெளியேறும் முன் விளக்குகளை அணைக்கவும்.
நீங்கள் எப்படி இருக்கிறீர்கள்? நான் நன்றாக இருக்கிறேன், மிக்க நன்றி.
படம் மாலை 7:30 மணிக்குத் தொடங்கும் என்று அவள் சொன்னாள்.
நேற்று இரவு தொலைக்காட்சியில் போட்டியைப் பார்த்தோம்.
[1] மற்றும் [2] இருவரையும் [3] உடன் நிலையத்தில் சந்திக்கச் சொல்லுங்கள்.
"""

BUILD = r"""
import json, sys, time
from pathlib import Path
import sentencepiece as spm
import torch
from IndicTransToolkit import IndicProcessor
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MarianConfig, MarianMTModel, MarianTokenizer

out, corpus, tags = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
started = time.monotonic()
processor = IndicProcessor(inference=True)
SPECIALS = {"</s>": 0, "<unk>": 1, "<pad>": 2}  # same ids in source and target vocabularies
FLORES = {"en": "eng_Latn", "hi": "hin_Deva", "ta": "tam_Taml"}

def seen(language, other, is_target):
    # What the model sees of `language`'s sentences: IndicProcessor's output (the source side with
    # its "src tgt" tags); the queue of placeholder maps is emptied after each call.
    lines = [line for line in corpus[language].splitlines() if line.strip()]
    text = processor.preprocess_batch(lines, src_lang=FLORES[language], tgt_lang=FLORES[other], is_target=is_target)
    processor.postprocess_batch([], lang=FLORES[language])
    return text

def train_spm(lines, path, symbols):
    # unigram, every character kept (brackets, digits, Devanagari marks are pieces); FLORES tags
    # as user-defined symbols, so a tag is always one piece.
    (path.parent / (path.name + ".txt")).write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(path.parent / (path.name + ".txt")), model_prefix=str(path), model_type="unigram",
        vocab_size=300, hard_vocab_limit=False, character_coverage=1.0, user_defined_symbols=symbols,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2,
    )
    (path.parent / (path.name + ".txt")).unlink()
    processor_ = spm.SentencePieceProcessor(model_file=str(path) + ".model")
    vocab = dict(SPECIALS)
    for i in range(processor_.get_piece_size()):
        vocab.setdefault(processor_.id_to_piece(i), len(vocab))
    return vocab

sides = {  # direction -> (source languages, target languages)
    "en-indic": (["en"], ["hi", "ta"]),
    "indic-en": (["hi", "ta"], ["en"]),
    "indic-indic": (["hi", "ta"], ["hi", "ta"]),
}
report = {}
for direction, (sources, targets) in sides.items():
    folder = out / direction
    work = out / (direction + ".spm")
    work.mkdir(parents=True, exist_ok=True)
    source_lines = [l for s in sources for t in targets if t != s for l in seen(s, t, False)]
    # Target side without IndicProcessor's "< ID1 >" placeholders, so an Indic target vocabulary
    # has no Latin letters at all (a test tells the two models' outputs apart by script).
    target_lines = [l for t in targets for l in seen(t, sources[0], True) if "<" not in l]
    source_vocab = train_spm(source_lines, work / "source", tags)
    target_vocab = train_spm(target_lines, work / "target", [])
    # Same size for both: transformers' beam search sizes its scores by config.vocab_size (the
    # source one) even where the decoder's differs. Fillers are never produced (bias below).
    size = max(len(source_vocab), len(target_vocab))
    for vocab in (source_vocab, target_vocab):
        while len(vocab) < size:
            vocab[f"<unused{len(vocab)}>"] = len(vocab)
    never = list(SPECIALS.values()) + [i for piece, i in target_vocab.items() if piece.startswith("<unused")]
    (work / "vocab.json").write_text(json.dumps(source_vocab, ensure_ascii=False), encoding="utf-8")
    (work / "target_vocab.json").write_text(json.dumps(target_vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = MarianTokenizer(
        source_spm=str(work / "source.model"), target_spm=str(work / "target.model"),
        vocab=str(work / "vocab.json"), target_vocab_file=str(work / "target_vocab.json"),
        separate_vocabs=True, model_max_length=256,
    )
    tokenizer.save_pretrained(folder)

    torch.manual_seed(len(report))
    config = MarianConfig(
        # separate vocabularies: the output layer is not tied to the (source) input embeddings
        vocab_size=len(source_vocab), decoder_vocab_size=len(target_vocab), share_encoder_decoder_embeddings=False,
        tie_word_embeddings=False,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
        pad_token_id=SPECIALS["<pad>"], eos_token_id=SPECIALS["</s>"], decoder_start_token_id=SPECIALS["<pad>"],
        forced_eos_token_id=SPECIALS["</s>"],
    )
    model = MarianMTModel(config).eval()
    with torch.no_grad():  # never end early, never emit specials: every output is target-script text
        model.final_logits_bias[:, never] = -1e4
    model.save_pretrained(folder)

    # Reload the way the service does and check what the tests rely on.
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    assert float(model.final_logits_bias[0, 0]) < -1e3, "final_logits_bias was not saved"
    assert model.get_output_embeddings().out_features == len(target_vocab), "output layer is not the target vocabulary"
    sample = source_lines[0]
    pieces = tokenizer.tokenize(sample)
    tag_pair = sample.split(" ", 2)[:2]
    assert all(tag in pieces for tag in tag_pair), (tag_pair, pieces[:6])
    ids = tokenizer(sample)["input_ids"]
    assert tokenizer.unk_token_id not in ids, (sample, pieces)
    report[direction] = {"source_vocab": len(source_vocab), "target_vocab": len(target_vocab),
                         "parameters": sum(p.numel() for p in model.parameters()), "sample_pieces": pieces[:8]}
    import shutil; shutil.rmtree(work)
print("RESULT " + json.dumps({"directions": report, "seconds": time.monotonic() - started}, ensure_ascii=False))
"""


def flores_tags() -> list[str]:
    from captionbus.core.translation_routes import backend_for_stage

    return sorted(set(backend_for_stage("translation_indictrans2").languages.values()))


def ensure_indictrans2(root: Path) -> dict[str, Path]:
    """direction -> folder of its tiny model (tokenizer + MarianMT weights) under `root`; built
    once inside the indictrans2 env, then reused. Point CAPTIONBUS_INDICTRANS2_EN_INDIC_MODEL,
    ..._INDIC_EN_MODEL and ..._INDIC_INDIC_MODEL (or --option model_en_indic= ...) at them."""
    folder = Path(root) / f"indictrans2-tiny-v{BUILD_VERSION}"
    if all((folder / d / "config.json").exists() for d in DIRECTIONS):
        return {d: folder / d for d in DIRECTIONS}
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    corpus = {"en": ENGLISH, "hi": HINDI, "ta": TAMIL}
    run_in_env(
        "indictrans2", BUILD, str(building), json.dumps(corpus, ensure_ascii=False), json.dumps(flores_tags()),
        timeout=600, extra_env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    publish_build(building, folder, lambda done: all((done / d / "config.json").exists() for d in DIRECTIONS))
    return {d: folder / d for d in DIRECTIONS}
