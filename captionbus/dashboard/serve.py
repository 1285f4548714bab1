"""`captionbus dashboard`: connect with the read-only role, watch the bus, serve the web app."""
from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import uvicorn

from captionbus.dashboard.app import AuthError, check_bind, create_app
from captionbus.dashboard.board import Board
from captionbus.dashboard.metrics import Metrics
from captionbus.envs.stages import load_stage_map
from core.bus import connect, require_provisioned

DEFAULT_LISTEN = "127.0.0.1:8765"
TOKEN_ENV, TOKEN_FILE_ENV = "CAPTIONBUS_DASHBOARD_TOKEN", "CAPTIONBUS_DASHBOARD_TOKEN_FILE"


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise AuthError(f"--listen {listen!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "127.0.0.1", int(port)


def token_from_env(environ: dict[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_FILE_ENV):
        path = Path(environ[TOKEN_FILE_ENV]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise AuthError(f"{TOKEN_FILE_ENV}={path}: {e.strerror}") from None
        if not token:
            raise AuthError(f"{TOKEN_FILE_ENV}={path} is empty")
        return token
    return environ.get(TOKEN_ENV) or None


async def serve(url: str, listen: str = DEFAULT_LISTEN, token: str | None = None,
                ready: asyncio.Event | None = None) -> None:
    host, port = parse_listen(listen)
    check_bind(host, token)
    nc = await connect(url, "captionbus-dashboard")
    try:
        await require_provisioned(nc.jetstream())
        metrics = Metrics()
        board = Board(nc, sorted(load_stage_map()), metrics)
        await board.start()
        config = uvicorn.Config(create_app(board, metrics, token), host=host, port=port,
                                log_level="warning", access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if ready is not None:
            ready.set()
        try:
            await task
        finally:
            await board.stop()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5)
