"""A translation model that cannot load fails at once, naming what to set (issue 18: without
NLLB weights and without network, setup spent about a minute per attempt on hub retries).

Runs the real loader (captionbus/services/translation/nllb_stage.load_nllb: transformers, torch,
huggingface_hub) in a built stage env's interpreter. The whisperx env has all three; the nllb
env is not needed: the loader must fail before transformers is asked. Each case uses an empty
Hugging Face cache, so the model id is never found locally."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.envtools import built_env

REPO = Path(__file__).resolve().parents[2]

LOADER = r"""
import json, time
from pathlib import Path
import structlog
from captionbus.services.runtime import SetupContext
from captionbus.services.translation.nllb_stage import load_nllb
from captionbus.contracts.declarations.translation import NllbOptions

started = time.monotonic()
ctx = SetupContext(stage="translation_nllb", env="test", models_dir=Path("/nonexistent"), log=structlog.get_logger(),
                   options=NllbOptions(model="facebook/nllb-200-distilled-600M", device="cpu"))
try:
    load_nllb(ctx)
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps({"error": error, "seconds": time.monotonic() - started}))
"""


def _env_python() -> Path:
    """The whisperx env's interpreter (transformers, torch, huggingface_hub), built when missing:
    a fresh machine runs these tests too, no skip."""
    return built_env("whisperx")


def _load(tmp_path: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "CAPTIONBUS_NLLB"))}
    done = subprocess.run([str(_env_python()), "-c", LOADER], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**clean, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _silent_server():
    """A TCP port that accepts and never answers: what a hub behind a dead route looks like."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def test_offline_and_not_cached_fails_at_once_naming_the_variable(tmp_path):
    result = _load(tmp_path, HF_HUB_OFFLINE="1")
    assert result["error"] is not None and result["seconds"] < 5, result
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in result["error"]
    assert "CAPTIONBUS_NLLB_MODEL" in result["error"]


@pytest.mark.parametrize("hub", ["refused", "silent"])
def test_an_unreachable_hub_fails_within_seconds_naming_hf_hub_offline(tmp_path, hub):
    silent = _silent_server() if hub == "silent" else None
    port = silent.getsockname()[1] if silent else _closed_port()
    try:
        result = _load(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    finally:
        if silent:
            silent.close()
    assert result["error"] is not None, result
    assert result["seconds"] < 15, result  # the 5 s probe, not a minute of retries
    assert f"http://127.0.0.1:{port} does not answer" in result["error"]
    assert "set HF_HUB_OFFLINE=1" in result["error"] and "CAPTIONBUS_NLLB_MODEL" in result["error"]
