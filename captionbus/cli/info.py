"""The commands that describe the fleet and the product: `workers`, `logs`, `stages`,
`languages`."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import click
from rich.table import Table

from captionbus.cli.common import main, on_bus, stdout
from captionbus.cli.errors import UserError
from captionbus.cli.tables import print_table
from captionbus.core.settings import load


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
def workers(as_json: bool, wide: bool) -> None:
    """Stage workers: state (loading / idle / busy) and job.

    Every stage service on the bus: its worker id (host/stage/replica/pid, never cut), env,
    state (loading / idle / busy, and for how long), the job it works on, model."""
    from captionbus.client import workers as list_workers

    infos = on_bus("captionbus-workers", lambda nc, js: list_workers(nc))
    if as_json:
        stdout.print_json(json.dumps(infos))
        return
    infos = sorted(infos, key=lambda i: (i.get("metadata", {}).get("stage", ""), i.get("metadata", {}).get("worker_id", "")))
    if wide:
        # Package lists do not fit a column: one block per worker, lines never hard-wrapped.
        for info in infos:
            meta, state = info.get("metadata", {}), info.get("state", {})
            click.echo(" ".join(meta.get(k, "") for k in ("worker_id", "env", "model")))
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
    rows = []
    for info in infos:
        meta, state = info.get("metadata", {}), info.get("state", {})
        model = meta.get("model", "")
        rows.append([meta.get("worker_id", ""), meta.get("env", ""), _worker_state(state),
                     _worker_jobs(state), f"cannot serve: {meta['setup_error']}" if meta.get("setup_error")
                     else Path(model).name if "/" in model else model])
    # The worker id (contracts.worker_identity: host/stage/replica/pid, the name the dashboard,
    # /metrics and job.json use) holds the stage and host, so they have no columns of their own.
    print_table(stdout, ["worker", "env", "state", "job", "model"], rows, keep={"worker", "env", "state", "job"})


@main.command()
@click.option("--json", "as_json", is_flag=True, help="{code: {iso639_2, name}} as one JSON object.")
def languages(as_json: bool) -> None:
    """Language codes -s and -t accept (ISO 639-1), with names."""
    from captionbus.contracts.languages import LANGUAGES

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
def logs(stage: str, follow: bool, lines: int, replica: int) -> None:
    """A stage service's log on this host (in CAPTIONBUS_HOME/logs)."""
    import time

    from captionbus.contracts.stage_specs import stage_spec

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
def stages(stage: str | None, as_json: bool) -> None:
    """Every stage's params (-o STAGE.KEY=VALUE) and service options (serve --option KEY=VALUE or
    the env var), from their models in captionbus/contracts/."""
    from rich.markup import escape

    from captionbus.contracts.stage_specs import STAGES, describe_model, stage_spec

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

