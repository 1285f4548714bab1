"""Build and validate the stage environments (venvs made with uv under `settings.envs_dir`).

Layout: `<envs_dir>/<name>/` is a plain venv; `<envs_dir>/<name>/captionbus-env.json` (the
manifest) is written last, only after the new environment imported its check modules, so an
interrupted or failed build shows up as `broken`, never as `ok`.

States:
  ok       built from the current spec, imports work
  stale    imports work but the spec (pins, python, project dependencies) changed since the build
  broken   interpreter there but no manifest (build interrupted) or an import fails
  missing  no interpreter
Every state but ok is fixed by `captionbus envs create <name>` (it rebuilds from scratch).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from captionbus.envs.code import code_dir
from captionbus.envs.paths import create_command, env_dir, env_python
from captionbus.envs.spec import EnvSpec, project_modules
from captionbus.core.envinfo import MANIFEST

OK, STALE, BROKEN, MISSING = "ok", "stale", "broken", "missing"

# Runs inside the target environment's interpreter: stdlib only, one JSON line out.
# stdout is pointed at stderr while importing, so a chatty import cannot corrupt the JSON.
_PROBE = r"""
import importlib, importlib.metadata as md, json, platform, sys
args = json.loads(sys.argv[1])
out, sys.stdout = sys.stdout, sys.stderr
imports = {}
for mod in args["imports"]:
    try:
        importlib.import_module(mod)
        imports[mod] = None
    except BaseException as e:
        imports[mod] = (type(e).__name__ + ": " + str(e))[:500]
versions = {}
for dist in args["versions"]:
    try:
        versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
        versions[dist] = None
sys.stdout = out
print(json.dumps({"python": platform.python_version(), "executable": sys.executable,
                  "prefix": sys.prefix, "imports": imports, "versions": versions}))
"""


class EnvCreateError(RuntimeError):
    """Building an environment failed; the message ends with the tail of uv's output."""


@dataclass
class EnvStatus:
    name: str
    state: str
    interpreter: Path
    optional: bool = False
    stages: tuple[str, ...] = ()
    python_version: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    detail: str = ""
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == OK

    def to_json(self) -> dict:
        return {
            "name": self.name, "state": self.state, "interpreter": str(self.interpreter),
            "optional": self.optional, "stages": list(self.stages),
            "python_version": self.python_version, "versions": self.versions,
            "detail": self.detail, "fix": self.fix,
        }


# ---------------------------------------------------------------- manifest

def manifest_path(name: str) -> Path:
    return env_dir(name) / MANIFEST


def read_manifest(name: str) -> dict | None:
    try:
        data = json.loads(manifest_path(name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_built(name: str) -> bool:
    """Built at all: interpreter and manifest present (no subprocess). Says nothing about
    staleness; `quick_state` does, and `require_envs` refuses anything but ok."""
    return env_python(name).exists() and read_manifest(name) is not None


def quick_state(spec: EnvSpec) -> str:
    """State from the filesystem only (no imports): ok, stale, broken or missing."""
    if not env_python(spec.name).exists():
        return MISSING
    manifest = read_manifest(spec.name)
    if manifest is None:
        return BROKEN
    return OK if manifest.get("spec_hash") == spec.spec_hash() else STALE


# ---------------------------------------------------------------- uv

def uv_binary() -> str:
    """uv from the `uv` wheel (a project dependency), else from PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if not found:
        raise EnvCreateError("uv not found: install it with `pip install uv`")
    return found


@lru_cache(maxsize=1)
def pip_find_links() -> tuple[str, ...]:
    """find-links folders from pip's configuration that exist on this machine.

    uv reads none of pip's config files; machines that keep wheels in a local folder (here
    /opt/wheels) declare it there, so pass it on. URLs and missing folders are left out.
    """
    found: list[str] = []
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    lines = out.splitlines() + [f"env.find-links={os.environ.get('PIP_FIND_LINKS', '')}"]
    for line in lines:
        key, _, value = line.partition("=")
        if not key.strip().endswith("find-links"):
            continue
        for item in value.strip().strip("'\"").split():
            path = item.removeprefix("file://")
            if os.path.isdir(path) and path not in found:
                found.append(path)
    return tuple(found)


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False, soft_wrap=True)


def _stream(cmd: list[str], label: str, console, heartbeat_s: float = 30, echo: bool = True) -> None:
    """Run cmd, echoing its output line by line under a spinner with elapsed time.

    uv prints little while it downloads (torch alone is minutes), so a heartbeat line says it is
    still going when the output is not a terminal. `echo=False` keeps uv's lines to the error
    message (their last 30) and prints only the heartbeats: `run`'s one line per step.
    """
    from rich.markup import escape

    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env={**os.environ, "NO_COLOR": "1"})
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    tail: deque[str] = deque(maxlen=30)
    last_beat = start
    interactive = console is not None and console.is_terminal
    status = console.status(label) if interactive else None
    if status:
        status.start()
    try:
        while True:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                line = ""
            if line is None:
                break
            elapsed = time.monotonic() - start
            if line:
                tail.append(line)
                if echo:
                    _say(console, f"  [dim]{escape(line)}[/]")
            if status:
                status.update(f"{label} [dim]{elapsed:.0f}s[/]")
            elif console is not None and time.monotonic() - last_beat >= heartbeat_s:
                _say(console, f"  {label} still running, {elapsed:.0f}s")
                last_beat = time.monotonic()
    finally:
        if status:
            status.stop()
    rc = proc.wait()
    if rc != 0:
        raise EnvCreateError(f"{' '.join(cmd[:3])} … failed (exit {rc}):\n" + "\n".join(tail))


# ---------------------------------------------------------------- probe

def probe(python: Path, imports: list[str], versions: list[str], timeout: float = 600) -> dict:
    """Import modules and read package versions inside another interpreter (one subprocess)."""
    args = json.dumps({"imports": imports, "versions": versions})
    # The project's packages come from the launcher, as when it starts a stage (envs/code.py).
    env = {**os.environ, "PYTHONPATH": str(code_dir())}
    proc = subprocess.run([str(python), "-c", _PROBE, args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} failed to run (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-800:]}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{python} printed no probe result: {proc.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


def _check_imports(spec: EnvSpec) -> list[str]:
    return [*project_modules(), *spec.check_imports]


def _report_versions(spec: EnvSpec) -> list[str]:
    return list(spec.report_versions)


# ---------------------------------------------------------------- create / check

@contextlib.contextmanager
def _build_lock(name: str, console):
    """One build per env at a time (two shells, parallel CI jobs); the second waits, then
    usually finds the env up to date."""
    lock = env_dir(name).parent / f".{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(console, f"{name}: another build of this env is running; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file's close


def create(spec: EnvSpec, *, force: bool = False, console=None, echo: bool = True) -> EnvStatus:
    """Build `spec`'s environment with uv unless it is already ok (or `force`).

    Rebuilds in place: services running from this env should be stopped first.
    """
    with _build_lock(spec.name, console):
        if not force and quick_state(spec) == OK:
            _say(console, f"[green]{spec.name}[/]: up to date ({env_dir(spec.name)})")
            return check(spec)
        return _build(spec, console, echo)


def _build(spec: EnvSpec, console, echo: bool = True) -> EnvStatus:
    uv = uv_binary()
    target, python = env_dir(spec.name), env_python(spec.name)
    start = time.monotonic()
    _say(console if echo else None, f"[bold]{spec.name}[/]: creating {target} (python {spec.python})")
    # From scratch every time: a stale env may hold packages the new spec dropped.
    _stream([uv, "venv", "--clear", "--python", spec.python, str(target)],
            f"{spec.name}: venv", console, echo=echo)
    cmd = [uv, "pip", "install", "--python", str(python)]
    for link in pip_find_links():
        cmd += ["--find-links", link]
    cmd += spec.install_requirements()
    _stream(cmd, f"{spec.name}: installing {len(spec.requirements)} pinned + the core library's dependencies", console,
            echo=echo)
    try:
        result = probe(python, _check_imports(spec), _report_versions(spec))
    except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
        raise EnvCreateError(f"{spec.name}: installed, but the interpreter check failed: {e}") from e
    failed = {m: err for m, err in result["imports"].items() if err}
    if failed:
        raise EnvCreateError(f"{spec.name}: installed, but imports fail: " +
                             "; ".join(f"{m}: {err}" for m, err in failed.items()))
    manifest = {
        "name": spec.name,
        "spec_hash": spec.spec_hash(),
        "python": spec.python,
        "python_version": result["python"],
        "interpreter": str(python),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - start, 1),
        "requirements": spec.install_requirements(),
        "find_links": list(pip_find_links()),
        "report_versions": _report_versions(spec),
        "versions": result["versions"],
    }
    tmp = manifest_path(spec.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path(spec.name))
    _say(console if echo else None, f"[green]{spec.name}[/]: ready in {manifest['build_seconds']:.0f}s → {python}")
    return EnvStatus(spec.name, OK, python, spec.optional, spec.stages, result["python"],
                     result["versions"])


def check(spec: EnvSpec) -> EnvStatus:
    """Thorough check: run the env's interpreter, import `check_imports`, read versions."""
    python = env_python(spec.name)
    status = EnvStatus(spec.name, MISSING, python, spec.optional, spec.stages,
                       fix=create_command([spec.name]))
    if not python.exists():
        status.detail = f"no interpreter at {python}"
        return status
    try:
        result = probe(python, _check_imports(spec), _report_versions(spec))
    except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
        status.state, status.detail = BROKEN, str(e)
        return status
    status.python_version, status.versions = result["python"], result["versions"]
    failed = {m: err for m, err in result["imports"].items() if err}
    manifest = read_manifest(spec.name)
    if failed:
        status.state = BROKEN
        status.detail = "; ".join(f"import {m}: {err}" for m, err in failed.items())
    elif manifest is None:
        status.state, status.detail = BROKEN, f"no {MANIFEST}: the last build did not finish"
    elif manifest.get("spec_hash") != spec.spec_hash():
        status.state = STALE
        status.detail = (f"built {manifest.get('created', '?')} from an older spec "
                         f"({spec.path or spec.name}, or the project's dependencies changed)")
    else:
        status.state, status.fix = OK, None
    return status
