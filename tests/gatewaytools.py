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


def wait_answer(url: str, status: int, timeout: float = 30, **kwargs) -> httpx.Response:
    """The first answer from `url` with `status`, polling; fails with the last answer seen."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=3, **kwargs)
            if last.status_code == status:
                return last
        except httpx.TransportError as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered {status}; last: {getattr(last, 'text', last)}")


def check_waits_for_the_bus(command: list[str], probe: str, tmp_path, env: dict[str, str],
                            while_waiting=None, once_ready=None) -> tuple[str, str]:
    """A web door started before its bus (issue 19, 'services that wait'): it serves at once,
    /readyz is 503 with the reason and `probe` (an API path) is 503 in the one error shape; it
    says once that the bus is not there; when the bus comes it is ready; when the bus restarts it
    is not ready meanwhile and ready again after; Ctrl-C (SIGINT) exits 130. Returns (base URL,
    log text); the bus data lies under tmp_path/nats. `while_waiting(base)` runs before the bus
    exists, `once_ready(base, bus_url)` once the door is first ready."""
    import asyncio
    import signal

    from captionbus.server import EmbeddedServer
    from captionbus.core.bus import connect, provision

    server = EmbeddedServer(tmp_path / "nats")
    port = free_port()
    log_path = tmp_path / "door.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "captionbus", *command, "--listen", f"127.0.0.1:{port}"],
                                env={**env, "NATS_URL": server.url}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_answer(f"{base}/healthz", 200)
        not_ready = wait_answer(f"{base}/readyz", 503)
        assert "connect" in not_ready.json()["error"]["message"].lower(), not_ready.text
        refused = httpx.get(f"{base}{probe}", timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == 503, refused.text
        if while_waiting is not None:
            while_waiting(base)
        time.sleep(3)  # several retries' worth
        assert proc.poll() is None, log_path.read_text()

        server.start()

        async def provision_bus():
            nc = await connect(server.url, "t-provision")
            await provision(nc.jetstream())
            await nc.close()

        asyncio.run(provision_bus())
        wait_answer(f"{base}/readyz", 200, timeout=40)
        if once_ready is not None:
            once_ready(base, server.url)
        server.stop()
        wait_answer(f"{base}/readyz", 503, timeout=30)
        server.start()
        wait_answer(f"{base}/readyz", 200, timeout=60)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        server.stop()
    text = log_path.read_text(errors="replace")
    assert text.count("the bus is not there yet") == 1 and "nats error" not in text.split("connected to the bus")[0], text
    assert "Traceback" not in text, text
    return base, text
