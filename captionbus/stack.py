"""Starting the parts of captionbus on this host: stage services in their own interpreters,
and the coordinator in-process. Used by `run` and `up`."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import nats.errors
from nats.aio.client import Client as NATS

from captionbus.client import workers
from captionbus.envs.code import code_dir
from captionbus.server import EmbeddedServer
from captionbus.core.bus import BusError, connect, running_embedded_url
from captionbus.core.hardware import usable_cores
from captionbus.core.settings import Settings
from captionbus.core.text import one_line

log = structlog.get_logger("captionbus.stack")


class ServiceStartError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """preexec_fn: children get SIGTERM when the process that started them dies, even by
    kill -9, so a killed `run` never leaves a model-holding service or a server behind.

    SIGINT and SIGTERM are unblocked first: a blocked signal mask is inherited across fork and
    exec, and `serve --replicas` blocks both before it starts its replicas (to sigwait for
    them). Its replicas then ignored the SIGTERM that stop_services sent on Ctrl-C, each was
    killed after the 15 s grace instead of finishing its requests, and the death signal above
    never reached them."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def server_for_run(settings: Settings):
    """A NATS URL for one `captionbus run`: NATS_URL, the local `up` stack, or a private embedded
    server whose data is removed afterwards (two runs never share or stop each other's server)."""
    if settings.nats_url:
        yield settings.nats_url
        return
    url = running_embedded_url(settings)
    if url:
        yield url
        return
    private = settings.nats_dir / f"run-{os.getpid()}"
    server = EmbeddedServer(private, preexec_fn=_die_with_parent)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(private, ignore_errors=True)


# Who started a stage service (CAPTIONBUS_LAUNCHER, WorkerInfo.launcher; runner.start_stage_services).
UP_LAUNCHER = "up"
RUN_LAUNCHER = "run"
LAUNCHER_VARIABLE = "CAPTIONBUS_LAUNCHER"


def up_serving(settings: Settings, stages: list[str], patience_s: float = 2.0) -> str | None:
    """The URL of the `captionbus up` running on this host (its embedded server, found as
    `submit` finds it; never a NATS_URL fleet) when its workers serve every one of `stages`
    (a worker whose setup failed does not count; one still loading its model does), else None.
    Only up's own workers count (their metadata's `launcher` is UP_LAUNCHER): the services
    another `run` started on up's bus stop when that run ends, and a job that joined for them
    would wait in their queues for a worker that no longer comes; a `captionbus serve` is no
    part of `up` either.

    `run` then submits its job to that stack instead of starting a coordinator and services of
    its own on the same bus. Those would only load every model a second time (the whisperx asr
    worker: ~20 s of CPU and ~1.9 GB): the job's requests go to the stage queues that `up`'s
    warm workers consume anyway. The $SRV.STATS replies are read until every stage has
    answered (milliseconds) or `patience_s` has passed: on a busy host a reply can take well
    over the half second `captionbus workers` waits, and a stage counted missing only makes
    `run` start its own stack, as it did before."""
    if settings.nats_url:
        return None
    url = running_embedded_url(settings)
    if url is None:
        return None
    wanted = set(stages)

    def serve_all(replies: list[dict]) -> bool:
        return wanted <= {str(r["metadata"].get("stage")) for r in replies
                          if r["metadata"].get("launcher") == UP_LAUNCHER and not r["metadata"].get("setup_error")}

    async def serves() -> bool:
        nc = await connect(url, "captionbus-run", settings)
        try:
            return serve_all(await workers(nc, patience_s, until=serve_all))
        finally:
            await nc.close()

    try:
        return url if asyncio.run(serves()) else None
    except (BusError, nats.errors.Error, OSError):  # `up` stopped meanwhile: run starts its own, as without one
        return None


@contextlib.contextmanager
def server_for_up(settings: Settings):
    """The long-running local bus: NATS_URL, or the embedded server with persistent data whose
    URL other commands on this host find in the data dir."""
    if settings.nats_url:
        yield settings.nats_url
        return
    url = running_embedded_url(settings)
    if url:
        raise BusError(f"captionbus up is already running here (NATS at {url}); stop it first")
    server = EmbeddedServer(settings.nats_dir / "up", preexec_fn=_die_with_parent)
    server.start()
    settings.embedded_url_file.parent.mkdir(parents=True, exist_ok=True)
    settings.embedded_url_file.write_text(server.url)
    try:
        yield server.url
    finally:
        with contextlib.suppress(FileNotFoundError):
            if settings.embedded_url_file.read_text().strip() == server.url:
                settings.embedded_url_file.unlink()
        server.stop()


@dataclass
class ServiceProcess:
    stage: str
    env: str
    interpreter: Path
    log_path: Path
    process: subprocess.Popen
    extra_env: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.poll() is None

    def raise_if_dead(self) -> None:
        if not self.alive():
            raise ServiceStartError(
                f"stage service {self.stage!r} (env {self.env}) exited with code "
                f"{self.process.returncode}: {self.last_error()} (full log: {self.log_path})"
            )

    def last_error(self, max_chars: int = 300) -> str:
        """The reason in the service's log, on one line: the `error` (else the message) of its
        last error-level JSON record; else its last line. Never a multi-KB traceback."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "no log written"
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("level") in ("error", "critical", "exception"):
                text = record.get("error") or record.get("event") or ""
                if not record.get("error") and record.get("exception"):
                    last = str(record["exception"]).strip().splitlines()
                    text = f"{text}: {last[-1]}" if last else text
                return one_line(str(text))[:max_chars]
        tail = [line for line in lines if line.strip()]
        return one_line(tail[-1])[:max_chars] if tail else "its log is empty"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def service_env(settings: Settings, env: str, nats_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a stage service process starts with, however it is launched.
    CAPTIONBUS_LAUNCHER comes only from `extra` (up's and run's start_stage_services): a
    `captionbus serve` started from a shell that exported it (an up's service environment,
    copied) must not claim to be up's: `run` joins an up only for up's own workers (up_serving)."""
    return {
        **{k: v for k, v in os.environ.items() if k != LAUNCHER_VARIABLE},
        "NATS_URL": nats_url,
        "CAPTIONBUS_HOME": str(settings.home),
        "CAPTIONBUS_ENV": env,
        "CAPTIONBUS_HOST_ID": settings.host_id,
        "CAPTIONBUS_ARTIFACTS": "object" if settings.use_object_store() else "local",
        # The launcher lends the stage its own captionbus/contracts/core/services (captionbus/envs/code.py).
        "PYTHONPATH": str(code_dir()),
        **(extra or {}),
    }


def operator_option(options: Any, name: str, environ: Mapping[str, str]) -> str:
    """The operator's value of service option `name` of a stage whose options model is `options`
    ('' when unset), in the options loader's order (captionbus/contracts/stage_options.py): the
    generic CAPTIONBUS_OPTION_<NAME>, which reaches every stage, over the stage's own variable."""
    if options is None or name not in options.model_fields:
        return ""
    return environ.get(f"CAPTIONBUS_OPTION_{name.upper()}", "") or environ.get(options.env_var(name) or "", "")


def replica_threads_env(stage: str, replicas: int, environ: dict[str, str] | None = None,
                        cores: int | None = None) -> dict[str, str]:
    """The environment that splits this host's cores between `replicas` CPU replicas of `stage`.

    A stage whose `threads` option defaults to all cores (asr: CTranslate2 `cpu_threads` and
    torch) started N times on one host would run N x cores threads: two asr replicas on 2 cores
    each took 2 threads and the pair decoded no faster than one (they time-slice instead of
    running side by side). Each replica gets cores // N (at least 1; the cores this process may
    use, captionbus.core.hardware.usable_cores: affinity and cgroup quota, not the host's), unless the operator set
    the option (its environment variable) already. Empty for one replica or a stage without
    such an option."""
    from captionbus.contracts.stage_specs import STAGES

    environ = os.environ if environ is None else environ
    options = STAGES[stage].options if stage in STAGES else None
    if replicas <= 1 or options is None or "threads" not in options.model_fields:
        return {}
    if options.model_fields["threads"].default is not None:
        return {}  # a fixed default (vad: 1 thread) is already per replica
    var = options.env_var("threads")
    if not var or operator_option(options, "threads", environ) != "":
        return {}
    return {var: str(max(1, (cores or usable_cores()) // replicas))}


def replica_processes(stage: str, replicas: int, environ: dict[str, str] | None = None,
                      cores: int | None = None, kinds: list[str] | None = None) -> list[dict[str, str]]:
    """What `replicas` workers of `stage` on this host are, as processes: the extra environment of
    each process to start (one dict per process). `run --replicas N` and `serve STAGE --replicas N`
    (without --devices) both start what this says.

    A stage whose service options have `workers` (asr: decoders sharing one model load) on a host
    that decodes on the CPU is one process with `workers` N and the cores split between them
    (`threads` = usable cores // N each, as replica_threads_env gave N processes). Why one
    process: N asr processes each imported torch and loaded Whisper, and on 2 cores the loads
    could only go one after another (at once they fought for the cores and both finished later,
    captionbus/services/runtime/setup_turn.py), so `--replicas 2` had its second replica
    decoding only the last chunks of a 10.6-minute film (1.30x one worker cold, issue 22's goal
    1.6x). One process loads once, its N decoders share the weights (CTranslate2 workers on one
    device share them) and all start decoding when that one load is done; it also holds one
    copy of torch and the model instead of N. Why both commands: `serve asr --replicas N` on a
    CPU host shares the same cores and pays the same N loads; what one process gives up is the
    isolation of N (a crash takes all N decoders, and `up`/`serve` restart it as one); whoever
    wants N processes sets CAPTIONBUS_ASR_WORKERS themselves (an operator's setting is kept, as
    for `threads`: N processes of that many workers each; CAPTIONBUS_OPTION_WORKERS counts too),
    or runs `serve asr` N times. The mlx backend (CAPTIONBUS_ASR_BACKEND=mlx) runs one worker a
    process, so it gets N processes.

    Everything else is N processes as before: stages without `workers`; a GPU host (`kinds` has
    cuda: one process per device, `serve --devices`, whose pinning the caller adds) or Apple
    silicon (mlx: one MLX worker per Mac), unless the stage's `device` option says cpu."""
    from captionbus.contracts.stage_specs import STAGES
    from captionbus.core import hardware

    environ = os.environ if environ is None else environ
    count = max(1, replicas)
    options = STAGES[stage].options if stage in STAGES else None
    shares = count > 1 and options is not None and "workers" in options.model_fields
    if shares and operator_option(options, "workers", environ) != "":
        shares = False  # the operator chose the workers per process
    if shares and operator_option(options, "backend", environ) == "mlx":
        shares = False  # one MLX worker per process (the mlx backend refuses workers > 1)
    if shares:
        device = operator_option(options, "device", environ)
        on_cpu = device == "cpu" or (not device and not {"cuda", "mlx"} & set(kinds or hardware.load().kinds()))
        shares = on_cpu
    if not shares:
        return [replica_threads_env(stage, count, environ, cores) for _ in range(count)]
    return [{options.env_var("workers"): str(count), **replica_threads_env(stage, count, environ, cores)}]


def start_service(
    stage: str,
    env: str,
    interpreter: Path,
    nats_url: str,
    settings: Settings,
    *,
    replica: int = 0,
    extra_env: dict[str, str] | None = None,
) -> ServiceProcess:
    """One stage service, launched with its environment's interpreter (never a shell)."""
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{stage}-{replica}.log"
    child_env = service_env(settings, env, nats_url, extra_env)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [str(interpreter), "-m", "captionbus.services", "serve", stage, "--replica-id", str(replica)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=str(settings.home),
            start_new_session=True,  # a terminal Ctrl-C goes to us; we stop services in order
            preexec_fn=_die_with_parent,
        )
    log.info("service started", stage=stage, env=env, interpreter=str(interpreter), pid=process.pid)
    return ServiceProcess(stage, env, interpreter, log_path, process, extra_env or {})


async def wait_ready(nc: NATS, services: list[ServiceProcess], timeout: float = 180.0,
                     tolerate_dead: bool = False, slow: list[ServiceProcess] | None = None,
                     on_ready=None) -> list[ServiceProcess]:
    """Until every service process has set up (its $SRV STATS state is no longer `loading`: its
    model is loaded, or setup failed for good), or fail with its log. A worker answers $SRV while
    it loads (it takes requests and answers cache hits then), so PING alone is not "ready".
    With tolerate_dead a service that exits is left out instead, and the dead ones are returned.
    Given a `slow` list, services still loading at the timeout go there instead of failing.
    on_ready(service) is called as each one becomes ready (`up` says so at once)."""
    deadline = time.monotonic() + timeout
    pending = list(services)
    dead: list[ServiceProcess] = []
    while pending:
        for svc in list(pending):
            if tolerate_dead and not svc.alive():
                pending.remove(svc)
                dead.append(svc)
                continue
            svc.raise_if_dead()
        # One ask for every stage (0.3 s of listening a round; asked stage by stage, the seven
        # stages of a transcribe stack made each round 2.1 s).
        stages = {svc.stage for svc in pending}
        # no state at all: a worker from before WorkerState, which registered once set up
        ready_pids = {str(reply["metadata"].get("pid")) for reply in await workers(nc, 0.3)
                      if reply["metadata"].get("stage") in stages and reply["state"].get("state") != "loading"}
        if on_ready is not None:
            for svc in pending:
                if str(svc.process.pid) in ready_pids:
                    on_ready(svc)
        pending = [svc for svc in pending if str(svc.process.pid) not in ready_pids]
        if pending and time.monotonic() > deadline:
            if slow is not None:
                slow.extend(pending)
                return dead
            names = ", ".join(s.stage for s in pending)
            raise ServiceStartError(f"stage services did not become ready in {timeout:.0f}s: {names}")
        if pending:
            await asyncio.sleep(0.2)
    return dead


async def setup_errors(nc: NATS, stages: list[str], timeout: float = 5.0) -> dict[str, str]:
    """Stages with a replica whose setup failed (it stays up and fails their requests with this
    reason), from their $SRV STATS state: one ask, until as many replicas of each stage have
    answered as `stages` names it (one entry a process started), or `timeout`. A fixed 0.3 s a
    stage missed a replica busy retrying its setup under load (the whole suite at load average
    6: `up` reported a broken alignment stage as serving, and never said it cannot serve); every
    process asked about has just answered wait_ready, so waiting for each costs nothing on a
    healthy host."""
    wanted = Counter(stages)
    found: dict[str, str] = {}
    if not wanted:
        return found

    def all_answered(seen: list[dict]) -> bool:
        answered = Counter(w["metadata"].get("stage") for w in seen)
        return all(answered[stage] >= n for stage, n in wanted.items())

    for reply in await workers(nc, timeout, until=all_answered):
        stage, error = reply["metadata"].get("stage"), reply["metadata"].get("setup_error")
        if stage in wanted and error:
            found[stage] = error
    return found


def stop_services(services: list[ServiceProcess], grace: float = 15.0) -> None:
    for svc in services:
        if svc.alive():
            with contextlib.suppress(ProcessLookupError):
                svc.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for svc in services:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            svc.process.wait(remaining)
        except subprocess.TimeoutExpired:
            svc.process.kill()
            svc.process.wait()
