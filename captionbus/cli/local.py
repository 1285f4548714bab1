"""The commands that run parts of the stack on this host: `run`, `up`, `coordinator`,
`dashboard`, `serve` (the gateway's own group is wired in captionbus/cli/__init__.py)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import click

from captionbus import exitcodes
from captionbus.cli.common import (
    check_out_dir,
    console,
    end_of_service,
    exit_if_partial,
    insecure_option,
    main,
    parse_options,
    require_secure,
    service_logging,
    split_languages,
    terminate_like_ctrl_c,
    with_job_options,
)
from captionbus.cli.errors import UserError
from captionbus.core.settings import load


class _LogConsole:
    """What `up` says to a person, as JSON log lines when its output is not a terminal: one
    format per stream, so a log shipper never meets a human sentence between JSON objects."""

    def print(self, message="", *args, **kwargs) -> None:
        import structlog
        from rich.text import Text

        plain = Text.from_markup(str(message)).plain
        level = "warning" if plain.startswith(("warning", "error")) else "info"
        getattr(structlog.get_logger("captionbus.up"), level)(plain)


@main.command(short_help="Run a job on this machine; prints the output paths.")
@click.argument("media", type=click.Path(path_type=Path))
@with_job_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Output folder (default: ./<name>.subs).")
@click.option("--attach", is_flag=True, help="Use the coordinator and services already on the bus instead of starting them.")
@click.option("--replicas", type=click.IntRange(1, 64), default=1, show_default=True,
              help="asr workers to start (a chunked film's chunks go to all of them).")
@click.option("--no-setup", is_flag=True,
              help="Build nothing: refuse (exit 2) when a stage environment is not built, and fetch no default model.")
def run(media: Path, workflow: str, source: str | None, targets: str | None, options, out_dir: Path | None,
        attach: bool, replicas: int, no_setup: bool, speaker_refs: dict[str, Path] | None = None) -> None:
    """Run a job on this machine: bus, coordinator and services included; prints output paths.
    On first use it builds the stage environments the job needs and fetches the default models.
    Where `captionbus up` runs on this host and serves every stage the job needs, the job goes
    to it (as with --attach) instead of a second set of services loading the same models."""
    from captionbus.client import check_input_file
    from captionbus.runner import check_local_stages, run_job, validate_job
    from captionbus.stack import server_for_run, up_serving

    terminate_like_ctrl_c()
    settings = load()
    # Before the server starts: a bad option (-o asr.nosuchkey=1) costs nothing to refuse.
    stages = validate_job(workflow, source, split_languages(targets), local_stack=False,
                          options=parse_options(options))
    joined = None if attach or replicas > 1 else up_serving(settings, stages)
    if not (attach or joined):
        check_local_stages(stages, require_built=no_setup)
    check_input_file(media)
    out_dir = check_out_dir(out_dir or Path(f"{media.stem}.subs"))
    if joined:
        console.print(f"joining captionbus up (NATS at {joined}): its coordinator and services run this job",
                      highlight=False, soft_wrap=True)
    elif not attach and not no_setup:
        _first_run_setup(stages)
    # Joined: that server only (were `up` to stop now, a private one would have no services).
    with contextlib.nullcontext(joined) if joined else server_for_run(settings) as url:
        outputs = asyncio.run(run_job(
            settings, url, media,
            workflow=workflow, source_language=source, target_languages=split_languages(targets),
            options=parse_options(options), out_dir=out_dir, start_stack=not (attach or joined), console=console,
            replicas={"asr": replicas}, speaker_refs=speaker_refs,
        ))
    for path in outputs.values():
        click.echo(str(path))
    exit_if_partial(outputs)


def _first_run_setup(stages: list[str]) -> None:
    """Build what this host lacks for the job (captionbus/firstrun.py); a failed step is one line."""
    from captionbus.firstrun import SetupError, prepare

    try:
        prepare(stages, console)
    except SetupError as e:
        raise UserError(str(e), exit_code=exitcodes.JOB_FAILED) from None


@main.command(short_help="Run the local stack until Ctrl-C.")
@click.option("-w", "--workflow", "workflows", multiple=True, metavar="WORKFLOW",
              help="Serve the stages this workflow needs (repeatable; default: transcribe).")
@click.option("--with", "with_optional", multiple=True, metavar="STAGE",
              help="Also serve an optional stage of the workflows, which only jobs that ask for it run "
                   "(diarization for --speakers, vad_pyannote for --vad pyannote, source_separation; all). "
                   "Repeatable; as `envs create --for WORKFLOW --with STAGE`.")
@click.option("--stages", default=None,
              help="Comma-separated stages to serve as well (alone: only these).")
@click.option("--log-format", type=click.Choice(["auto", "human", "json"]), default="auto", show_default=True,
              help="human lines, or one JSON object per line; auto: human on a terminal, JSON otherwise.")
@click.option("--dashboard", "dashboard", default="127.0.0.1:8765", show_default=True,
              help="HOST:PORT of the web dashboard (off loopback it needs CAPTIONBUS_DASHBOARD_TOKEN[_FILE]).")
@click.option("--no-dashboard", is_flag=True, help="Do not start the dashboard.")
@insecure_option
def up(workflows: tuple[str, ...], with_optional: tuple[str, ...], stages: str | None, log_format: str,
       dashboard: str, no_dashboard: bool, insecure: bool) -> None:
    """Run the local stack until Ctrl-C: NATS, coordinator, services, the dashboard.

    Only the stages the workflows need are started (each one a process with its model loaded:
    all ten are about 5 GB), among those whose environment is built."""
    from captionbus.core.logging import configure_logging

    as_json = not sys.stderr.isatty() if log_format == "auto" else log_format == "json"
    verbose = click.get_current_context().find_root().params.get("verbose", 0)
    configure_logging(level="DEBUG" if verbose > 1 else "INFO", json=as_json)
    say = _LogConsole() if as_json else console
    try:
        stopped_by = _up(workflows, split_languages(stages), say, dashboard=None if no_dashboard else dashboard,
                         insecure=insecure, with_optional=with_optional)
    except KeyboardInterrupt:  # Ctrl-C while starting, before run_stack holds the signals
        stopped_by = signal.SIGINT
    end_of_service(stopped_by, say)  # after the server has stopped


def _up(workflows: tuple[str, ...], extra: list[str], say, dashboard: str | None, insecure: bool,
        with_optional: tuple[str, ...] = ()) -> int | None:
    """`up` itself; returns the signal that stopped it. The workflows' stages are those their
    jobs run by default, and the optional ones `--with` names (envs.workflow_stages): a
    diarization service (~1 GB) starts only for `--with diarization`."""
    from captionbus.envs import check_optional, require_envs, workflow_stages
    from captionbus.runner import env_ready, run_stack
    from captionbus.stack import server_for_up
    from captionbus.contracts.ids import validate_token
    from captionbus.contracts.stage_specs import stage_spec

    for stage in extra:
        stage_spec(stage)  # an unknown stage is refused before NATS starts
    require_envs(extra)  # a stage asked for by name, its env not built: the command that builds it
    wanted = list(extra)
    serving = workflows or (() if extra else ("transcribe",))
    for workflow in serving:
        try:
            validate_token(workflow, "workflow name")
            needed = workflow_stages(workflow, with_optional)
        except ValueError as e:
            raise UserError(str(e)) from None
        wanted += [s for s in needed if s not in wanted and env_ready(s)]
    if with_optional:
        try:
            check_optional(serving, with_optional)
        except ValueError as e:
            raise UserError(str(e)) from None
    settings = load()
    if settings.nats_url:
        require_secure(settings.nats_url, settings, insecure)
    with server_for_up(settings) as url:
        say.print(f"captionbus up: NATS at {url}; data in {settings.home}; "
                  f"service logs in {settings.home / 'logs'} (captionbus logs STAGE)", highlight=False,
                  soft_wrap=True)
        return asyncio.run(run_stack(settings, url, wanted, console=say, dashboard=dashboard))


@main.command(short_help="Run the coordinator (NATS_URL or the local up).")
@insecure_option
def coordinator(insecure: bool) -> None:
    """Run the coordinator against NATS_URL or the local `up` server."""
    from captionbus.runner import run_coordinator_forever
    from captionbus.core.bus import resolve_url

    service_logging()
    settings = load()
    url = resolve_url(settings)
    require_secure(url, settings, insecure)
    end_of_service(asyncio.run(run_coordinator_forever(url)))


@main.command(short_help="Serve the operators' web dashboard.")
@click.option("--listen", default="127.0.0.1:8765", show_default=True,
              help="HOST:PORT. Off loopback it needs CAPTIONBUS_DASHBOARD_TOKEN or CAPTIONBUS_DASHBOARD_TOKEN_FILE.")
@click.option("--downloads", is_flag=True,
              help="Link job outputs for download, if this host's credentials may read artifacts "
                   "(the dashboard_downloads NATS role, or a readable local artifact root). Off by default.")
def dashboard(listen: str, downloads: bool) -> None:
    """Serve the operators' web dashboard, /metrics, /healthz and /readyz (read-only, unless
    CAPTIONBUS_DASHBOARD_OPERATOR_TOKEN[_FILE] names the token that may cancel and retry)."""
    from captionbus.dashboard.auth import Access, operator_token_from_env, token_from_env
    from captionbus.dashboard.serve import serve
    from captionbus.web.serve import end_service
    from captionbus.core.bus import resolve_url

    service_logging()
    token, operator = token_from_env(), operator_token_from_env()
    Access(token, operator)  # the two tokens differ: refused before anything starts
    settings = load()
    url = resolve_url(settings)
    acts = "cancel and retry for the operator token" if operator else "read-only"
    click.echo(f"dashboard on http://{listen}/ ({acts}; /readyz: 503 until on the bus)", err=True)
    end_service(asyncio.run(serve(url, listen, token, downloads=downloads, settings=settings, operator=operator)))


@main.command()
@click.argument("stage")
@click.option("--replicas", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Workers to start (they share one queue): processes, or for asr on a CPU host one process "
                   "with that many decoders sharing one model load.")
@click.option("--devices", default=None,
              help="Comma-separated CUDA device indexes, one per replica in turn (0,1: replica 0 on GPU 0, 1 on GPU 1).")
@insecure_option
def serve(stage: str, replicas: int, devices: str | None, insecure: bool) -> None:
    """Serve one stage with its environment's interpreter."""
    from captionbus.envs import env_for_stage, interpreter_for_stage
    from captionbus.runner import check_service_options
    from captionbus.stack import replica_processes, service_env, start_service, stop_services
    from captionbus.contracts.stage_specs import stage_spec
    from captionbus.core.bus import resolve_url

    stage_spec(stage)  # an unknown stage: one line listing the known ones
    check_service_options([stage])  # CAPTIONBUS_<STAGE>_* typos: refused here, not in the service log
    settings = load()
    url = resolve_url(settings)
    require_secure(url, settings, insecure)
    asyncio.run(check_bus(url, settings))
    env, interpreter = env_for_stage(stage), interpreter_for_stage(stage)
    pinned = device_envs(devices, replicas)
    if devices is None:  # CPU replicas share this host's cores (asr: one process, N decoders)
        pinned = [extra or None for extra in replica_processes(stage, replicas)]
    if len(pinned) == 1:
        if replicas > 1:
            console.print(f"{replicas} {stage} workers in one process, sharing one model load (env {env})")
        # Become the service: its logs on this terminal, signals straight to it.
        os.execve(str(interpreter), [str(interpreter), "-m", "captionbus.services", "serve", stage],
                  service_env(settings, env, url, pinned[0]))
    # Blocked first, or the default handlers would kill us before sigwait returns.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    procs = [start_service(stage, env, interpreter, url, settings, replica=i, extra_env=pinned[i])
             for i in range(len(pinned))]
    console.print(f"{replicas} replicas of {stage} (env {env}); logs in {settings.home / 'logs'}")
    try:
        stopped_by = signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stop_services(procs)
    end_of_service(stopped_by)


async def check_bus(url: str, settings) -> None:
    """Connect once and check the streams before becoming the service: a bad password or a
    missing stream is this command's error, exit 4 with the server's reason. The service itself
    exited 2 for these (captionbus/services/runtime/main.py), and with --replicas it was only in the logs."""
    from captionbus.core.bus import connect, require_provisioned

    nc = await connect(url, "captionbus-serve-check", settings)
    try:
        await require_provisioned(nc.jetstream())
    finally:
        await nc.close()


def device_envs(devices: str | None, replicas: int) -> list[dict[str, str] | None]:
    """Per replica, the environment that pins it to one CUDA device (CUDA_VISIBLE_DEVICES), the
    devices taken in turn; None for each when no devices are given."""
    if devices is None:
        return [None] * replicas
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids or not all(d.isdigit() for d in ids):
        raise UserError(f"--devices {devices!r}: give CUDA device indexes separated by commas, e.g. 0,1")
    return [{"CUDA_VISIBLE_DEVICES": ids[i % len(ids)]} for i in range(replicas)]

