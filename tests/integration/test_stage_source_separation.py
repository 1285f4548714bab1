"""source_separation for real: the demucs env's interpreter loads a tiny random HTDemucs through
`demucs.pretrained.get_model(name, repo=<local repo>)` (tests/model_factory/demucs.py) and runs
the stage's setup() + handle() with a fake context on espeak-ng speech mixed with noise.

Random weights separate nothing, so these tests check what the stage owns: format and length
of the vocals track, time alignment, seamless windows (windowed output agrees with one whole
window, no jumps at the joins), the model only ever seeing one window, memory that does not
grow with the film's length, bad input, progress and metrics.
"""
from __future__ import annotations

import json
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests import media as test_media
from tests.envtools import built_env, run_in_env
from tests.model_factory.demucs import (
    DEMUCS_TEST_MODEL,
    demucs_service_env,
    ensure_demucs,
)

RATE = 16000
LEAD_S, SPEECH_S, TAIL_S = 1.0, 8.0, 1.0  # silence, speech + noise, silence

# Runs inside the demucs env: setup once, then one request per "audio|params" job.
RUNNER = r"""
import json, os, resource, sys, time
from pathlib import Path
import structlog
from captionbus.services.runtime import BadInput, Cancelled, SetupContext
from captionbus.services.source_separation.stage import STAGE, load_model
from captionbus.services.runtime.testing import make_fake_context

work, stand_in, *jobs = sys.argv[1:]
started = time.monotonic()
resources = STAGE.setup(SetupContext(stage="source_separation", env="demucs", models_dir=Path(work),
                                     log=structlog.get_logger(), options={"threads": 2}))
setup_s = time.monotonic() - started
network = resources.model
seen_lengths = []
real_apply = resources.apply

def recording_apply(mix, on_segment=None):
    seen_lengths.append(int(mix.shape[-1]))
    if stand_in == "identity":  # every source = the mix: isolates everything but the network
        return mix[:, None].expand(1, len(network.sources), *mix.shape[1:])
    return real_apply(mix, on_segment)

resources.apply = recording_apply
results = {"setup_s": setup_s, "describe": STAGE.describe_model(resources), "runs": [],
           "model_class": type(network).__name__,
           "inner_classes": [type(m).__name__ for m in getattr(network, "models", [network])],
           "samplerate": resources.samplerate, "channels": resources.channels}
for n, job in enumerate(jobs):
    audio, params = job.split("|", 1)
    ctx = make_fake_context(Path(work) / f"run{n}", "source_separation", inputs={"audio": Path(audio)},
                            params=json.loads(params), resources=resources)
    seen_lengths.clear()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        out = STAGE.handle(ctx.request, ctx)
        results["runs"].append({"vocals": str(out["vocals"]), "metrics": ctx.metrics, "progress": ctx.progress_events,
                                "warnings": ctx.warnings, "max_model_input": max(seen_lengths),
                                "model_calls": len(seen_lengths)})
    except BadInput as bad:
        results["runs"].append({"bad_input": str(bad)})
    results["runs"][-1]["rss_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
if stand_in == "model":  # a job cancelled mid-window stops at the next model segment
    ctx = make_fake_context(Path(work) / "cancelled", "source_separation", inputs={"audio": Path(jobs[0].split("|")[0])},
                            params={"chunk_s": 4, "overlap_s": 1}, resources=resources)
    checks = []
    def cancel_on_second_check():
        checks.append(1)
        if len(checks) == 2:
            raise Cancelled("job cancelled")
    ctx.check_cancelled = cancel_on_second_check
    seen_lengths.clear()
    try:
        STAGE.handle(ctx.request, ctx)
    except Cancelled:
        results["cancelled"] = {"checks": len(checks), "model_calls": len(seen_lengths), "progress": ctx.progress_events}
for name, repo in [("no_such_model", os.environ["CAPTIONBUS_DEMUCS_REPO"]), ("htdemucs", work + "/missing")]:
    try:
        load_model(name, repo)
    except RuntimeError as err:
        results.setdefault("load_errors", []).append(str(err))
print("RESULT " + json.dumps(results))
"""


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-v", "error", *args], check=True, capture_output=True, timeout=120)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getcomptype()) == (RATE, 1, 2, "NONE")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def write_long_wav(path: Path, minutes: int) -> Path:
    """A tone with a syllable-rate envelope plus noise, written a minute at a time."""
    t = np.arange(60 * RATE) / RATE
    rng = np.random.default_rng(1)
    minute = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.03 * rng.standard_normal(t.size)
    block = np.round(minute * 32767).astype("<i2").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
        for _ in range(minutes):
            w.writeframes(block)
    return path


@pytest.fixture(scope="module")
def demucs_repo() -> Path:
    return ensure_demucs()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    if not test_media.tools_available():
        pytest.skip(test_media.MISSING)
    tmp = tmp_path_factory.mktemp("separation-media")
    speech, _ = test_media.speech_wav(tmp / "speech.wav")
    total = LEAD_S + SPEECH_S + TAIL_S
    clip = tmp / "speech_noise.wav"  # what demux hands on: 16 kHz mono s16 WAV
    ffmpeg(
        "-i", str(speech),
        "-f", "lavfi", "-i", f"anoisesrc=color=pink:amplitude=0.08:sample_rate={RATE}:duration={SPEECH_S}:seed=7",
        "-filter_complex",
        f"[0:a]aresample={RATE},apad=whole_dur={SPEECH_S},atrim=0:{SPEECH_S}[s];"
        f"[s][1:a]amix=inputs=2:duration=first:normalize=0,"
        f"adelay={int(LEAD_S * 1000)}:all=1,apad=whole_dur={total},atrim=0:{total}[a]",
        "-map", "[a]", "-ac", "1", "-ar", str(RATE), "-c:a", "pcm_s16le", str(clip),
    )
    short = tmp / "short.wav"  # far shorter than the model's 4 s segment
    ffmpeg("-i", str(clip), "-ss", "2", "-t", "0.3", "-c:a", "pcm_s16le", str(short))
    silence = tmp / "silence.wav"
    ffmpeg("-f", "lavfi", "-i", f"anullsrc=r={RATE}:cl=mono", "-t", "2", "-c:a", "pcm_s16le", str(silence))
    empty = tmp / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
    stereo = tmp / "stereo44k.wav"
    ffmpeg("-i", str(speech), "-ac", "2", "-ar", "44100", "-c:a", "pcm_s16le", str(stereo))
    mp3 = tmp / "audio.wav"  # an mp3 wearing a .wav name
    ffmpeg("-i", str(speech), "-c:a", "libmp3lame", "-f", "mp3", str(mp3))
    truncated = test_media.truncated_copy(clip, tmp / "truncated.wav", keep_fraction=0.4)
    return {"clip": clip, "short": short, "silence": silence, "empty": empty, "stereo": stereo, "mp3": mp3,
            "truncated": truncated}


JOBS = [
    ("clip", {"chunk_s": 4, "overlap_s": 1}),  # 0: three overlapping windows
    ("clip", {"chunk_s": 60, "source_language": "en"}),  # 1: one window, as the coordinator sends params
    ("short", {}),  # 2
    ("silence", {}),  # 3
    ("empty", {}),  # 4
    ("stereo", {}),  # 5
    ("mp3", {}),  # 6
    ("truncated", {}),  # 7
    ("clip", {"chunk_s": 0.2}),  # 8
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demucs_repo, media) -> dict:
    work = tmp_path_factory.mktemp("separation-work")
    jobs = [f"{media[name]}|{json.dumps(params)}" for name, params in JOBS]
    results = run_in_env("demucs", RUNNER, str(work), "model", *jobs, timeout=600,
                         extra_env={**demucs_service_env(demucs_repo), "HF_HUB_OFFLINE": "1"})
    print("setup", results["setup_s"], "describe", results["describe"])
    for (name, params), run in zip(JOBS, results["runs"]):
        print(name, params, run.get("metrics") or run.get("bad_input"))
    return results


def test_model_is_loaded_from_the_local_repo_by_name(runs, demucs_repo):
    assert runs["model_class"] == "BagOfModels" and runs["inner_classes"] == ["HTDemucs"]  # the yaml bag
    assert DEMUCS_TEST_MODEL in runs["describe"] and str(demucs_repo) in runs["describe"]
    assert (runs["samplerate"], runs["channels"]) == (44100, 2)  # so resampling and upmixing really run


def test_a_model_the_repo_lacks_fails_setup_with_a_reason(runs):
    unknown, missing_repo = runs["load_errors"]
    assert "'no_such_model' not found in" in unknown and "CAPTIONBUS_DEMUCS_MODEL" in unknown
    assert "is not a folder" in missing_repo


def test_vocals_track_has_the_input_format_and_length(runs, media):
    source = read_wav(media["clip"])
    for run in runs["runs"][:2]:
        vocals = read_wav(Path(run["vocals"]))
        assert vocals.size == source.size == int((LEAD_S + SPEECH_S + TAIL_S) * RATE)
        assert Path(run["vocals"]).name == "vocals.wav"
        assert 0 < np.abs(vocals).max() < 0.99  # sound, and no saturated garbage


def test_windows_join_seamlessly(runs):
    """Three 4 s windows overlapping by 1 s against one window over the whole clip: the same
    signal (the model sees less context near the joins, so not bit-identical) and no jump at
    any join bigger than the largest step anywhere in the one-window output."""
    windowed = read_wav(Path(runs["runs"][0]["vocals"]))
    whole = read_wav(Path(runs["runs"][1]["vocals"]))
    correlation = float(np.corrcoef(windowed, whole)[0, 1])
    largest_step = float(np.abs(np.diff(whole)).max())
    joins = [3 * RATE, 4 * RATE, 6 * RATE, 7 * RATE]  # overlap starts and ends for 4 s / 1 s on 10 s
    steps_at_joins = [float(np.abs(np.diff(windowed[j - 160: j + 160])).max()) for j in joins]
    print(f"correlation {correlation:.4f}; steps at joins {steps_at_joins}; largest step {largest_step}")
    assert correlation > 0.95
    assert max(steps_at_joins) <= 1.25 * largest_step


def test_model_sees_one_window_at_a_time(runs):
    windowed, whole = runs["runs"][0], runs["runs"][1]
    assert windowed["metrics"]["windows"] == 3 and whole["metrics"]["windows"] == 1
    assert windowed["model_calls"] == 3
    assert windowed["max_model_input"] <= int(np.ceil(4 * 44100)) + 1
    assert whole["max_model_input"] == int(np.ceil(10 * 44100))


def test_progress_and_metrics(runs):
    run = runs["runs"][0]
    fractions = [f for f, _ in run["progress"]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 4
    metrics = run["metrics"]
    assert metrics["audio_duration_s"] == LEAD_S + SPEECH_S + TAIL_S
    assert metrics["separation_s"] > 0 and metrics["realtime_factor"] == pytest.approx(metrics["separation_s"] / 10)
    print("realtime factor (tiny model, 3 windows):", round(metrics["realtime_factor"], 3),
          "one window:", round(runs["runs"][1]["metrics"]["realtime_factor"], 3))


def test_cancel_stops_within_a_window(runs):
    """apply_model's segment callbacks check for cancellation: the first 4 s window has two
    model segments and the job is cancelled at the second, so the stage stops in window 1."""
    cancelled = runs["cancelled"]
    assert cancelled["checks"] == 2 and cancelled["model_calls"] == 1
    assert all(fraction < 1 / 3 for fraction, _ in cancelled["progress"])


def test_audio_shorter_than_a_model_segment_is_padded(runs, media):
    run = runs["runs"][2]
    assert read_wav(Path(run["vocals"])).size == read_wav(media["short"]).size == int(0.3 * RATE)


def test_silence_gives_silence_and_a_warning(runs):
    run = runs["runs"][3]
    assert np.abs(read_wav(Path(run["vocals"]))).max() <= 1 / 32768
    assert run["warnings"] and "silent" in run["warnings"][0]


@pytest.mark.parametrize(
    "index, message",
    [(4, "no samples"), (5, "got 44100 Hz, 2 channel(s)"), (6, "not a readable PCM WAV"), (7, "cut short"),
     (8, "bad source_separation params: chunk_s=0.2: Input should be greater than or equal to 1")],
    ids=["zero-length", "stereo-44k", "mp3-named-wav", "truncated", "tiny-chunk"],
)
def test_bad_input_fails_with_a_reason(runs, index, message):
    assert message in runs["runs"][index]["bad_input"]


@pytest.fixture(scope="module")
def stand_in_runs(tmp_path_factory, demucs_repo) -> dict[int, dict]:
    """2 and 20 minutes through the real stage (reading, normalising, resampling to 44.1 kHz
    stereo, downmixing, resampling back, cross-fading, writing) with the network swapped for
    a stand-in that returns its input: on 20 minutes the network would take minutes here, and
    it only ever sees one window anyway (test_model_sees_one_window_at_a_time). One process
    per length, so each peak RSS is its own; the two run at once (nothing here is timed, and a
    process's peak RSS is its own either way), the 2-minute one while the 20-minute one works."""
    tmp = tmp_path_factory.mktemp("separation-long")
    sources = {minutes: write_long_wav(tmp / f"long{minutes}.wav", minutes) for minutes in (2, 20)}

    def separate(minutes: int) -> dict:
        result = run_in_env("demucs", RUNNER, str(tmp / f"work{minutes}"), "identity", f"{sources[minutes]}|{{}}",
                            timeout=600, extra_env={**demucs_service_env(demucs_repo), "HF_HUB_OFFLINE": "1"})
        return {**result["runs"][0], "source": str(sources[minutes])}

    built_env("demucs")  # once, before the two processes start
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(sources, pool.map(separate, sources)))
    for minutes, run in runs.items():
        print(f"{minutes} min: RSS growth {run['rss_growth_kb'] / 1024:.0f} MB, {run['metrics']['separation_s']:.1f} s, "
              f"{run['metrics']['windows']:.0f} windows")
    return runs


def test_audio_comes_back_in_place_through_the_whole_chain(stand_in_runs):
    """With a network that changes nothing, the vocals track is the input: same length and
    level, and not shifted by a single sample, across all the windows' joins."""
    run = stand_in_runs[2]
    heard, sent = read_wav(Path(run["vocals"])), read_wav(Path(run["source"]))
    assert run["metrics"]["windows"] == 3 and heard.size == sent.size
    middle = slice(RATE, heard.size - RATE)
    lags = range(-8, 9)
    correlations = [float(np.corrcoef(np.roll(heard, lag)[middle], sent[middle])[0, 1]) for lag in lags]
    assert lags[int(np.argmax(correlations))] == 0 and correlations[8] > 0.995, correlations
    assert float(np.sqrt(np.mean(heard**2)) / np.sqrt(np.mean(sent**2))) == pytest.approx(1, abs=0.02)


def test_memory_does_not_grow_with_length(stand_in_runs):
    """Peak RSS grows the same for 2 and 20 minutes; holding 20 minutes at 44.1 kHz stereo
    float32 alone would take 420 MB."""
    growth = {minutes: run["rss_growth_kb"] / 1024 for minutes, run in stand_in_runs.items()}
    assert stand_in_runs[20]["metrics"]["windows"] == 21
    assert all(run["max_model_input"] <= 60 * 44100 + 1 for run in stand_in_runs.values())
    assert growth[20] < growth[2] + 40 and growth[20] < 200, growth
