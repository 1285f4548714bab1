"""`captionbus dashboard`: connect with the read-only role, watch the bus, serve the web app."""
from __future__ import annotations

import asyncio
import contextlib
import signal
import threading

import uvicorn

from captionbus.dashboard.app import create_app
from captionbus.dashboard.auth import DEFAULT_LISTEN, check_bind, parse_listen
from captionbus.dashboard.board import Board
from captionbus.dashboard.downloads import Downloads
from captionbus.dashboard.metrics import Metrics
from captionbus.envs.stages import load_stage_map
from core.bus import connect, require_provisioned
from core.settings import Settings
from core.settings import load as load_settings


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal that stopped it after shutting down, so a SIGTERM (systemd,
    `up`) would end the process by that signal; here a graceful stop on SIGINT/SIGTERM exits 0."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


async def serve(url: str, listen: str = DEFAULT_LISTEN, token: str | None = None,
                ready: asyncio.Event | None = None, downloads: bool = False, settings: Settings | None = None) -> None:
    """`downloads`: offer download links where the credentials may read artifacts
    (captionbus.dashboard.downloads); off by default."""
    host, port = parse_listen(listen)
    check_bind(host, token)
    nc = await connect(url, "captionbus-dashboard")
    try:
        await require_provisioned(nc.jetstream())
        metrics = Metrics()
        board = Board(nc, sorted(load_stage_map()), metrics)
        gate = await Downloads.probe(nc.jetstream(), settings or load_settings()) if downloads else Downloads()
        await board.start()
        config = uvicorn.Config(create_app(board, metrics, token, gate), host=host, port=port,
                                log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3)  # open SSE streams never end by themselves
        server = _Server(config)
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
