"""`captionbus`: one command for one machine (`run`), and the fleet parts one by one."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from core.settings import load

console = Console(stderr=True)
stdout = Console()


class UserError(click.ClickException):
    """An error a person can act on: one line, no traceback, exit code 2 (1: the job failed)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
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

        known: tuple[type[BaseException], ...] = (BusError, SubmitError, ServiceStartError, JobFailedError, ValueError)
        with contextlib.suppress(ImportError):
            from captionbus.envs import EnvsMissing

            known += (EnvsMissing,)
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            console.print("interrupted")
            sys.exit(130)
        except known as e:
            if hasattr(e, "envs"):  # EnvsMissing: its message is the exact fixing command
                states = getattr(e, "states", {}) or {}
                which = ", ".join(f"{env} ({states.get(env, 'missing')})" for env in e.envs)
                raise UserError(f"stage environments not ready: {which}; run: {e}") from None
            raise UserError(str(e), exit_code=1 if isinstance(e, JobFailedError) else 2) from None
        except Exception as e:
            if os.environ.get("CAPTIONBUS_DEBUG"):
                raise
            raise UserError(f"internal error: {type(e).__name__}: {e} (set CAPTIONBUS_DEBUG=1 for the traceback)") from None

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
                      "request per chunk (0: the whole film in one; default 120)."),
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


@main.command()
@click.argument("media", type=click.Path(path_type=Path))
@_with_job_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Output folder (default: ./<name>.subs).")
@click.option("--attach", is_flag=True, help="Use the coordinator and services already on the bus instead of starting them.")
@click.option("--replicas", type=click.IntRange(1, 64), default=1, show_default=True,
              help="asr workers to start (a chunked film's chunks go to all of them).")
@_friendly_errors
def run(media: Path, workflow: str, source: str | None, targets: str | None, options, out_dir: Path | None,
        attach: bool, replicas: int) -> None:
    """Run a job on this machine: bus, coordinator and services included; prints output paths."""
    from captionbus.runner import run_job, validate_job
    from captionbus.stack import server_for_run

    _terminate_like_ctrl_c()
    settings = load()
    out_dir = out_dir or Path(f"{media.stem}.subs")
    # Before the server starts: a bad option (-o asr.nosuchkey=1) costs nothing to refuse.
    validate_job(workflow, source, _split_languages(targets), local_stack=not attach, options=_parse_options(options))
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


def _exit_if_partial(outputs) -> None:
    """Exit 3 when the job completed without some target languages (their reasons are printed)."""
    failed = getattr(outputs, "failed_branches", None)
    if failed:
        console.print(f"job completed without: {', '.join(sorted(failed))}", highlight=False)
        sys.exit(3)


@main.command()
@click.option("--stages", default=None, help="Comma-separated stages to serve (default: every stage whose env exists).")
@_friendly_errors
def up(stages: str | None) -> None:
    """Run the local stack until Ctrl-C: embedded NATS (unless NATS_URL), coordinator, services."""
    from captionbus.runner import run_stack
    from captionbus.stack import server_for_up

    _service_logging()
    settings = load()
    with server_for_up(settings) as url:
        console.print(f"captionbus up: NATS at {url}; data in {settings.home}")
        asyncio.run(run_stack(settings, url, _split_languages(stages) or None, console=console))


@main.command()
@_friendly_errors
def coordinator() -> None:
    """Run the coordinator against NATS_URL or the local `up` server."""
    from captionbus.runner import run_coordinator_forever
    from core.bus import resolve_url

    _service_logging()
    settings = load()
    asyncio.run(run_coordinator_forever(resolve_url(settings)))


@main.command()
@click.argument("stage")
@click.option("--replicas", default=1, show_default=True, help="Processes to start (they share one queue).")
@click.option("--devices", default=None,
              help="Comma-separated CUDA device indexes, one per replica in turn (0,1: replica 0 on GPU 0, 1 on GPU 1).")
@_friendly_errors
def serve(stage: str, replicas: int, devices: str | None) -> None:
    """Serve one stage with its environment's interpreter."""
    from captionbus.envs import env_for_stage, interpreter_for_stage
    from captionbus.runner import check_service_options
    from captionbus.stack import service_env, start_service, stop_services
    from contracts.stage_specs import stage_spec
    from core.bus import resolve_url

    stage_spec(stage)  # an unknown stage: one line listing the known ones
    check_service_options([stage])  # CAPTIONBUS_<STAGE>_* typos: refused here, not in the service log
    settings = load()
    url = resolve_url(settings)
    env, interpreter = env_for_stage(stage), interpreter_for_stage(stage)
    pinned = _device_envs(devices, replicas)
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
            await nc.close()

    return asyncio.run(go())


@main.command()
@click.argument("media", type=click.Path(path_type=Path))
@_with_job_options
@click.option("--wait", is_flag=True, help="Follow the job and fetch its outputs.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None)
@_friendly_errors
def submit(media: Path, workflow: str, source: str | None, targets: str | None, options, wait: bool, out_dir: Path | None) -> None:
    """Submit a job to a running stack; prints the job id."""
    from captionbus.runner import run_job
    from core.bus import resolve_url

    settings = load()
    if wait:
        outputs = asyncio.run(run_job(
            settings, resolve_url(settings), media, workflow=workflow, source_language=source,
            target_languages=_split_languages(targets), options=_parse_options(options),
            out_dir=out_dir or Path(f"{media.stem}.subs"), start_stack=False, console=console,
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

    click.echo(_on_bus("captionbus-submit", go).job_id)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@_friendly_errors
def status(job_id: str, as_json: bool) -> None:
    """One job's state, stage by stage."""
    from captionbus.client import job_state

    state = _on_bus("captionbus-status", lambda nc, js: job_state(js, job_id))
    if state is None:
        raise UserError(f"no job {job_id!r}")
    if as_json:
        stdout.print_json(state.model_dump_json())
        return
    table = Table(title=f"{job_id}  {state.spec.workflow}  [bold]{state.status.value}[/]")
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JobState JSON object per line.")
@_friendly_errors
def jobs(as_json: bool) -> None:
    """All jobs the bus knows."""
    from captionbus.client import list_jobs

    states = _on_bus("captionbus-jobs", lambda nc, js: list_jobs(js))
    if as_json:
        for state in states:
            click.echo(state.model_dump_json())
        return
    table = Table()
    table.add_column("job", no_wrap=True)
    for column in ("workflow", "status", "created", "input", "reason"):
        table.add_column(column)
    for state in states:
        table.add_row(state.job_id, state.spec.workflow, state.status.value,
                      state.created_at.strftime("%Y-%m-%d %H:%M:%S"), state.spec.input.name, state.error or "")
    stdout.print(table)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@_friendly_errors
def workers(as_json: bool) -> None:
    """Every stage service on the bus: stage, env, interpreter, versions, hardware, model."""
    from captionbus.client import workers as list_workers

    infos = _on_bus("captionbus-workers", lambda nc, js: list_workers(nc))
    if as_json:
        stdout.print_json(json.dumps(infos))
        return
    table = Table()
    for column in ("stage", "env", "host", "pid", "interpreter", "model", "packages"):
        table.add_column(column)
    for info in sorted(infos, key=lambda i: i.get("metadata", {}).get("stage", "")):
        meta = info.get("metadata", {})
        packages = ", ".join(f"{k[4:]}={v}" for k, v in sorted(meta.items()) if k.startswith("pkg."))
        table.add_row(meta.get("stage", ""), meta.get("env", ""), meta.get("host", ""), meta.get("pid", ""),
                      meta.get("interpreter", ""), meta.get("model", ""), packages)
    stdout.print(table)


@main.command()
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


@main.command()
@click.argument("job_id", required=False)
@click.option("--follow", is_flag=True, help="Keep printing new events.")
@_friendly_errors
def events(job_id: str | None, follow: bool) -> None:
    """Job events as JSON lines (all jobs, or one)."""
    from captionbus.client import follow as follow_events

    async def go(nc, js):
        # A retried job has several terminal events: replay all that is stored.
        stream = follow_events(js, job_id, stop_at_end=False)
        if follow:
            async for event in stream:
                print(event.model_dump_json(), flush=True)
            return
        # Replay what is stored, then stop once the stream goes quiet.
        while True:
            try:
                event = await asyncio.wait_for(anext(stream), 1.0)
            except (asyncio.TimeoutError, StopAsyncIteration):
                return
            print(event.model_dump_json(), flush=True)

    _on_bus("captionbus-events", go)


def _job_command(action: str):
    @_friendly_errors
    def command(job_id: str) -> None:
        from captionbus import client

        async def go(nc, js):
            if await client.job_state(js, job_id) is None:
                raise UserError(f"no job {job_id!r}")
            await getattr(client, action)(js, job_id)

        _on_bus(f"captionbus-{action}", go)
        stdout.print(f"{action} requested for {job_id}")

    return command


main.command(name="cancel", help="Cancel a job.")(click.argument("job_id")(_job_command("cancel")))
main.command(name="retry", help="Retry a failed or cancelled job from its failed stages.")(click.argument("job_id")(_job_command("retry")))

from captionbus.envs.cli import envs as _envs_group  # noqa: E402
from captionbus.envs.cli import models as _models_group
from captionbus.subs_cli import subs as _subs_group  # noqa: E402

for _group in (_envs_group, _models_group, _subs_group):
    main.add_command(_group)
