"""The commands on jobs in a running stack: `submit`, `status`, `jobs`, `events`, `fetch`,
`cancel`, `retry`, `gc`."""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from datetime import UTC
from pathlib import Path

import click
from rich.table import Table

from captionbus import exitcodes
from captionbus.cli.common import (
    check_out_dir,
    console,
    exit_if_partial,
    insecure_option,
    main,
    on_bus,
    parse_options,
    require_secure,
    split_languages,
    stdout,
    warn_if_insecure,
    with_job_options,
)
from captionbus.cli.errors import UserError
from captionbus.cli.tables import print_table
from captionbus.core.settings import load
from captionbus.core.tasks import cancel_and_wait


@main.command(short_help="Submit a job to a running stack.")
@click.argument("media", type=click.Path(path_type=Path))
@with_job_options
@click.option("--wait", is_flag=True, help="Follow the job and fetch its outputs.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder with --wait (default: ./<name>.subs).")
@click.option("--json", "as_json", is_flag=True, help='Print {"job_id": ..., "workflow": ...} (without --wait).')
@insecure_option
def submit(media: Path, workflow: str, source: str | None, targets: str | None, options, wait: bool,
           out_dir: Path | None, as_json: bool, insecure: bool, speaker_refs: dict[str, Path] | None = None) -> None:
    """Submit a job to a running stack; prints the job id (`captionbus fetch JOB` gets its outputs)."""
    from captionbus.client import check_input_file
    from captionbus.client import submit as submit_job
    from captionbus.runner import run_job, validate_job, warn_about_unserved_stages
    from captionbus.core.artifacts import ArtifactStore
    from captionbus.core.bus import resolve_url

    settings = load()
    check_input_file(media)
    # Refused before anything (exit 2), bus or no bus: a bad workflow, language or option.
    stages = validate_job(workflow, source, split_languages(targets), local_stack=False,
                          options=parse_options(options))
    url = resolve_url(settings)
    # The upload carries the film and the credentials: not in clear text, or unauthenticated, to
    # another host unless asked (exit 2, the fix named), as captionbus/coordinator/serve/up refuse.
    require_secure(url, settings, insecure)
    if wait:
        if insecure:
            warn_if_insecure(url, settings)
        out_dir = check_out_dir(out_dir or Path(f"{media.stem}.subs"))
        submitted: list = []
        try:
            outputs = asyncio.run(run_job(
                settings, url, media, workflow=workflow, source_language=source,
                target_languages=split_languages(targets), options=parse_options(options),
                out_dir=out_dir, start_stack=False, console=console, on_submitted=submitted.append,
                speaker_refs=speaker_refs,
            ))
        except KeyboardInterrupt:
            if not submitted:
                raise
            job_goes_on(submitted[0].job_id, out_dir)
            sys.exit(exitcodes.INTERRUPTED)
        for path in outputs.values():
            click.echo(str(path))
        exit_if_partial(outputs)
        return

    async def go(nc, js):
        await warn_about_unserved_stages(nc, stages, console)
        return await submit_job(
            js, ArtifactStore(settings, js), media, workflow=workflow, source_language=source,
            target_languages=split_languages(targets), options=parse_options(options), speaker_refs=speaker_refs,
        )

    spec = on_bus("captionbus-submit", go)
    if as_json:
        click.echo(json.dumps({"job_id": spec.job_id, "workflow": spec.workflow, "input": spec.input.name,
                               "source_language": spec.source_language, "target_languages": spec.target_languages}))
    else:
        click.echo(spec.job_id)


def job_goes_on(job_id: str, out_dir: Path) -> None:
    """What `submit --wait` says on Ctrl-C: the job is the bus's, not this process's; it goes on."""
    console.print(f"interrupted; job {job_id} goes on.\n"
                  f"  follow it: captionbus events {job_id} --follow   (or: captionbus status {job_id})\n"
                  f"  its outputs when it ends: captionbus fetch {job_id} --out {out_dir}\n"
                  f"  stop it: captionbus cancel {job_id}", highlight=False, soft_wrap=True)


@main.command(short_help="Delete what the retention settings no longer keep.")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
@click.option("--local-only", is_flag=True, help="Only this host's local artifact root and file stage cache.")
def gc(dry_run: bool, as_json: bool, local_only: bool) -> None:
    """Delete artifacts, stage cache entries and job history past their retention
    (CAPTIONBUS_RETENTION_*, CAPTIONBUS_ARTIFACTS_MAX_BYTES); never what an unfinished job needs.
    Needs a NATS user allowed to purge (`gc` in deploy/nats/roles.conf) unless --dry-run or
    --local-only."""
    from captionbus.core.bus import connect, require_provisioned, resolve_url, running_embedded_url
    from captionbus.core.gc import GcError, collect

    settings = load()

    def deleted(kind: str, name: str, size: int, dry: bool) -> None:  # stderr, as each is made
        click.echo(f"{'would delete' if dry else 'deleted'} {kind} {name}" + (f" ({size} B)" if size else ""), err=True)

    async def go():
        url = settings.nats_url or running_embedded_url(settings)
        if url is None:  # no bus: this host's files, by their age alone
            return await collect(settings, None, dry_run=dry_run, bus=False, on_delete=deleted)
        nc = await connect(resolve_url(settings), "captionbus-gc")
        try:
            await require_provisioned(nc.jetstream())
            return await collect(settings, nc.jetstream(), dry_run=dry_run, bus=not local_only, on_delete=deleted)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)

    failed = None
    try:
        report = asyncio.run(go())
    except GcError as e:  # the summary of what was done before, then the reason as the last line
        report, failed = e.report, e
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        click.echo(report.summary())
    if failed is not None:
        raise UserError(str(failed), exit_code=exitcodes.BUS if failed.bus else exitcodes.JOB_FAILED)


@main.command(short_help="Download a finished job's outputs.")
@click.argument("job_id")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: ./<input name>.subs).")
def fetch(job_id: str, out_dir: Path | None) -> None:
    """Download a finished job's outputs (as `run` names them); prints each file."""
    from captionbus.client import fetch_outputs, job_head
    from captionbus.core.artifacts import ArtifactStore

    settings = load()

    async def go(nc, js):
        state = await job_head(js, job_id)  # its outputs: the nodes are not needed
        if state is None:
            raise UserError(f"no job {job_id!r}")
        if not state.outputs:
            raise UserError(f"job {job_id} is {state.status.value} and has no outputs yet"
                            + (f": {state.error}" if state.error else ""), exit_code=1)
        stem = Path(state.spec.input.name).stem or job_id
        return await fetch_outputs(ArtifactStore(settings, js), state.outputs, out_dir or Path(f"{stem}.subs"), stem,
                                   job_id)

    for path in on_bus("captionbus-fetch", go).values():
        click.echo(str(path))


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="The job's state as one JSON object (JobState).")
def status(job_id: str, as_json: bool) -> None:
    """One job's state, stage by stage. Exit 0 running or completed, 1 failed or cancelled,
    3 completed without some languages."""
    from captionbus.client import job_state, with_record_parts

    async def read(js):
        state = await job_state(js, job_id)
        return await with_record_parts(js, state) if state is not None and as_json else state

    state = on_bus("captionbus-status", lambda nc, js: read(js))
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JobState JSON object per line.")
@click.option("--wide", is_flag=True, help="Input name and reason wrapped in full, and the full creation time.")
def jobs(as_json: bool, wide: bool) -> None:
    """All jobs the bus knows, oldest first."""
    from captionbus.client import list_jobs

    # The table shows no nodes: the records' heads (their completed nodes are not read in).
    states = on_bus("captionbus-jobs", lambda nc, js: list_jobs(js, whole=as_json))
    if as_json:
        for state in states:
            click.echo(state.model_dump_json())
        return
    rows = [[state.job_id, state.spec.workflow, state.status.value,
             state.created_at.strftime("%Y-%m-%d %H:%M:%S" if wide else "%m-%d %H:%M"),
             state.spec.input.name, state.error or ""] for state in states]
    print_table(stdout, ["job", "workflow", "status", "created", "input", "reason"], rows,
                keep={"job", "workflow", "status", "created"}, wide=wide)


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
def events(job_id: str | None, follow: bool, since: str | None) -> None:
    """Job events as JSON lines (all jobs, or one)."""
    from captionbus.client import follow as follow_events
    from captionbus.client import job_head

    start = parse_since(since)

    async def go(nc, js):
        if job_id is not None and await job_head(js, job_id) is None:
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
                    await cancel_and_wait([nxt], within_s=5)
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

    code = on_bus("captionbus-events", go)
    if code == exitcodes.INTERRUPTED:
        console.print("interrupted")
    sys.exit(code)


def _job_command(action: str):
    def command(job_id: str) -> None:
        from captionbus import client

        async def go(nc, js):
            state = await client.job_head(js, job_id)
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

        on_bus(f"captionbus-{action}", go)
        stdout.print(f"{action} requested for {job_id}")

    return command


main.command(name="cancel", help="Cancel a job.")(click.argument("job_id")(_job_command("cancel")))
main.command(name="retry", help="Retry a failed or cancelled job from its failed stages.")(click.argument("job_id")(_job_command("retry")))
