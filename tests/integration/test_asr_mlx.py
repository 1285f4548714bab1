"""The asr stage's MLX backend for real: the mlx env (mlx[cpu] on Linux) loads Whisper base,
converted from the CTranslate2 model to the MLX layout (tests/model_factory/whisper_mlx.py),
through captionbus/services/asr/mlx_backend.py, and transcribes espeak-ng English.

Audio (16 kHz): a short greeting, a pause, then the test sentence in two parts with a pause
between. Two decodes (the MLX CPU backend on Intel MKL, see mlx_backend's docstring: on its bundled
reference BLAS an encoder pass took ~8 s and this module 395 s of a whole-suite run; with MKL,
one thread per process, the module takes ~50 s alone, each decode 27-34 s; each 30 s window costs
an encoder pass to decode and another for word times, plus one for language detection):
1. no language, no regions: language detection says English, the whole text comes back
   (WER), word times are ordered and inside the audio, progress reaches 1;
2. through the asr stage itself (setup picks the mlx backend: the env has no whisperx), language
   "en", a `regions` input (SpeechRegions JSON, as the vad stage writes it) around the second
   sentence part only: neither the greeting nor the first part (outside the region) is
   transcribed, every word lies inside the region, and word times are absolute (the part's
   first word starts where the part was placed, ~8 s in, not near 0: the clip decoded starts
   at the region).
Cheap checks in the first decode's process: an unknown language is BadInput; empty regions give
nothing. The two decodes run in two processes at once (see DIRECT and STAGE_RUN below).

Decode 2 used to have regions around both parts, decoded as two clips (GROUP_MAX_S lowered):
four encoder passes, the slower process, 180 s of setup in the whole-suite run. Both regions in
one clip (two passes) placed "While" 0.2 s early, inside the silenced pause (Whisper's word
timing across a silence), so the part is decoded alone. How regions further apart than one
window become several clips, each shifted back to audio time and its gaps silenced, is
tests/unit/test_ct2_reader.py's (mlx-whisper's decode stubbed).
"""
from __future__ import annotations

import json
import re
import platform
import subprocess
import sys
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jiwer
import numpy as np
import pytest

from tests import media as test_media
from tests.envtools import built_env, run_in_env, test_models_root
from tests.model_factory.whisper_mlx import ensure_whisper_mlx

RATE = 16000
GREETING = "Good morning everyone"
PART_ONE = "The quick brown fox jumps over the lazy dog"
PART_TWO = "while seven friendly sailors watch the golden sunset from the quiet harbour"

# Two processes, run at once, one BLAS thread each (a core each). DIRECT decodes through the
# backend's functions (decode 1 and the cheap checks: three encoder passes with language
# detection), STAGE_RUN through the asr stage (decode 2: one clip, two passes). With two MKL
# threads each (4 threads on 2 cores) the decodes took 43 and 33 s instead of 34 and 28 s.
PRELUDE = r"""
import json, sys, time, wave
import numpy as np
import structlog
from captionbus.services.asr import mlx_backend
from captionbus.services.runtime import BadInput

model_dir, wav_path, regions = sys.argv[1], sys.argv[2], [tuple(r) for r in json.loads(sys.argv[3])]
with wave.open(wav_path, "rb") as w:
    audio = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
out = {"runs": []}
"""

DIRECT = PRELUDE + r"""
started = time.monotonic()
model = mlx_backend.load(model_dir, structlog.get_logger())
out.update({"load_s": time.monotonic() - started, "describe": mlx_backend.describe(model), "blas": model.blas,
            "languages": mlx_backend.supported_languages(model)})

def run(language, regions):
    events = []
    started = time.monotonic()
    lang, probability, segments = mlx_backend.transcribe(model, audio, language, regions,
                                                         lambda f, m: events.append([f, m]))
    out["runs"].append({"language": lang, "probability": probability, "seconds": time.monotonic() - started,
                        "segments": [s.model_dump() for s in segments], "progress": events})

run(None, None)
try:
    mlx_backend.transcribe(model, audio, "xx", None, lambda f, m: None)
    out["bad_language"] = None
except BadInput as bad:
    out["bad_language"] = str(bad)
out["no_regions"] = list(mlx_backend.transcribe(model, audio, "en", [], lambda f, m: None))
print("RESULT " + json.dumps(out))
"""

STAGE_RUN = PRELUDE + r"""
from pathlib import Path
from captionbus.contracts.speech import SpeechRegion, SpeechRegions
from captionbus.services.asr.stage import STAGE
from captionbus.services.runtime import SetupContext
from captionbus.services.runtime.testing import make_fake_context

work = Path(wav_path).parent / "stage"
work.mkdir(exist_ok=True)
regions_file = work / "regions.json"
regions_file.write_text(SpeechRegions(backend="test", duration=len(audio) / 16000,
                                      regions=[SpeechRegion(start=a, end=b) for a, b in regions]).model_dump_json())
resources = STAGE.setup(SetupContext(stage="asr", env="mlx", models_dir=work, log=structlog.get_logger(),
                                     options={"model": model_dir, "threads": 1}))
ctx = make_fake_context(work / "run", "asr", inputs={"audio": Path(wav_path), "regions": regions_file},
                        params={"source_language": "en"}, resources=resources)
started = time.monotonic()
transcript = json.loads(STAGE.handle(ctx.request, ctx)["transcript"].read_text())
out["runs"].append({"language": transcript["language"], "probability": transcript["language_probability"],
                    "seconds": time.monotonic() - started, "segments": transcript["segments"],
                    "progress": ctx.progress_events, "describe_stage": STAGE.describe_model(resources)})
print("RESULT " + json.dumps(out))
"""


def words_of(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def spoken_16k(tmp: Path, name: str, text: str) -> np.ndarray:
    wav, _ = test_media.speech_wav(tmp / f"{name}.wav", text)
    raw = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(wav), "-ac", "1", "-ar", str(RATE), "-f", "s16le", "-"],
        check=True, capture_output=True, timeout=60,
    ).stdout
    return np.frombuffer(raw, dtype="<i2")


@pytest.fixture(scope="module")
def mlx_runs(tmp_path_factory, whisper_model):
    if not test_media.tools_available():
        pytest.skip(test_media.MISSING)
    tmp = tmp_path_factory.mktemp("asr-mlx")
    model_dir = ensure_whisper_mlx(test_models_root(), whisper_model)

    def silence(seconds: float) -> np.ndarray:
        return np.zeros(int(seconds * RATE), dtype="<i2")

    pieces = [silence(0.5), spoken_16k(tmp, "greeting", GREETING), silence(1.5)]
    placed = {}
    for name, text in (("one", PART_ONE), ("two", PART_TWO)):
        start = sum(len(p) for p in pieces) / RATE
        pieces.append(spoken_16k(tmp, name, text))
        placed[name] = (start, sum(len(p) for p in pieces) / RATE)
        pieces.append(silence(1.2))
    audio = np.concatenate(pieces)
    path = tmp / "speech.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
        w.writeframes(audio.tobytes())
    regions = [placed["two"]]  # decode 2's: the second part only
    built_env("mlx")  # once, before the two processes start

    def decode(script: str) -> dict:
        return run_in_env("mlx", script, str(model_dir), str(path), json.dumps(regions), timeout=1200,
                          extra_env={"HF_HUB_OFFLINE": "1", "MKL_NUM_THREADS": "1"})

    with ThreadPoolExecutor(2) as pool:
        direct, staged = pool.map(decode, (DIRECT, STAGE_RUN))
    result = {**direct, "runs": direct["runs"] + staged["runs"], "duration": len(audio) / RATE, "placed": placed}
    for run in result["runs"]:
        print(f"mlx asr: {run['seconds']:.1f} s for {result['duration']:.1f} s of audio "
              f"(regions {'no' if run['probability'] is not None else 'yes'}); load {result['load_s']:.1f} s")
    return result


def all_words(run: dict) -> list[dict]:
    return [w for s in run["segments"] for w in s["words"]]


def text_of(run: dict) -> str:
    return " ".join(s["text"] for s in run["segments"])


def test_model_loads_and_describes_itself(mlx_runs):
    assert mlx_runs["describe"].startswith("whisper-base-mlx") and "(mlx, " in mlx_runs["describe"]
    assert len(mlx_runs["languages"]) == 99 and {"en", "hi", "ta"} <= set(mlx_runs["languages"])
    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        # A tuned BLAS under MLX: on the reference one this module took 395 s of the suite, not ~50.
        assert (mlx_runs["blas"] or "").startswith("mkl: "), mlx_runs["blas"]


def test_detected_english_whole_audio_has_low_wer_and_ordered_word_times(mlx_runs):
    run = mlx_runs["runs"][0]
    assert run["language"] == "en" and run["probability"] > 0.5
    spoken = words_of(f"{GREETING} {PART_ONE} {PART_TWO}")
    error = jiwer.wer(spoken, words_of(text_of(run)))
    assert error <= 0.3, (error, text_of(run))
    words = all_words(run)
    assert len(words) >= 0.8 * len(spoken.split())
    starts = [w["start"] for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w["start"] <= w["end"] <= mlx_runs["duration"] + 0.01 for w in words)
    assert all(s["start"] <= s["end"] for s in run["segments"])
    fractions = [f for f, _ in run["progress"]]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and len(fractions) >= 2


def test_regions_decode_only_speech_inside_them_with_absolute_times(mlx_runs):
    run = mlx_runs["runs"][1]
    two_start, two_end = mlx_runs["placed"]["two"]
    assert run["language"] == "en" and run["probability"] is None
    text = words_of(text_of(run))
    # the greeting and the first part lie outside the region
    assert not {"morning", "quick", "fox", "lazy"} & set(text.split()), text
    error = jiwer.wer(words_of(PART_TWO), text)
    assert error <= 0.3, (error, text)
    words = all_words(run)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)
    for w in words:  # the stage keeps 0.1 s around a region
        assert two_start - 0.15 <= w["start"] <= w["end"] <= two_end + 0.15, w
    # Absolute times: the part's first word starts where the part was placed (espeak-ng starts
    # speaking within a few hundred ms), ~8 s into the audio.
    assert two_start > 7
    assert words_of(words[0]["text"]) == "while" and abs(words[0]["start"] - two_start) < 0.6, words[0]
    assert run["progress"][-1][0] == 1.0 and "(mlx, " in run["describe_stage"]


def test_unknown_language_is_bad_input_and_no_regions_give_no_segments(mlx_runs):
    assert "'xx'" in mlx_runs["bad_language"] and "leave it unset" in mlx_runs["bad_language"]
    assert mlx_runs["no_regions"] == ["en", None, []]
