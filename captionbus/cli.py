"""`captionbus`: one command for one machine (`run`), and the fleet parts one by one."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
from datetime import UTC, datetime, timezone
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from captionbus import exitcodes
from contracts.declarations.chunk import DEFAULT_CHUNK_TARGET_S
from core.settings import load

console = Console(stderr=True)
stdout = Console()


class UserError(click.ClickException):
    """An error a person can act on: one line, no traceback; exit code from `captionbus.exitcodes`
    (default 2: refused before anything started)."""

    exit_code = exitcodes.USAGE

    def __init__(self, message: str, exit_code: int = exitcodes.USAGE):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        # soft_wrap: a command to copy must not be broken across lines
        console.print(f"[bold red]error:[/] {self.message}", highlight=False, soft_wrap=True)


def _friendly_errors(fn):
    """Known failures become one line; anything else says where the details went."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from captionbus.client import SubmitError
        from captionbus.runner import JobFailedError
        from captionbus.stack import ServiceStartError
        from core.bus import BusError

        from core.artifacts import ArtifactStoreFull

        known: tuple[type[BaseException], ...] = (BusError, SubmitError, ServiceStartError, JobFailedError, ValueError,
                                                  ArtifactStoreFull)
        with contextlib.suppress(ImportError):
            from captionbus.envs import EnvsMissing

            known += (EnvsMissing,)
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            console.print("interrupted")
            sys.exit(exitcodes.INTERRUPTED)
        except known as e:
            if hasattr(e, "envs"):  # EnvsMissing: its message is the exact fixing command
                states = getattr(e, "states", {}) or {}
                which = ", ".join(f"{env} ({states.get(env, 'missing')})" for env in e.envs)
                raise UserError(f"stage environments not ready: {which}; run: {e}") from None
            if isinstance(e, BusError):
                code = exitcodes.BUS
            elif isinstance(e, (JobFailedError, ServiceStartError, ArtifactStoreFull)):
                code = exitcodes.JOB_FAILED
            else:
                code = exitcodes.USAGE
            raise UserError(str(e), exit_code=code) from None
        except Exception as e:
            if os.environ.get("CAPTIONBUS_DEBUG"):
                raise
            raise UserError(f"internal error: {type(e).__name__}: {e} (set CAPTIONBUS_DEBUG=1 for the traceback)",
                            exit_code=exitcodes.JOB_FAILED) from None

    return wrapper


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="captionbus")
def main(verbose: int) -> None:
    """Films and videos to subtitles, as stage services on NATS."""
    from core.logging import configure_logging

    # Interactive commands speak through their own output; job failures arrive as one line.
    # Long-running parts (up, coordinator) log at INFO: they are services.
    level = {0: "ERROR", 1: "INFO"}.get(verbose, "DEBUG")
    configure_logging(level=level)


class _LogConsole:
    """What `up` says to a person, as JSON log lines when its output is not a terminal: one
    format per stream, so a log shipper never meets a human sentence between JSON objects."""

    def print(self, message="", *args, **kwargs) -> None:
        import structlog
        from rich.text import Text

        plain = Text.from_markup(str(message)).plain
        level = "warning" if plain.startswith(("warning", "error")) else "info"
        getattr(structlog.get_logger("captionbus.up"), level)(plain)


def _service_logging() -> None:
    from core.logging import configure_logging

    if click.get_current_context().find_root().params.get("verbose", 0) == 0:
        configure_logging(level="INFO")


def _terminate_like_ctrl_c() -> None:
    """SIGTERM (a `kill`, a CI timeout) cleans up like Ctrl-C: services and server stop."""

    def _raise(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def _split_languages(value: str | None) -> list[str]:
    return [code.strip() for code in (value or "").split(",") if code.strip()]


def _parse_options(pairs: tuple[str, ...]) -> dict:
    """`-o asr.model=/models/x -o subtitle_gen.profile=fast` → {"asr": {"model": ...}, ...}."""
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"option {pair!r} is not KEY=VALUE (e.g. asr.model=base)")
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
        target = options
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):  # e.g. --vad silero -o vad.threshold=0.6
                raise UserError(f"option {part} is given both as a value and as {part}.KEY=VALUE")
        if isinstance(target.get(leaf), dict):
            raise UserError(f"option {key} is given both as a value and as {key}.KEY=VALUE")
        target[leaf] = value
    return options


job_options = [
    click.option("-w", "--workflow", default="transcribe", show_default=True,
                 help="Workflow graph in config/workflows: transcribe, translate, subtitle, chunked."),
    click.option("-s", "--source-language", "source", default=None,
                 help="Spoken language (ISO 639-1); default: detect (translate/subtitle need it)."),
    click.option("-t", "--target-languages", "targets", default=None, help="Comma-separated languages to translate into."),
    click.option("-o", "--option", "options", multiple=True, help="Stage option STAGE.KEY=VALUE (repeatable)."),
    click.option("--separate-sources", is_flag=True, default=False,
                 help="Separate vocals from music/effects (htdemucs) before VAD and ASR."),
    click.option("--vad", "vad", type=click.Choice(["silero", "pyannote"]), default=None,
                 help="Voice activity detection backend (default silero)."),
    click.option("--glossary", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
                 help="TSV of terms to keep or map in translation (source<TAB>target)."),
    click.option("--chunk-s", "chunk_s", type=click.FloatRange(min=0), default=None,
                 help="Workflows with a chunk stage (-w chunked): target chunk length in seconds, one asr "
                      f"request per chunk (0: the whole film in one; default {DEFAULT_CHUNK_TARGET_S:g}, longer "
                      f"for a film too long for one job's chunks)."),
]


def _with_job_options(fn):
    """The shared job flags; the convenience ones become `-o` options the graph and stages read."""

    @functools.wraps(fn)
    def wrapper(*args, separate_sources: bool, vad: str | None, glossary: Path | None, chunk_s: float | None,
                options=(), **kwargs):
        extra = []
        if chunk_s is not None:
            extra.append(f"chunk.target_s={json.dumps(chunk_s)}")
        if separate_sources:
            extra.append("separate_sources=true")
        if vad:
            extra.append(f"vad={json.dumps(vad)}")
        if glossary is not None:
            # Inline text, not a path: the translation service may run on another host.
            extra.append(f"translation.glossary={json.dumps(glossary.read_text(encoding='utf-8'))}")
        return fn(*args, options=tuple(options) + tuple(extra), **kwargs)

    for option in reversed(job_options):
        wrapper = option(wrapper)
    return wrapper


@main.command(short_help="Run a job on this machine; prints the output paths.")
@click.argument("media", type=click.Path(path_type=Path))
@_with_job_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Output folder (default: ./<name>.subs).")
@click.option("--attach", is_flag=True, help="Use the coordinator and services already on the bus instead of starting them.")
@click.option("--replicas", type=click.IntRange(1, 64), default=1, show_default=True,
              help="asr workers to start (a chunked film's chunks go to all of them).")
@click.option("--no-setup", is_flag=True,
              help="Build nothing: refuse (exit 2) when a stage environment is not built, and fetch no default model.")
@_friendly_errors
def run(media: Path, workflow: str, source: str | None, targets: str | None, options, out_dir: Path | None,
        attach: bool, replicas: int, no_setup: bool) -> None:
    """Run a job on this machine: bus, coordinator and services included; prints output paths.
    On first use it builds the stage environments the job needs and fetches the default models."""
    from captionbus.client import check_input_file
    from captionbus.runner import run_job, validate_job
    from captionbus.stack import server_for_run

    _terminate_like_ctrl_c()
    settings = load()
    # Before the server starts: a bad option (-o asr.nosuchkey=1) costs nothing to refuse.
    stages = validate_job(workflow, source, _split_languages(targets), local_stack=not attach,
                          options=_parse_options(options), require_built=no_setup)
    check_input_file(media)
    out_dir = check_out_dir(out_dir or Path(f"{media.stem}.subs"))
    if not attach and not no_setup:
        _first_run_setup(stages)
    with server_for_run(settings) as url:
        outputs = asyncio.run(run_job(
            settings, url, media,
            workflow=workflow, source_language=source, target_languages=_split_languages(targets),
            options=_parse_options(options), out_dir=out_dir, start_stack=not attach, console=console,
            replicas={"asr": replicas},
        ))
    for path in outputs.values():
        click.echo(str(path))
    _exit_if_partial(outputs)


def _first_run_setup(stages: list[str]) -> None:
    """Build what this host lacks for the job (captionbus/firstrun.py); a failed step is one line."""
    from captionbus.firstrun import SetupError, prepare

    try:
        prepare(stages, console)
    except SetupError as e:
        raise UserError(str(e), exit_code=exitcodes.JOB_FAILED) from None


def check_out_dir(path: Path) -> Path:
    """The output folder, made now and proved writable: a job must not run for minutes and then
    find it cannot write its results (`--out /proc/x`, `--out some-file`)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot create it ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out {path}: not writable")
    return path


def _exit_if_partial(outputs) -> None:
    """Exit 3 when the job completed without some target languages (their reasons are printed)."""
    failed = getattr(outputs, "failed_branches", None)
    if failed:
        console.print(f"job completed without: {', '.join(sorted(failed))}", highlight=False)
        sys.exit(exitcodes.PARTIAL)


_insecure_option = click.option(
    "--insecure", is_flag=True,
    help="Allow a non-loopback NATS_URL without credentials and TLS (CAPTIONBUS_INSECURE=1).")


def _require_secure(url: str, settings, insecure: bool) -> None:
    from core.bus import require_secure

    require_secure(url, settings, insecure)


@main.command(short_help="Run the local stack until Ctrl-C.")
@click.option("-w", "--workflow", "workflows", multiple=True, metavar="WORKFLOW",
              help="Serve the stages this workflow needs (repeatable; default: transcribe).")
@click.option("--stages", default=None,
              help="Comma-separated stages to serve as well (alone: only these).")
@click.option("--log-format", type=click.Choice(["auto", "human", "json"]), default="auto", show_default=True,
              help="human lines, or one JSON object per line; auto: human on a terminal, JSON otherwise.")
@click.option("--dashboard", "dashboard", default="127.0.0.1:8765", show_default=True,
              help="HOST:PORT of the web dashboard (off loopback it needs CAPTIONBUS_DASHBOARD_TOKEN[_FILE]).")
@click.option("--no-dashboard", is_flag=True, help="Do not start the dashboard.")
@_insecure_option
@_friendly_errors
def up(workflows: tuple[str, ...], stages: str | None, log_format: str, dashboard: str, no_dashboard: bool,
       insecure: bool) -> None:
    """Run the local stack until Ctrl-C: NATS, coordinator, services, the dashboard.

    Only the stages the workflows need are started (each one a process with its model loaded:
    all ten are about 5 GB), among those whose environment is built."""
    from captionbus.envs import workflow_stages
    from captionbus.runner import env_ready, run_stack
    from captionbus.stack import server_for_up
    from contracts.ids import validate_token
    from contracts.stage_specs import stage_spec
    from core.logging import configure_logging

    extra = _split_languages(stages)
    for stage in extra:
        stage_spec(stage)  # an unknown stage is refused before NATS starts
    wanted = list(extra)
    for workflow in workflows or (() if extra else ("transcribe",)):
        try:
            validate_token(workflow, "workflow name")
            needed = workflow_stages(workflow)
        except ValueError as e:
            raise UserError(str(e)) from None
        wanted += [s for s in needed if s not in wanted and env_ready(s)]
    as_json = not sys.stderr.isatty() if log_format == "auto" else log_format == "json"
    verbose = click.get_current_context().find_root().params.get("verbose", 0)
    configure_logging(level="DEBUG" if verbose > 1 else "INFO", json=as_json)
    say = _LogConsole() if as_json else console
    settings = load()
    if settings.nats_url:
        _require_secure(settings.nats_url, settings, insecure)
    with server_for_up(settings) as url:
        say.print(f"captionbus up: NATS at {url}; data in {settings.home}; "
                      f"service logs in {settings.home / 'logs'} (captionbus logs STAGE)", highlight=False,
                      soft_wrap=True)
        asyncio.run(run_stack(settings, url, wanted, console=say,
                              dashboard=None if no_dashboard else dashboard))


@main.command(short_help="Run the coordinator (NATS_URL or the local up).")
@_insecure_option
@_friendly_errors
def coordinator(insecure: bool) -> None:
    """Run the coordinator against NATS_URL or the local `up` server."""
    from captionbus.runner import run_coordinator_forever
    from core.bus import resolve_url

    _service_logging()
    settings = load()
    url = resolve_url(settings)
    _require_secure(url, settings, insecure)
    asyncio.run(run_coordinator_forever(url))


@main.command(short_help="Serve the operators' web dashboard.")
@click.option("--listen", default="127.0.0.1:8765", show_default=True,
              help="HOST:PORT. Off loopback it needs CAPTIONBUS_DASHBOARD_TOKEN or CAPTIONBUS_DASHBOARD_TOKEN_FILE.")
@click.option("--downloads", is_flag=True,
              help="Link job outputs for download, if this host's credentials may read artifacts "
                   "(the dashboard_downloads NATS role, or a readable local artifact root). Off by default.")
@_friendly_errors
def dashboard(listen: str, downloads: bool) -> None:
    """Serve the operators' web dashboard, /metrics, /healthz and /readyz (read-only)."""
    from captionbus.dashboard.auth import token_from_env
    from captionbus.dashboard.serve import serve
    from core.bus import resolve_url

    _service_logging()
    token = token_from_env()
    settings = load()
    url = resolve_url(settings)
    click.echo(f"dashboard on http://{listen}/", err=True)
    asyncio.run(serve(url, listen, token, downloads=downloads, settings=settings))


@main.command()
@click.argument("stage")
@click.option("--replicas", default=1, show_default=True, help="Processes to start (they share one queue).")
@click.option("--devices", default=None,
              help="Comma-separated CUDA device indexes, one per replica in turn (0,1: replica 0 on GPU 0, 1 on GPU 1).")
@_insecure_option
@_friendly_errors
def serve(stage: str, replicas: int, devices: str | None, insecure: bool) -> None:
    """Serve one stage with its environment's interpreter."""
    from captionbus.envs import env_for_stage, interpreter_for_stage
    from captionbus.runner import check_service_options
    from captionbus.stack import replica_threads_env, service_env, start_service, stop_services
    from contracts.stage_specs import stage_spec
    from core.bus import resolve_url

    stage_spec(stage)  # an unknown stage: one line listing the known ones
    check_service_options([stage])  # CAPTIONBUS_<STAGE>_* typos: refused here, not in the service log
    settings = load()
    url = resolve_url(settings)
    _require_secure(url, settings, insecure)
    env, interpreter = env_for_stage(stage), interpreter_for_stage(stage)
    pinned = _device_envs(devices, replicas)
    if devices is None:  # CPU replicas share this host's cores instead of each taking all of them
        pinned = [replica_threads_env(stage, replicas) or None for _ in range(replicas)]
    if replicas == 1:
        # Become the service: its logs on this terminal, signals straight to it.
        os.execve(str(interpreter), [str(interpreter), "-m", "services", "serve", stage],
                  service_env(settings, env, url, pinned[0]))
    # Blocked first, or the default handlers would kill us before sigwait returns.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    procs = [start_service(stage, env, interpreter, url, settings, replica=i, extra_env=pinned[i])
             for i in range(replicas)]
    console.print(f"{replicas} replicas of {stage} (env {env}); logs in {settings.home / 'logs'}")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stop_services(procs)


def _device_envs(devices: str | None, replicas: int) -> list[dict[str, str] | None]:
    """Per replica, the environment that pins it to one CUDA device (CUDA_VISIBLE_DEVICES), the
    devices taken in turn; None for each when no devices are given."""
    if devices is None:
        return [None] * replicas
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids or not all(d.isdigit() for d in ids):
        raise UserError(f"--devices {devices!r}: give CUDA device indexes separated by commas, e.g. 0,1")
    return [{"CUDA_VISIBLE_DEVICES": ids[i % len(ids)]} for i in range(replicas)]


def _on_bus(name: str, action):
    """`await action(nc, js)` against the running bus (NATS_URL or the local `up`), then disconnect."""
    from core.bus import connect, require_provisioned, resolve_url

    async def go():
        nc = await connect(resolve_url(load()), name)
        try:
            await require_provisioned(nc.jetstream())
            return await action(nc, nc.jetstream())
        finally:
            with contextlib.suppress(Exception):  # a server that went away must not hold us here
                await asyncio.wait_for(nc.close(), 5)

    return asyncio.run(go())


@main.command(short_help="Submit a job to a running stack.")
@click.argument("media", type=click.Path(path_type=Path))
@_with_job_options
@click.option("--wait", is_flag=True, help="Follow the job and fetch its outputs.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder with --wait (default: ./<name>.subs).")
@click.option("--json", "as_json", is_flag=True, help='Print {"job_id": ..., "workflow": ...} (without --wait).')
@_friendly_errors
def submit(media: Path, workflow: str, source: str | None, targets: str | None, options, wait: bool,
           out_dir: Path | None, as_json: bool) -> None:
    """Submit a job to a running stack; prints the job id (`captionbus fetch JOB` gets its outputs)."""
    from captionbus.client import check_input_file
    from captionbus.runner import run_job
    from core.bus import resolve_url

    settings = load()
    check_input_file(media)
    if wait:
        out_dir = check_out_dir(out_dir or Path(f"{media.stem}.subs"))
        outputs = asyncio.run(run_job(
            settings, resolve_url(settings), media, workflow=workflow, source_language=source,
            target_languages=_split_languages(targets), options=_parse_options(options),
            out_dir=out_dir, start_stack=False, console=console,
        ))
        for path in outputs.values():
            click.echo(str(path))
        _exit_if_partial(outputs)
        return

    from captionbus.client import submit as submit_job
    from captionbus.runner import validate_job, warn_about_unserved_stages
    from core.artifacts import ArtifactStore

    stages = validate_job(workflow, source, _split_languages(targets), local_stack=False,
                          options=_parse_options(options))

    async def go(nc, js):
        await warn_about_unserved_stages(nc, stages, console)
        return await submit_job(
            js, ArtifactStore(settings, js), media, workflow=workflow, source_language=source,
            target_languages=_split_languages(targets), options=_parse_options(options),
        )

    spec = _on_bus("captionbus-submit", go)
    if as_json:
        click.echo(json.dumps({"job_id": spec.job_id, "workflow": spec.workflow, "input": spec.input.name,
                               "source_language": spec.source_language, "target_languages": spec.target_languages}))
    else:
        click.echo(spec.job_id)


@main.command(short_help="Delete what the retention settings no longer keep.")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
@click.option("--local-only", is_flag=True, help="Only this host's local artifact root and file stage cache.")
@_friendly_errors
def gc(dry_run: bool, as_json: bool, local_only: bool) -> None:
    """Delete artifacts, stage cache entries and job history past their retention
    (CAPTIONBUS_RETENTION_*, CAPTIONBUS_ARTIFACTS_MAX_BYTES); never what an unfinished job needs.
    Needs a NATS user allowed to purge (`gc` in deploy/nats/roles.conf) unless --dry-run or
    --local-only."""
    from core.bus import connect, require_provisioned, resolve_url, running_embedded_url
    from core.gc import collect

    settings = load()

    async def go():
        url = settings.nats_url or running_embedded_url(settings)
        if url is None:  # no bus: this host's files, by their age alone
            return await collect(settings, None, dry_run=dry_run, bus=False)
        nc = await connect(resolve_url(settings), "captionbus-gc")
        try:
            await require_provisioned(nc.jetstream())
            return await collect(settings, nc.jetstream(), dry_run=dry_run, bus=not local_only)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)

    report = asyncio.run(go())
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        click.echo(report.summary())


@main.command(short_help="Download a finished job's outputs.")
@click.argument("job_id")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: ./<input name>.subs).")
@_friendly_errors
def fetch(job_id: str, out_dir: Path | None) -> None:
    """Download a finished job's outputs (as `run` names them); prints each file."""
    from captionbus.client import fetch_outputs, job_state
    from core.artifacts import ArtifactStore

    settings = load()

    async def go(nc, js):
        state = await job_state(js, job_id)
        if state is None:
            raise UserError(f"no job {job_id!r}")
        if not state.outputs:
            raise UserError(f"job {job_id} is {state.status.value} and has no outputs yet"
                            + (f": {state.error}" if state.error else ""), exit_code=1)
        stem = Path(state.spec.input.name).stem or job_id
        return await fetch_outputs(ArtifactStore(settings, js), state.outputs, out_dir or Path(f"{stem}.subs"), stem)

    for path in _on_bus("captionbus-fetch", go).values():
        click.echo(str(path))


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="The job's state as one JSON object (JobState).")
@_friendly_errors
def status(job_id: str, as_json: bool) -> None:
    """One job's state, stage by stage. Exit 0 running or completed, 1 failed or cancelled,
    3 completed without some languages."""
    from captionbus.client import job_state

    state = _on_bus("captionbus-status", lambda nc, js: job_state(js, job_id))
    if state is None:
        raise UserError(f"no job {job_id!r}")
    if as_json:
        stdout.print_json(state.model_dump_json())
    else:
        title = f"{job_id}  {state.spec.workflow}  [bold]{state.status.value}[/]"
        table = Table(title=title)
        for column in ("node", "stage", "status", "attempt", "worker", "error"):
            table.add_column(column)
        for node_id, node in state.nodes.items():
            table.add_row(node_id, node.stage, node.status.value, str(node.attempt),
                          node.worker.get("env", ""), node.error or "")
        stdout.print(table)
        if state.error:
            stdout.print(f"reason: {state.error}", highlight=False)
        for branch, reason in sorted(state.failed_branches.items()):
            stdout.print(f"branch {branch} failed: {reason}", highlight=False)
    sys.exit(job_exit_code(state))


def job_exit_code(state) -> int:
    """A job's state as an exit code: still running or completed 0, failed/cancelled 1, completed
    without some languages 3."""
    value = state.status.value
    if value in ("failed", "cancelled"):
        return exitcodes.JOB_FAILED
    if value == "completed" and state.failed_branches:
        return exitcodes.PARTIAL
    return exitcodes.OK


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JobState JSON object per line.")
@click.option("--wide", is_flag=True, help="Every column in full (input name, reason), wider than 80.")
@_friendly_errors
def jobs(as_json: bool, wide: bool) -> None:
    """All jobs the bus knows, oldest first."""
    from captionbus.client import list_jobs

    states = _on_bus("captionbus-jobs", lambda nc, js: list_jobs(js))
    if as_json:
        for state in states:
            click.echo(state.model_dump_json())
        return
    table = Table(box=None, pad_edge=False)
    for column in ("job", "workflow", "status", "created", "input", "reason"):
        table.add_column(column, no_wrap=not wide, overflow="fold" if wide else "ellipsis")
    for state in states:
        created = state.created_at.strftime("%Y-%m-%d %H:%M:%S" if wide else "%m-%d %H:%M")
        name, reason = state.spec.input.name, state.error or ""
        if not wide:
            name, reason = _fit(name, 16), _fit(reason, 18)
        table.add_row(state.job_id, state.spec.workflow, state.status.value, created, name, reason)
    stdout.print(table, width=None if wide else min(stdout.width, 80), soft_wrap=wide)


def _worker_state(state: dict) -> str:
    """`busy 12s`, `loading 3s`, `idle`: what a worker does now and for how long."""
    name = state.get("state") or "?"
    since = state.get("since")
    if not since or name == "idle":
        return name
    try:
        seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(since)).total_seconds()
    except ValueError:
        return name
    return f"{name} {_age(seconds)}"


def _age(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _worker_jobs(state: dict) -> str:
    current = state.get("current") or []
    if not current:
        return ""
    first = current[0]
    more = f" +{len(current) - 1}" if len(current) > 1 else ""
    return f"{first.get('job_id')}/{first.get('node')}{more}"


@main.command()
@click.option("--json", "as_json", is_flag=True,
              help="Each worker's $SRV.STATS reply (metadata + `state`: contracts.WorkerState), as one JSON list.")
@click.option("--wide", is_flag=True,
              help="One block per worker: state, current requests, jobs done, last error, interpreter, packages.")
@_friendly_errors
def workers(as_json: bool, wide: bool) -> None:
    """Stage workers: state (loading / idle / busy) and job.

    Every stage service on the bus: stage, env, host, state (loading / idle / busy, and for how
    long), the job it works on, model."""
    from captionbus.client import workers as list_workers

    infos = _on_bus("captionbus-workers", lambda nc, js: list_workers(nc))
    if as_json:
        stdout.print_json(json.dumps(infos))
        return
    infos = sorted(infos, key=lambda i: (i.get("metadata", {}).get("stage", ""), i.get("metadata", {}).get("worker_id", "")))
    if wide:
        # Package lists do not fit a column: one block per worker, lines never hard-wrapped.
        for info in infos:
            meta, state = info.get("metadata", {}), info.get("state", {})
            click.echo(" ".join(meta.get(k, "") for k in ("stage", "env", "host", "pid", "model")))
            current = ", ".join(f"{c.get('job_id')}/{c.get('node')} attempt {c.get('attempt')} since {c.get('since')}"
                                for c in state.get("current") or [])
            click.echo(f"  state: {_worker_state(state)}" + (f" on {current}" if current else ""))
            click.echo(f"  jobs done: {state.get('jobs_done', 0)}, failed: {state.get('jobs_failed', 0)}"
                       + (f"; last error: {state['last_error']}" if state.get("last_error") else ""))
            if meta.get("setup_error"):
                click.echo(f"  cannot serve: {meta['setup_error']}")
            click.echo(f"  interpreter: {meta.get('interpreter', '')}")
            packages = ", ".join(f"{k[4:]}={v}" for k, v in sorted(meta.items()) if k.startswith("pkg."))
            click.echo(f"  packages: {packages or '-'}")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("stage", "env", "host", "state", "job", "model"):
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    for info in infos:
        meta, state = info.get("metadata", {}), info.get("state", {})
        model = meta.get("model", "")
        table.add_row(_fit(meta.get("stage", ""), 14), _fit(meta.get("env", ""), 10), _fit(meta.get("host", ""), 12),
                      _worker_state(state), _fit(_worker_jobs(state), 18),
                      _fit(f"cannot serve: {meta['setup_error']}" if meta.get("setup_error")
                           else Path(model).name if "/" in model else model, 14))
    stdout.print(table, width=min(stdout.width, 80))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="{code: {iso639_2, name}} as one JSON object.")
def languages(as_json: bool) -> None:
    """Language codes -s and -t accept (ISO 639-1), with names."""
    from contracts.languages import LANGUAGES

    if as_json:
        stdout.print_json(json.dumps({code: {"iso639_2": three, "name": name}
                                      for code, (three, name) in LANGUAGES.items()}))
        return
    for code, (three, name) in LANGUAGES.items():
        click.echo(f"{code:<4} {three:<4} {name}")


@main.command()
@click.argument("stage")
@click.option("-f", "--follow", is_flag=True, help="Keep printing lines as they are written (Ctrl-C stops).")
@click.option("-n", "--lines", default=40, show_default=True, help="Lines from the end of each log to print first.")
@click.option("--replica", default=0, show_default=True, help="Which replica's log (serve --replicas N).")
@_friendly_errors
def logs(stage: str, follow: bool, lines: int, replica: int) -> None:
    """A stage service's log on this host (in CAPTIONBUS_HOME/logs)."""
    import time

    from contracts.stage_specs import stage_spec

    stage_spec(stage)
    path = load().home / "logs" / f"{stage}-{replica}.log"
    if not path.is_file():
        raise UserError(f"no log for {stage} replica {replica} at {path}: it has not run on this host "
                        f"with this CAPTIONBUS_HOME")
    with open(path, "rb") as f:
        tail = f.read().decode("utf-8", "replace").splitlines()[-lines:] if lines else []
        for line in tail:
            click.echo(line)
        while follow:
            chunk = f.readline()
            if chunk:
                click.echo(chunk.decode("utf-8", "replace").rstrip("\n"))
            else:
                time.sleep(0.3)


@main.command(short_help="Every stage's params and service options.")
@click.argument("stage", required=False)
@click.option("--json", "as_json", is_flag=True, help="The JSON Schema of each stage's params and service options.")
@_friendly_errors
def stages(stage: str | None, as_json: bool) -> None:
    """Every stage's params (-o STAGE.KEY=VALUE) and service options (serve --option KEY=VALUE or
    the env var), from their models in contracts/."""
    from rich.markup import escape

    from contracts.stage_specs import STAGES, describe_model, stage_spec

    specs = [stage_spec(stage)] if stage else list(STAGES.values())
    if as_json:
        stdout.print_json(json.dumps({s.name: {"params": s.params.model_json_schema(),
                                               "options": s.options.model_json_schema()} for s in specs}))
        return
    for spec in specs:
        inputs = [*spec.inputs, *(f"{n} (optional)" for n in spec.optional_inputs),
                  *(f"{n} (list)" for n in spec.input_lists)]
        stdout.print(f"[bold]{spec.name}[/]: {spec.summary}", highlight=False)
        stdout.print(f"  inputs: {', '.join(inputs) or 'any (passed through)'}; "
                     f"outputs: {', '.join(spec.outputs) or 'its inputs, or out'}", highlight=False)
        params = Table(title=f"{spec.name} params (-o {spec.name}.KEY=VALUE)", title_justify="left")
        for column in ("param", "type", "default", "description"):
            params.add_column(column, overflow="fold")
        rows = {row["name"]: row for row in describe_model(spec.params)}
        for name in [*spec.params.own_fields(), *(n for n in rows if n not in spec.params.own_fields())]:
            row = rows[name]
            note = " (set by the coordinator)" if row["set_by"] == "coordinator" else ""
            params.add_row(*map(escape, (name, row["type"], row["default"], row["description"] + note)))
        stdout.print(params)
        options = describe_model(spec.options)
        if options:
            table = Table(title=f"{spec.name} service options (serve {spec.name} --option KEY=VALUE, or the env var)",
                          title_justify="left")
            for column in ("option", "env var", "type", "default", "description"):
                table.add_column(column, overflow="fold")
            for row in options:
                table.add_row(*map(escape, (row["name"], spec.options.env_var(row["field"]) or "", row["type"],
                                            row["default"], row["description"])))
            stdout.print(table)
        else:
            stdout.print(f"  {spec.name} has no service options", highlight=False)
        stdout.print()


def parse_since(value: str | None):
    """`--since 10m` / `2h` / `1d` / `30s`, or an ISO time (`2026-12-01T03:00`, UTC unless it says)."""
    import re
    from datetime import datetime, timedelta

    if value is None:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", value.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
        return datetime.now(UTC) - timedelta(**{unit: float(match[1])})
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UserError(f"--since {value!r}: use a duration (30s, 10m, 2h, 1d) or an ISO time "
                        "(2026-12-01T03:00)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@main.command()
@click.argument("job_id", required=False)
@click.option("--follow", is_flag=True,
              help="Keep printing new events; with JOB_ID, end after the job's final event.")
@click.option("--since", default=None, metavar="WHEN",
              help="Only events from WHEN on: a duration back (30s, 10m, 2h, 1d) or an ISO time.")
@_friendly_errors
def events(job_id: str | None, follow: bool, since: str | None) -> None:
    """Job events as JSON lines (all jobs, or one)."""
    from captionbus.client import follow as follow_events
    from captionbus.client import job_state

    start = parse_since(since)

    async def go(nc, js):
        if job_id is not None and await job_state(js, job_id) is None:
            raise UserError(f"no job {job_id!r}")
        # Ctrl-C / SIGTERM end the follow here, in the loop, so the connection closes and the
        # process exits 130 instead of lingering on a server that went away.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stream = follow_events(js, job_id, stop_at_end=follow, since=start, stop_when_caught_up=not follow)
        stopper = asyncio.create_task(stop.wait())
        try:
            while True:
                # Not following: replay what is stored; an empty subject ends after a quiet second.
                nxt = asyncio.create_task(anext(stream))
                done, _ = await asyncio.wait({nxt, stopper}, timeout=None if follow else 1.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await nxt
                    return exitcodes.INTERRUPTED if stopper in done else exitcodes.OK
                try:
                    event = nxt.result()
                except StopAsyncIteration:
                    return exitcodes.OK
                print(event.model_dump_json(), flush=True)
        finally:
            stopper.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.aclose(), 2)

    code = _on_bus("captionbus-events", go)
    if code == exitcodes.INTERRUPTED:
        console.print("interrupted")
    sys.exit(code)


def _job_command(action: str):
    @_friendly_errors
    def command(job_id: str) -> None:
        from captionbus import client

        async def go(nc, js):
            state = await client.job_state(js, job_id)
            if state is None:
                raise UserError(f"no job {job_id!r}")
            # The coordinator ignores both in these states; say so instead of "requested".
            status = state.status.value
            if action == "retry" and status not in ("failed", "cancelled"):
                hint = ("submit it again (finished stages come from the cache)" if status == "completed"
                        else "wait for it to end, or cancel it first")
                raise UserError(f"job {job_id} is {status}; only failed or cancelled jobs can be retried: {hint}")
            if action == "cancel" and state.status.finished:
                raise UserError(f"job {job_id} already {status}; nothing to cancel")
            await getattr(client, action)(js, job_id)

        _on_bus(f"captionbus-{action}", go)
        stdout.print(f"{action} requested for {job_id}")

    return command


main.command(name="cancel", help="Cancel a job.")(click.argument("job_id")(_job_command("cancel")))
main.command(name="retry", help="Retry a failed or cancelled job from its failed stages.")(click.argument("job_id")(_job_command("retry")))

from captionbus.envs.cli import envs as _envs_group  # noqa: E402
from captionbus.envs.cli import models as _models_group
from captionbus.gateway.cli import gateway as _gateway_group  # noqa: E402
from captionbus.subs_cli import subs as _subs_group  # noqa: E402

for _group in (_envs_group, _models_group, _subs_group, _gateway_group):
    main.add_command(_group)
