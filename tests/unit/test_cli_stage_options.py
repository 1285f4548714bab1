"""The real CLI refuses a bad `-o STAGE.KEY=VALUE` before anything starts (no nats-server, no
stage service): one line listing the stage's keys, or the workflow's stages. "Before anything starts"
is asserted by what exists afterwards (no nats-server store, no logs), not by a wall-clock limit,
which flaked at 3-13 s on a loaded 2-core machine.
`captionbus stages` prints every stage's params and service options from their models."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captionbus.client import SubmitError
from captionbus.runner import validate_job

ROOT = Path(__file__).resolve().parents[2]


def captionbus(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    home = tmp_path / "home"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONBUS_") and k != "NATS_URL"}
    environ.update(CAPTIONBUS_HOME=str(home), COLUMNS="200", **(env or {}))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "captionbus", *args], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=environ)
    return done, time.monotonic() - started


@pytest.mark.parametrize("option, says", [
    ("asr.nosuchkey=1", "error: option asr: unknown param 'nosuchkey' (asr params: language, task, model, cache)"),
    ("asr.beam_size=banana", "error: option asr: unknown param 'beam_size' (asr params: language, task, model, cache)"),
    ("asr.language=klingon", "error: option asr: language='klingon': unknown language code 'klingon'"),
    ("subtitle_gen.formats=doc", "error: option subtitle_gen: formats.0='doc': Input should be 'srt', 'vtt', "
                                 "'ass', 'json' or 'txt' (subtitle_gen params: language, profile, formats, "
                                 "speaker_names, name_style, dialogue_dash, cache)"),
    ("nosuchstage.x=1", "error: option nosuchstage: workflow transcribe has no stage or node 'nosuchstage' "
                        "(valid: demux, vad, chunk, language, asr, diarization, transcript_join, subtitle_gen, mux)"),
])
def test_run_refuses_a_bad_option_at_once_with_one_line(tmp_path, option, says):
    done, _ = captionbus(tmp_path, "run", "clip.mp4", "-o", option)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(says) and done.stderr.count("\n") == 1 and done.stdout == ""
    home = tmp_path / "home"
    assert not (home / "nats").exists() and not (home / "logs").exists(), "something was started"


def test_a_bad_service_option_in_the_environment_is_refused_with_the_allowed_values(tmp_path):
    done, _ = captionbus(tmp_path, "run", "clip.mp4", env={"CAPTIONBUS_ASR_BACKEND": "whisper"})
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: asr service options from the environment: backend='whisper': "
                                   "Input should be 'whisperx' or 'mlx'")


def test_good_options_pass_validation_including_the_cache_switch_and_branches():
    assert validate_job("transcribe", None, [], local_stack=False,
                        options={"asr": {"cache": "false", "language": "en"}, "demux": {"audio_track": 0}}) == [
        "demux", "vad", "chunk", "asr", "transcript_join", "subtitle_gen", "mux"]
    stages = validate_job("subtitle", "en", ["hi", "fr"], local_stack=False, options={
        "translation-hi": {"glossary": "a\tb"}, "translation": {"context": False},
        "subtitle_gen_translated-fr": {"profile": "no-such-profile"}})  # profiles are the stage's to check
    assert {"translation_indictrans2", "translation_nllb"} <= set(stages)
    with pytest.raises(SubmitError, match="option translation-ta: 'ta' is not one of this job's target_languages"):
        validate_job("subtitle", "en", ["hi"], local_stack=False, options={"translation-ta": {"context": 2}})


def test_stages_prints_params_and_service_options_from_the_models(tmp_path):
    done, _ = captionbus(tmp_path, "stages", "asr")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "asr params (-o asr.KEY=VALUE)" in out and "asr service options" in out
    for text in ("language", "model", "cache", "CAPTIONBUS_ASR_BACKEND", "whisperx | mlx", "CAPTIONBUS_ASR_BATCH_SIZE",
                 "int (>=1, <=256)", "set by the coordinator"):
        assert text in out, text
    everything, _ = captionbus(tmp_path, "stages")
    for stage in ("demux", "vad_pyannote", "translation_nllb", "subtitle_gen", "mux"):
        assert f"{stage} params" in everything.stdout
    assert "model_<lang>" in everything.stdout and "CAPTIONBUS_PYANNOTE_SEGMENTATION" in everything.stdout
    unknown, _ = captionbus(tmp_path, "stages", "karaoke")
    assert unknown.returncode == 2 and "unknown stage 'karaoke'; stages: alignment, asr, chunk, demux, " in unknown.stderr


def test_a_stage_service_refuses_bad_options_before_touching_the_bus(tmp_path):
    """`python -m captionbus.services serve STAGE --option k=v` (what every launcher runs): an unknown option
    or a bad value exits 2 with one log line; an ambient CAPTIONBUS_OPTION_<KEY> the stage lacks
    (`up` hands them to every stage) is left alone."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONBUS_") and k != "NATS_URL"}
    environ.update(CAPTIONBUS_HOME=str(tmp_path / "home"))  # no `up` there: no bus to find

    def serve(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "captionbus.services", "serve", "vad", *args], capture_output=True,
                              text=True, timeout=30, cwd=ROOT, env={**environ, **env})

    done = serve("--option", "device=cuda")
    assert done.returncode == 2 and "vad service options: unknown option 'device'" in done.stderr
    done = serve(CAPTIONBUS_VAD_THREADS="zero")
    assert done.returncode == 2 and "threads='zero': Input should be a valid integer" in done.stderr
    done = serve(CAPTIONBUS_OPTION_DEVICE="cuda")  # not vad's: ignored; the service goes on to the bus
    assert "bad service options" not in done.stderr and "no NATS server" in done.stderr


def test_serve_checks_the_stage_and_its_environment_first(tmp_path):
    done, _ = captionbus(tmp_path, "serve", "asr", env={"CAPTIONBUS_ASR_DEVICE": "gpu"})
    assert done.returncode == 2
    assert done.stderr.strip() == "error: asr service options from the environment: device='gpu': Input should be 'cpu' or 'cuda'"
    done, _ = captionbus(tmp_path, "serve", "asrr")
    assert done.returncode == 2 and "unknown stage 'asrr'; stages: alignment, asr, chunk, demux, " in done.stderr
