"""A real gateway (uvicorn on a free loopback port, in a thread) for tests."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn

from captionbus.gateway.app import GatewayConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_gateway(config: GatewayConfig):
    """Yields the gateway's base URL (http://127.0.0.1:PORT) while it serves."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
