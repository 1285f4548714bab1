"""Word times from the decode's own encoder output (whisperx_backend.reused_encoder_alignment), in the
whisperx env with Whisper base on an espeak-ng film with pauses: one encoder pass per window instead
of two, the same words and times as the second pass gave, and the same times whether the film is
decoded whole or chunk by chunk as the chunked workflow cuts it (the windows start at the same
samples), and the fallback to the second pass when the reuse raises (an encoder output of a compute
type numpy cannot view); and, given no language, the language heard in the first window, whose
encoder pass the decode reuses (whisperx_backend.detect_on_regions). The e2e suite (tests/e2e/test_chunked.py) checks the chunked times over
the bus; this runs the stage's own calls in one process, in a minute or two."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests import media as test_media
from tests.integration.test_stages_asr import REPO, loudness_regions, whisperx_python

RUNNER = r"""
import json, logging, sys
import numpy as np
from ctranslate2 import DataType
from captionbus.services.asr import whisperx_backend as wb
from captionbus.services.asr.stage import REGION_MARGIN_S, speech_only
from captionbus.services.audio import merge_regions, read_wav
from captionbus.services.chunk.plan import plan_chunks

class Log:
    def info(self, *a, **k):
        pass

model_dir, film, regions = sys.argv[1], sys.argv[2], [tuple(r) for r in json.loads(sys.argv[3])]
model = wb.load(model_dir, Log(), device="cpu", compute_type="int8", threads=2, batch_size=4)
encoded = []  # windows per encoder call
encode = model.whisper.encode

def counting_encode(features):
    encoded.append(1 if len(features.shape) == 2 else int(features.shape[0]))
    return encode(features)

model.whisper.encode = counting_encode

def decode(audio, spans, language="en"):
    spans = merge_regions(spans, len(audio) / 16000, REGION_MARGIN_S)  # as stage.transcribe does
    found, probability, segments = wb.transcribe(model, speech_only(audio, spans), language, spans, lambda *a: None)
    words = [(w.text, w.start, w.end) for s in segments for w in s.words]
    return words if language else (words, found, probability)

audio = read_wav(film)
out = {}
for reuse in (True, False):
    model.reuse_encoder = reuse
    encoded.clear()
    out["reuse" if reuse else "reencode"] = {"words": decode(audio, regions), "encoded": sum(encoded)}
# The encoder output of a compute type numpy cannot view (bfloat16, as a CPU with AVX512-BF16
# runs `compute_type=bfloat16`; this CPU has none, so the decode's own output is converted):
# np.asarray raises, and every window is encoded again for its word times instead.
warnings = []

class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())

logging.getLogger("captionbus.asr").addHandler(Keep())
reused = wb.reused_encoder_alignment

def bfloat16_alignment(*args):
    align = reused(*args)
    return lambda n, encoder_output, row, tokens: align(n, encoder_output.to(DataType.bfloat16), row, tokens)

wb.reused_encoder_alignment = bfloat16_alignment
model.reuse_encoder = True
encoded.clear()
try:
    out["unviewable"] = {"words": decode(audio, regions), "encoded": sum(encoded), "warnings": warnings}
except Exception as e:  # the other tests still get their decodes
    out["unviewable"] = {"error": f"{type(e).__name__}: {e}"}
wb.reused_encoder_alignment = reused
out["windows"] = len(wb.speech_chunks(merge_regions(regions, len(audio) / 16000, REGION_MARGIN_S)))
model.reuse_encoder = True
plan = plan_chunks(regions, len(audio) / 16000, 20.0, 0.3, 40.0)  # --chunk-s 20, as test_chunked cuts
chunked = []
for chunk in plan.chunks:  # as stage.handle_chunk reads and shifts a chunk
    window = read_wav(film, start_s=chunk.start, end_s=chunk.end)
    words = decode(window, [(r.start - chunk.start, r.end - chunk.start) for r in chunk.regions])
    chunked += [(t, round(a + chunk.start, 3), round(b + chunk.start, 3)) for t, a, b in words]
out["chunked"] = {"words": chunked, "chunks": len(plan.chunks)}
# The language heard in the decode's first window (detect_on_regions), its encoder pass reused by
# the decode; what a `language` request (detect, as stage.detect prepares it) hears in the film
# and in its first chunk.
encoded.clear()
words, language, probability = decode(audio, regions, None)
out["detected"] = {"words": words, "language": language, "probability": probability, "encoded": sum(encoded)}
def alone(audio, spans):
    spans = merge_regions(spans, len(audio) / 16000, REGION_MARGIN_S)
    return list(wb.detect(model, speech_only(audio, spans), spans))
first = plan.chunks[0]
out["detected"]["film"] = alone(audio, regions)
out["detected"]["chunk0"] = alone(read_wav(film, start_s=first.start, end_s=first.end),
                                  [(r.start - first.start, r.end - first.start) for r in first.regions])
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def decodes(tmp_path_factory, stage_envs, whisper_model):
    tmp = tmp_path_factory.mktemp("encoder_reuse")
    film, _ = test_media.speech_film(tmp / "film.wav", repeat=2, video=False)
    # Whole milliseconds, as the vad stage's SpeechRegions and the chunk plan carry them.
    regions = [(round(a, 3), round(b, 3)) for a, b in loudness_regions(film, bridge_s=0.3, pad_s=0.05)]
    model = Path(os.environ.get("CAPTIONBUS_ASR_MODEL") or whisper_model)
    done = subprocess.run([str(whisperx_python()), "-c", RUNNER, str(model), str(film), json.dumps(regions)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_one_encoder_pass_per_window_and_the_same_words_and_times_as_a_second_pass(decodes):
    reuse, reencode, windows = decodes["reuse"], decodes["reencode"], decodes["windows"]
    assert windows >= 2 and len(reuse["words"]) > 80
    assert reuse["encoded"] == windows  # the decode's pass only
    assert reencode["encoded"] == 2 * windows  # the fallback: every window encoded again for its word times
    assert reuse["words"] == reencode["words"]  # text, start and end of every word


def test_an_encoder_output_numpy_cannot_view_falls_back_to_a_second_pass_with_the_same_words(decodes):
    """The reuse raising (reused_encoder_alignment's `except`): the decode goes on, every window is
    encoded again for its word times (time_words), and the words and times are the second pass's;
    the failure is logged once per transcribe call, not once per window."""
    unviewable, reencode, windows = decodes["unviewable"], decodes["reencode"], decodes["windows"]
    assert "error" not in unviewable, unviewable["error"]  # the transcribe call itself raised
    assert unviewable["encoded"] == 2 * windows
    assert unviewable["words"] == reencode["words"]
    assert len(unviewable["warnings"]) == 1, unviewable["warnings"]
    assert "bfloat16" in unviewable["warnings"][0] and "encoding each window again" in unviewable["warnings"][0]


def test_a_chunk_decoded_alone_gives_the_words_and_times_of_the_whole_film(decodes):
    whole, chunked = decodes["reuse"]["words"], decodes["chunked"]["words"]
    assert decodes["chunked"]["chunks"] >= 2  # the film was really cut
    assert [w[0] for w in chunked] == [w[0] for w in whole]
    # Measured 0.0 ms on this film; 1 ms is the rounding of chunk times shifted back to film times.
    shifts = [max(abs(a[1] - b[1]), abs(a[2] - b[2])) for a, b in zip(chunked, whole)]
    assert max(shifts) <= 0.001, shifts


def test_the_language_is_heard_in_the_first_window_whose_encoder_pass_the_decode_reuses(decodes):
    """Given no language, the decode detects on its own first window (whisperx_backend
    detect_on_regions) and encodes no window twice: one encoder pass per window, as with the
    language given, and the same words and times as decoding with `en` given. A `language`
    request (the job of several chunks) hears the same in the whole film and in its first chunk,
    so the chunked and the unchunked decode start from the same language and probability."""
    detected, windows = decodes["detected"], decodes["windows"]
    assert detected["language"] == "en" and detected["probability"] >= 0.9
    assert detected["encoded"] == windows  # no pass of its own for the detection
    assert detected["words"] == decodes["reuse"]["words"]
    assert detected["film"] == [detected["language"], detected["probability"]]
    assert detected["chunk0"] == detected["film"]
