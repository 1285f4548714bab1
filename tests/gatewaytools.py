"""A real gateway for tests: uvicorn on a free loopback port in a thread, or `captionbus gateway` as a process."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from captionbus.gateway.app import GatewayConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_gateway(config: GatewayConfig, ready: bool = True):
    """Yields the gateway's base URL (http://127.0.0.1:PORT) while it serves; with `ready`, once
    it is on the bus (/readyz 200: it connects in the background)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.05)
    while ready and httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("gateway did not get on the bus")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def start_gateway_process(args: list[str], env: dict[str, str], log_path) -> tuple[subprocess.Popen, str]:
    """`captionbus gateway ARGS` as its own process on a free loopback port; (process, base URL)
    once /readyz answers 200 (it is on the bus)."""
    port = free_port()
    log = open(log_path, "ab")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen([sys.executable, "-m", "captionbus", "gateway", "--listen", f"127.0.0.1:{port}", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the gateway did not start; see {log_path}")
