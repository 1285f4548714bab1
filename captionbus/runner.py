"""`captionbus run` / `up`: the whole stack on this host, and following one job to its end."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
from pathlib import Path

import nats.errors
import structlog
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from captionbus.client import (
    TENANT,
    SubmitError,
    artifacts_of,
    check_input_file,
    collect_replies,
    fetch_outputs,
    follow,
    job_state,
    submit,
    with_record_parts,
)
from captionbus.dashboard.process import start_dashboard_process, stop_dashboard_process
from captionbus.envs import (
    OK,
    env_for_stage,
    get_spec,
    interpreter_for_stage,
    load_stage_map,
    quick_state,
    require_envs,
)
from captionbus.stack import (
    RUN_LAUNCHER,
    UP_LAUNCHER,
    ServiceProcess,
    ServiceStartError,
    replica_processes,
    setup_errors,
    start_service,
    stop_services,
    wait_ready,
)
from captionbus.contracts import ArtifactRef, JobSpec, subjects
from captionbus.contracts.events import LOADING_MODEL
from captionbus.contracts.ids import validate_token
from captionbus.contracts.languages import check_language
from captionbus.contracts.speech import SpokenLanguage
from captionbus.contracts.stage_specs import STAGES, explain
from captionbus.contracts.transcript import Transcript
from captionbus.coordinator.graph import load_workflow, option_errors
from captionbus.coordinator.service import run_coordinator
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import BusError, client_tenant, connect, provision, require_provisioned, through_failover
from captionbus.core.gc import collect
from captionbus.core.retry import RetryPolicy
from captionbus.core.service_options import load_options
from captionbus.core.settings import Settings, config_files
from captionbus.core.tasks import cancel_and_wait
from captionbus.core.text import one_line

log = structlog.get_logger("captionbus.runner")

# A stage service that died is restarted after 2, 4, 8, 16, 30 s; after 5 restarts it is given up.
RESTART_RETRY = RetryPolicy(initial_s=2.0, multiplier=2.0, max_s=30.0, max_attempts=5)


class JobFailedError(RuntimeError):
    """The job ended failed or cancelled; the message is its reason."""


class JobOutputs(dict):
    """Output name -> local file, plus the fan-out branches (target languages) that failed
    while the rest of the job completed; the CLI exits 3 when there are any."""

    failed_branches: dict[str, str]

    def __init__(self, files: dict, failed_branches: dict[str, str] | None = None):
        super().__init__(files)
        self.failed_branches = dict(failed_branches or {})


@functools.lru_cache(maxsize=64)
def _workflow_at(path: str, mtime_ns: int, size: int):
    """A parsed workflow, reused while its file is unchanged: PyYAML's pure-Python parse of a
    workflow takes 3-60 ms here, which the gateway would otherwise pay on every request."""
    return load_workflow(path)


def names_subtitles(workflow: str) -> bool:
    """Whether `workflow` (a name; unknown: False, validate_job says why) writes subtitles, so a
    known speaker's name can go to its subtitle_gen's `speaker_names`."""
    path = config_files("workflows").get(workflow)
    if path is None:
        return False
    stat = Path(path).stat()
    nodes = _workflow_at(str(path), stat.st_mtime_ns, stat.st_size).nodes
    return any((node.stage or name) == "subtitle_gen" for name, node in nodes.items())


def validate_job(
    workflow: str, source_language: str | None, target_languages: list[str], *, local_stack: bool = True,
    options: dict | None = None, require_built: bool = True,
) -> list[str]:
    """Refuse before anything runs: unknown workflow or language, a job the graph cannot plan
    (e.g. a language pair no translation backend serves) and — when this host will run the
    stages itself — missing environments (unless `require_built` is off: `run` builds them,
    captionbus/firstrun.py). Returns the stages this job will run."""
    validate_token(workflow, "workflow name")
    workflows = config_files("workflows")
    path = workflows.get(workflow)
    if path is None:
        known = ", ".join(workflows)
        raise SubmitError(f"unknown workflow {workflow!r} (known: {known})")
    source_language = check_language(source_language) if source_language else None
    target_languages = [check_language(code) for code in target_languages]
    stat = Path(path).stat()
    graph = _workflow_at(str(path), stat.st_mtime_ns, stat.st_size)
    vad = (options or {}).get("vad")
    if not isinstance(vad, dict) and vad not in (None, "silero", "pyannote"):  # a dict: the vad stage's params  # the graphs test `options.vad == pyannote`: a typo would pick silero
        raise SubmitError(f"option vad={vad!r} unknown; use silero or pyannote")
    if isinstance(vad, str) and "vad_pyannote" not in graph.nodes:
        raise SubmitError(f"workflow {workflow!r} always uses Silero VAD; --vad chooses for translate, subtitle, chunked and chunked_aligned")
    if "speakers" in (options or {}):  # the stage's param, not a switch of its own
        raise SubmitError("option speakers: use --speakers VALUE (the gateway: the `speakers` field), or "
                          "-o diarization.speakers=VALUE")
    if target_languages and not any(node.for_each == "target_languages" for node in graph.nodes.values()):
        raise SubmitError(f"workflow {workflow!r} does not translate; drop -t or pick a workflow that does")
    if not target_languages and any(node.for_each == "target_languages" for node in graph.nodes.values()):
        # Without -t a translating workflow would quietly make source subtitles only.
        raise SubmitError(f"workflow {workflow!r} needs target languages: add -t LANGS (e.g. -t en,hi), "
                          "or use -w transcribe for source subtitles only")
    # The plan of a job like this one (the input is not read yet): what the coordinator will run.
    spec = JobSpec(
        job_id="jvalidate", workflow=workflow, input=ArtifactRef(key="0" * 64, name="input", size=0),
        source_language=source_language, target_languages=target_languages, options=options or {},
    )
    # Each -o group against the params model of the stages it reaches (captionbus.contracts.stage_specs),
    # then every node's final params in the plan.
    errors = option_errors(graph, spec) or graph.expand(spec).errors
    if errors:
        raise SubmitError("; ".join(errors))
    stages = graph.expand(spec).stages()
    if local_stack:
        check_local_stages(stages, require_built)
    return stages


def check_local_stages(stages: list[str], require_built: bool = True) -> None:
    """validate_job's checks for stages this host will run itself: their service options from
    this environment, and (`require_built`) their environments built."""
    check_service_options(stages)
    if require_built:
        require_envs(stages)


def check_service_options(stages: list[str]) -> None:
    """The stage services this host starts read their options from this environment
    (CAPTIONBUS_ASR_MODEL, ...): a bad value is refused now, not in a service log later."""
    for stage in dict.fromkeys(stages):
        try:
            load_options(STAGES[stage].options, {}, os.environ)
        except ValidationError as e:
            raise SubmitError(f"{stage} service options from the environment: {explain(e, 'option')}") from None


async def warn_about_unserved_stages(nc, stages: list[str], console: Console) -> None:
    """A fleet submit needs no local envs, but a stage nobody serves means a job that waits. Not
    asked as a tenant: it is granted no `$SRV` (captionbus.client.workers), and the refused ask
    would warn that no stage is served."""
    if TENANT.get():
        return
    try:
        replies = await collect_replies(nc, "$SRV.PING", 0.5)
    except (BusError, nats.errors.Error) as e:  # a warning's question: the submit goes on
        console.print(f"[yellow]warning:[/] cannot check which stages are served ({one_line(str(e))})", highlight=False)
        return
    served = {str(r.get("name", "")) for r in replies}
    missing = [s for s in dict.fromkeys(stages) if subjects.micro_service_name(s) not in served]
    if missing:
        console.print(f"[yellow]warning:[/] no worker serves {', '.join(missing)} right now; "
                      "the job waits in the queue until one starts", highlight=False)


def start_stage_services(
    settings: Settings, url: str, stages: list[str], replicas: dict[str, int] | None = None, *,
    launcher: str = RUN_LAUNCHER,
) -> list[ServiceProcess]:
    """One service per stage, `replicas[stage]` workers of those named (they share the stage's
    queue): N processes, or for asr on a CPU host one process of N decoders sharing one model
    load (stack.replica_processes says which, and why); each reports `launcher`
    (CAPTIONBUS_LAUNCHER: stack.UP_LAUNCHER or RUN_LAUNCHER), by which a later `run` tells up's
    workers from those of another `run` on the same bus (stack.up_serving)."""
    replicas = replicas or {}
    return [
        start_service(stage, env_for_stage(stage), interpreter_for_stage(stage), url, settings, replica=i,
                      extra_env={**extra, "CAPTIONBUS_LAUNCHER": launcher})
        for stage in dict.fromkeys(stages)
        for i, extra in enumerate(replica_processes(stage, replicas.get(stage, 1)))
    ]


@contextlib.asynccontextmanager
async def coordinator_task(nc):
    stop = asyncio.Event()
    task = asyncio.create_task(run_coordinator(nc, stop_event=stop))
    try:
        yield task
    finally:
        stop.set()
        # Its own end (Coordinator.stop's bounds: its loops 10 s, then its senders' confirms 5 s),
        # else cancelled, again while a lost cancellation lets it run on (core.tasks); what it
        # raised is its log's. Cancelled meanwhile (a second Ctrl-C): it is cancelled too, and
        # the caller's cancellation goes on.
        try:
            done, _ = await asyncio.wait({task}, timeout=16)
        except asyncio.CancelledError:
            await cancel_and_wait([task], within_s=5)
            raise
        if not done:
            await cancel_and_wait([task], within_s=5)


async def run_job(
    settings: Settings,
    url: str,
    media: Path,
    *,
    workflow: str,
    source_language: str | None,
    target_languages: list[str],
    options: dict,
    out_dir: Path,
    start_stack: bool,
    console: Console,
    replicas: dict[str, int] | None = None,
    on_submitted=None,
    speaker_refs: dict[str, Path] | None = None,
) -> dict[str, Path]:
    """`on_submitted(spec)`: called once the job is on the bus (`submit --wait` names it on Ctrl-C);
    `speaker_refs`: known speakers' converted reference clips (client.submit uploads them).
    Submitting to a running stack behind the auth callout, it acts for the tenant the server
    granted its login (captionbus.client.TENANT); a stack it starts itself is its own (no tenant)."""
    media = check_input_file(media)
    stages = validate_job(workflow, source_language, target_languages, local_stack=start_stack, options=options)
    nc = await connect(url, "captionbus-run", settings)
    services: list[ServiceProcess] = []
    acting = TENANT.set(None)
    try:
        if not start_stack:
            TENANT.set(await client_tenant(nc, settings))
        js = nc.jetstream()
        # Only the one that owns the bus creates it: `submit --wait` runs under the client role,
        # which may not (deploy/nats/roles.conf), and its stack's coordinator has provisioned.
        await (provision(js) if start_stack else require_provisioned(js, names_only=TENANT.get() is not None))
        async with contextlib.AsyncExitStack() as stack:
            watched: list = []
            if start_stack:
                watched.append(await stack.enter_async_context(coordinator_task(nc)))
                # No waiting for every model to load: requests queue until their stage is up, and
                # a bad input fails at demux while asr is still loading.
                services = start_stage_services(settings, url, stages, replicas, launcher=RUN_LAUNCHER)
            else:
                await warn_about_unserved_stages(nc, stages, console)
            store = artifacts_of(ArtifactStore(settings, js), None)  # a tenant's: its namespace
            spec = await submit(
                js, store, media, workflow=workflow, source_language=source_language,
                target_languages=target_languages, options=options, speaker_refs=speaker_refs,
            )
            console.print(f"job [bold]{spec.job_id}[/] ({workflow}) submitted", highlight=False)
            if on_submitted is not None:
                on_submitted(spec)
            final = await _until_first(
                _follow_with_progress(js, spec.job_id, console), _watch(services, watched)
            )
            if final.kind != "completed":
                reason = getattr(final, "reason", None) or "cancelled"
                raise JobFailedError(f"job {spec.job_id} {final.kind}: {reason}")
            written = JobOutputs(await fetch_outputs(store, final.outputs, out_dir, media.stem, final.job_id),
                                 final.failed_branches)
            for branch, reason in sorted(final.failed_branches.items()):
                console.print(f"[red]branch {branch} failed[/]: {reason}", highlight=False)
            # Which worker/env/interpreter ran each stage, attempts, timings: the job's record.
            state = await job_state(js, spec.job_id)
            language = await spoken_language(store, state, source_language) if state is not None else None
            if language is not None:
                how = (f"detected, probability {language['probability']:.2f}" if language["detected"]
                       and language.get("probability") is not None else "detected" if language["detected"]
                       else "given with -s")
                console.print(f"language: {language['code']} ({how})", highlight=False)
            if state is not None:
                written["job"] = await write_job_record(js, state, language, out_dir / f"{media.stem}.job.json",
                                                        console)
            return written
    finally:
        TENANT.reset(acting)
        stop_services(services)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5)


async def write_job_record(js, state, language: dict | None, record: Path, console: Console) -> Path:
    """Write the job's whole record to `record` (job.json) with the parts kept under their own keys
    filled in (client.with_record_parts) and the spoken `language`. The job has completed and its
    outputs are written: a part that cannot be read (gone, unreadable, a refused read) leaves it
    named by key in job.json, with a warning that says so, instead of failing the run."""
    try:
        state = await with_record_parts(js, state)
    except Exception as e:  # noqa: BLE001  the job is done: its record is written, the part named
        console.print(f"[yellow]warning:[/] {record.name} names its speaker summary by key; it could "
                      f"not be read ({one_line(f'{type(e).__name__}: {e}')})", highlight=False)
    data = json.loads(state.model_dump_json())
    if language is not None:
        data["language"] = language  # the spoken language, as ASR found or was told it
    record.write_text(json.dumps(data, indent=2))
    return record


async def spoken_language(store: ArtifactStore, state, given: str | None) -> dict | None:
    """{code, detected, probability} from the asr node's transcript (None without one): the
    language Whisper decoded in, which is what a person checks first when the words look wrong.
    A chunked job detected it once (the `language` node's output, with its probability)."""
    nodes = sorted(state.nodes.values(), key=lambda n: "language" not in n.outputs)  # detection first
    for node in nodes:
        name = "language" if "language" in node.outputs else "transcript"
        ref = node.outputs.get(name) if node.stage == "asr" else None
        if ref is None:
            continue
        try:
            found = (SpokenLanguage if name == "language" else Transcript).model_validate_json(
                Path(await store.get(ref)).read_bytes())
        except (OSError, ValueError) as e:  # the record is still written; this line is a nicety
            log.warning("could not read the transcript for its language", error=str(e))
            return None
        probability = found.probability if name == "language" else found.language_probability
        return {"code": found.language, "detected": given is None, "probability": probability}
    return None


async def _watch(services: list[ServiceProcess], tasks: list[asyncio.Task]) -> None:
    """Fail the run when a service dies (a broken env, a model that does not load) or the
    in-process coordinator stops."""
    while True:
        for svc in services:
            svc.raise_if_dead()
        for task in tasks:
            if task.done():
                error = None if task.cancelled() else task.exception()
                raise ServiceStartError(f"the coordinator stopped: {error or 'no reason given'}")
        await asyncio.sleep(0.5)


async def _until_first(main, watchdog):
    """main's result, unless watchdog raises first."""
    main_task, watch_task = asyncio.create_task(main), asyncio.create_task(watchdog)
    try:
        done, _ = await asyncio.wait({main_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        return (main_task if main_task in done else watch_task).result()
    finally:
        for task in (main_task, watch_task):
            task.cancel()


class _ItemBars:
    """One bar per node that fans out over items (asr-0, asr-1, … of a chunked film): its
    progress is the sum over the items, out of the count the list's stage reported."""

    def __init__(self, progress: Progress):
        self.progress, self.bars, self.done, self.total = progress, {}, {}, 0

    @staticmethod
    def group(node: str | None) -> str | None:
        name, dash, item = (node or "").rpartition("-")
        return name if dash and item.isdigit() else None

    def update(self, event) -> None:
        if event.kind == "stage_completed" and event.items:
            self.total = max([self.total, *event.items.values()])
        group = self.group(getattr(event, "node", None))
        if group is None or event.kind not in ("stage_requested", "stage_progress", "stage_completed"):
            return
        done = self.done.setdefault(group, {})
        if group not in self.bars:
            self.bars[group] = self.progress.add_task(group, total=1.0, note="")
        fraction = {"stage_requested": 0.0, "stage_completed": 1.0}.get(event.kind, getattr(event, "fraction", 0.0))
        done[event.node] = fraction
        total = max(self.total, len(done))
        finished = sum(1 for f in done.values() if f >= 1.0)
        note = f"{finished}/{total} chunks"
        if event.kind == "stage_progress" and event.message == LOADING_MODEL and not finished:
            note += f", {LOADING_MODEL}"  # the stage's worker is still loading its model
        self.progress.update(self.bars[group], total=float(total), completed=sum(done.values()), note=note)


async def _follow_with_progress(js, job_id: str, console: Console):
    bars: dict[str, int] = {}
    columns = (SpinnerColumn(), TextColumn("{task.description:<22}"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        items = _ItemBars(progress)
        async for event in follow(js, job_id):
            node = getattr(event, "node", None)
            items.update(event)
            if event.kind in ("completed", "failed", "cancelled"):
                return event  # a job's end may name a chunk's node (failed at asr-0): never skip it
            if _ItemBars.group(node) is not None and event.kind != "stage_warning":
                continue
            if node and node not in bars and event.kind in ("stage_requested", "stage_progress", "stage_completed"):
                bars[node] = progress.add_task(node, total=1.0, note="")
            if event.kind == "stage_requested" and event.attempt > 1:
                progress.update(bars[node], completed=0, note=f"attempt {event.attempt}")
            elif event.kind == "stage_progress":
                progress.update(bars[node], completed=event.fraction, note=event.message[:40])
            elif event.kind == "stage_completed":
                cached = " (cached)" if event.worker.get("cache") == "hit" else ""
                progress.update(bars[node], completed=1.0, note=event.worker.get("env", "") + cached)
            elif event.kind == "stage_warning":
                console.print(f"[yellow]warning[/] {event.node}: {event.message}", highlight=False)
            elif event.kind == "branch_failed":
                console.print(f"[red]branch {event.branch} failed[/] at {event.node}; the other languages go on",
                              highlight=False)
    raise JobFailedError(f"lost the event stream of job {job_id}")


async def run_stack(settings: Settings, url: str, stages: list[str] | None, console: Console,
                    dashboard: str | None = None) -> int | None:
    """Coordinator + services (+ the dashboard on `dashboard` HOST:PORT) until SIGINT/SIGTERM;
    returns the signal that stopped it. Stages default to all whose env is built."""
    if stages is None:
        stages = [s for s in _stage_names() if env_ready(s)]
    nc = await connect(url, "captionbus-up", settings)
    await provision(nc.jetstream())
    web = start_dashboard_process(settings, url, dashboard) if dashboard else None
    services = start_stage_services(settings, url, stages, launcher=UP_LAUNCHER)
    stop, stopped_by = stop_on_signals()
    # On its own embedded bus `up` is the only owner of this host's data: it collects too. A fleet
    # (NATS_URL) runs `captionbus gc` with the gc user instead (the coordinator's may not purge).
    collector = (asyncio.create_task(collect_periodically(settings, nc.jetstream(), settings.gc_interval))
                 if settings.nats_url is None and settings.gc_interval > 0 else None)
    try:
        async with coordinator_task(nc) as coordinator:
            # One stage that cannot start (a model not configured on this host) must not take the
            # others down: report it, and let the supervisor retry it with backoff.
            slow: list[ServiceProcess] = []
            dead = await wait_ready(nc, services, tolerate_dead=True, slow=slow, on_ready=lambda svc: console.print(
                f"serving {svc.stage} (env {svc.env})", highlight=False))
            for svc in slow:  # a busy host, a big model: `up` serves on while it loads
                console.print(f"[yellow]warning:[/] {svc.stage} (env {svc.env}) is still starting. "
                              f"Its log: {svc.log_path}", highlight=False)
            for svc in dead:
                console.print(f"[yellow]warning:[/] {svc.stage} (env {svc.env}) did not start; retrying with backoff. "
                              f"Its log: {svc.log_path}", highlight=False)
            broken = await setup_errors(nc, [svc.stage for svc in services if svc not in dead and svc not in slow])
            for stage, reason in sorted(broken.items()):
                svc = next(svc for svc in services if svc.stage == stage)
                console.print(f"[yellow]warning:[/] {stage} (env {svc.env}) cannot serve: {reason}; its requests "
                              f"fail with this reason. Its log: {svc.log_path}", highlight=False, soft_wrap=True)
            serving = [s for s in stages if s not in {svc.stage for svc in [*dead, *slow]} and s not in broken]
            console.print(f"serving: {', '.join(serving) or 'no stages'}"
                          + (f"; dashboard on http://{dashboard}/" if dashboard else "") + "; Ctrl-C stops")
            await _until_first(stop.wait(), _supervise(settings, url, services, coordinator))
            return stopped_by[0] if stopped_by else None
    finally:
        if collector is not None:
            await cancel_and_wait([collector], within_s=5)
        stop_services(services)
        if web is not None:
            stop_dashboard_process(web)
        await nc.drain()


async def collect_periodically(settings: Settings, js, interval_s: float, first_after_s: float = 60.0) -> None:
    """`captionbus gc` every `interval_s` (the first a minute after start); a failed run is logged
    and the next one tried, never a reason for `up` to stop."""
    await asyncio.sleep(min(first_after_s, interval_s))
    while True:
        try:
            report = await collect(settings, js)
            log.info("gc run", summary=report.summary())
        except Exception as e:
            log.warning("gc run failed; trying again later", error=f"{type(e).__name__}: {e}"[:300])
        await asyncio.sleep(interval_s)


async def _supervise(settings: Settings, url: str, services: list[ServiceProcess], coordinator: asyncio.Task,
                     policy: RetryPolicy = RESTART_RETRY) -> None:
    """Restart a service that dies (a crash, an OOM kill): its request comes back to the new
    one. A stage that keeps dying is given up (logged with its reason; its requests wait in the
    queue for a worker elsewhere) while the others go on; a dead coordinator ends `up`."""
    restarts: dict[str, int] = {}
    given_up: set[str] = set()
    while True:
        if coordinator.done():
            error = None if coordinator.cancelled() else coordinator.exception()
            raise ServiceStartError(f"the coordinator stopped: {error or 'no reason given'}")
        for n, svc in enumerate(services):
            if svc.alive() or svc.stage in given_up:
                continue
            if policy.exhausted(restarts.get(svc.stage, 0)):
                given_up.add(svc.stage)
                log.error("stage service keeps dying; no longer restarted", stage=svc.stage, env=svc.env,
                          restarts=policy.max_attempts, reason=svc.last_error(), log=str(svc.log_path))
                continue
            restarts[svc.stage] = restarts.get(svc.stage, 0) + 1
            log.warning("stage service died; restarting", stage=svc.stage, code=svc.process.returncode,
                        restart=restarts[svc.stage], reason=svc.last_error(), log=str(svc.log_path))
            await asyncio.sleep(policy.delay(restarts[svc.stage]))
            services[n] = start_service(svc.stage, svc.env, svc.interpreter, url, settings,
                                        extra_env=svc.extra_env or None)  # still up's (CAPTIONBUS_LAUNCHER)
        await asyncio.sleep(1.0)


def _stage_names() -> list[str]:
    return list(load_stage_map())


def env_ready(stage: str) -> bool:
    """Serve a stage only from an env `run` would accept (built and not stale)."""
    try:
        return quick_state(get_spec(env_for_stage(stage))) == OK
    except Exception:  # a stage routed to an env with no spec here: not ours to serve
        return False


def stop_on_signals() -> tuple[asyncio.Event, list[int]]:
    """An event set by SIGINT or SIGTERM, and the list that records which came (the CLI exits 130
    on Ctrl-C, 0 on a supervisor's SIGTERM: captionbus.cli.common.end_of_service)."""
    stop, seen = asyncio.Event(), []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda sig=sig: (seen.append(sig), stop.set()))
    return stop, seen


async def run_coordinator_forever(url: str) -> int | None:
    """The coordinator until SIGINT/SIGTERM; returns the signal that stopped it."""
    nc = await connect(url, "captionbus-coordinator")
    # retried like Coordinator.start's: a cluster forming or electing a leader answers with timeouts
    await through_failover(lambda: provision(nc.jetstream()), "provision")
    stop, stopped_by = stop_on_signals()
    try:
        # Raises when the coordinator dies, so a supervisor (systemd) restarts the process.
        await run_coordinator(nc, stop_event=stop)
        return stopped_by[0] if stopped_by else None
    finally:
        await nc.drain()
