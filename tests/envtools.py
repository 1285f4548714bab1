"""Run test code inside a stage environment's interpreter.

Stage libraries (torch, transformers, demucs, mlx ...) live only in their env, so tests that
exercise them start that env's python on a small script and read one JSON line back. Envs are
built with uv on first use (the real `captionbus.envs.create`, locked per env) and shared
between tests and sessions (tests/conftest.py points CAPTIONBUS_ENVS at the real one).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "

# Envs being built in the background (prepare_envs), by name: built_env waits for its build.
_preparing: dict[str, Future] = {}


def prepare_envs(names: Iterable[str]) -> list[str]:
    """Start building, one after another (a child process each, waited on by a background
    thread), those of `names` that are missing or stale; returns them. Only a fresh machine has any: there the downloads (whisperx
    alone ~3.9 GB, ~220 s; torch 2.13 once for demucs, indictrans2, nllb and mlx through uv's
    cache) run while the tests that need no env do, instead of inside the first test needing each
    one. `built_env` waits for a build started here; a failed build fails the tests that need the
    env, with its reason, as before."""
    names = [n for n in dict.fromkeys(names) if n not in _preparing]
    if not names:
        return []
    from captionbus.envs import OK, get_spec, quick_state

    missing = [n for n in names if quick_state(get_spec(n)) != OK]
    if missing:
        # Each build is a child process with this moment's environment: tests that point
        # CAPTIONBUS_ENVS elsewhere meanwhile (monkeypatch, e.g. test_envs_build) must not move a
        # build that is under way (paths are read from the environment at each step).
        environ = {**os.environ, "PYTHONPATH": str(REPO)}
        pool = ThreadPoolExecutor(1, thread_name_prefix="env-prepare")
        for name in missing:
            _preparing[name] = pool.submit(_create, name, environ)
        pool.shutdown(wait=False)
    return missing


def stop_preparing_envs() -> None:
    """Drop the background builds that have not started (the one running finishes)."""
    for future in _preparing.values():
        future.cancel()


_CREATE = """
import sys
from captionbus.envs import create, get_spec
status = create(get_spec(sys.argv[1]), echo=False)
sys.exit(0 if status.ok else f"env {sys.argv[1]} is {status.state}: {status.detail}")
"""


def _create(name: str, environ: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-c", _CREATE, name], cwd=REPO, env=environ, capture_output=True, text=True)
    assert done.returncode == 0, f"building env {name} in the background failed:\n{done.stderr[-6000:]}"


# A test module that names an env literally: run_in_env("demucs", ...), built_env("diarization"),
# env_python("nllb").
_ENV_CALL = re.compile(r"""\b(?:run_in_env|built_env|env_python)\(\s*["'](\w+)["']""")


def envs_named_in(source: str) -> list[str]:
    """The envs a test module's source asks for by name (see _ENV_CALL)."""
    return list(dict.fromkeys(_ENV_CALL.findall(source)))


@lru_cache(maxsize=None)
def built_env(name: str) -> Path:
    """The interpreter of env `name`, built (or rebuilt when stale) first.

    An env whose manifest matches its spec is taken as it is, as `captionbus run` takes it
    (captionbus/runner.py: quick_state): the manifest is written only after a build whose import
    probe passed. `create()` on a built env would run that probe again, in the env's interpreter
    (whisperx imports torch and whisperx: 14-22 s on 2 cores, 40 s under load; indictrans2,
    nllb, demucs and pyannote import torch too), once per env and session for nothing a test
    asserts. captionbus/envs' own checks are tested in tests/unit/test_envs.py and
    tests/integration/test_envs_build.py."""
    from captionbus.envs import OK, create, env_python, get_spec, quick_state

    if name in _preparing:
        _preparing[name].result()  # built in the background (prepare_envs); raises its failure
    spec = get_spec(name)
    if quick_state(spec) != OK:
        status = create(spec)
        assert status.ok, f"env {name} is {status.state}: {status.detail}"
    return Path(env_python(name))


def run_in_env(env: str, script: str, *args: str, timeout: float = 900, extra_env: dict[str, str] | None = None) -> dict:
    """Run `script` (python source) with `args` in env `env`; it must print one line
    `RESULT <json>`, which is returned. A non-zero exit fails with the script's stderr."""
    python = built_env(env)
    done = subprocess.run(
        [str(python), "-c", script, *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})},
    )
    assert done.returncode == 0, f"{env} script failed (rc {done.returncode}):\n{done.stderr[-6000:]}"
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    assert lines, f"{env} script printed no RESULT line:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def test_models_root() -> Path:
    """Where locally built test models are kept between runs (they take seconds to minutes)."""
    root = Path(os.environ.get("CAPTIONBUS_MODELS", Path.home() / ".captionbus" / "models")) / "test-built"
    root.mkdir(parents=True, exist_ok=True)
    return root


test_models_root.__test__ = False  # a helper, not a test, when a test module imports it by name


def publish_build(building: Path, folder: Path, complete: Callable[[Path], bool]) -> Path:
    """Give a model built in `building` its final name `folder`, so only a complete build is ever
    found there. Another process that finished the same build first wins; ours is dropped."""
    try:
        building.rename(folder)
    except OSError:
        if not complete(folder):
            raise
        shutil.rmtree(building, ignore_errors=True)
    return folder
