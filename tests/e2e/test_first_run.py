"""`captionbus run` on a bare install: it builds the stage environment the job needs and fetches
the default model, one `setup:` line per step on stderr, then runs (captionbus/firstrun.py).

The cheapest real case: a workflow of `common`-env stages only (demux -> vad), a fresh envs dir
(uv builds `common` for real, seconds with uv's cache) and a fresh models dir (the Silero wheel
is downloaded from PyPI, hash-checked). whisperx's env takes minutes and gigabytes, so the asr
model's part of the plan is covered by tests/unit/test_firstrun.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.media import speech_video

REGIONS_WORKFLOW = """\
name: regions
description: demux -> vad; the speech regions only
nodes:
  demux:
    inputs:
      media: job.input
    outputs: [audio, probe]
  vad:
    inputs:
      audio: demux.audio
    outputs: [regions]
outputs:
  regions: vad.regions
"""


def test_run_builds_the_missing_env_and_fetches_the_default_model_then_runs(tmp_path):
    config = tmp_path / "config"
    (config / "workflows").mkdir(parents=True)
    (config / "workflows" / "regions.yaml").write_text(REGIONS_WORKFLOW)
    video, _ = speech_video(tmp_path / "talk.mp4", "one two three four five")
    envs, models = tmp_path / "envs", tmp_path / "models"
    env = {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home"), "CAPTIONBUS_CONFIG": str(config),
           "CAPTIONBUS_ENVS": str(envs), "CAPTIONBUS_MODELS": str(models)}
    for name in ("NATS_URL", "CAPTIONBUS_VAD_MODEL"):
        env.pop(name, None)

    def run(out: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "captionbus", "run", str(video), "-w", "regions", "--out", str(tmp_path / out)],
            env=env, capture_output=True, text=True, timeout=1200,
        )

    first = run("out1")
    assert first.returncode == 0, first.stderr[-3000:]
    setup = [line for line in first.stderr.splitlines() if line.startswith("setup:")]
    assert [line.split(" (")[0].split(" ready")[0] for line in setup] == [
        "setup: building environment common",
        "setup: environment common",
        "setup: fetching model silero-vad",
        "setup: model silero-vad",
    ], first.stderr
    assert (envs / "common" / "captionbus-env.json").is_file()
    assert (models / "silero-vad" / "silero_vad.onnx").is_file()
    regions = json.loads(next((tmp_path / "out1").glob("*regions*")).read_text())
    assert regions["backend"] == "silero" and regions["regions"], "the vad ran on the fetched model and found speech"

    again = run("out2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [line for line in again.stderr.splitlines() if line.startswith("setup:")], again.stderr
