"""The uvicorn runner of every web door, and how it ends (README's exit codes).

uvicorn re-raises the signal that stopped it after its graceful shutdown, so a stop used to end
the process by that signal (or, with its handlers kept, exit 0 either way). Here SIGTERM (systemd,
`up`, a supervisor: an asked-for stop) is a clean exit 0, and SIGINT (Ctrl-C) is 130 like every
other command; either way open SSE streams are closed within `grace_s`.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading

import uvicorn

from captionbus.exitcodes import INTERRUPTED

SIGNAL_EXIT = {signal.SIGINT: INTERRUPTED, signal.SIGTERM: 0}


class Server(uvicorn.Server):
    """uvicorn.Server that remembers which signal stopped it (`exit_code`)."""

    exit_code = 0

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self._on_signal) for sig in SIGNAL_EXIT}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig, frame) -> None:
        self.exit_code = SIGNAL_EXIT.get(signal.Signals(sig), 0)
        self.handle_exit(sig, frame)


def config(app, host: str, port: int, *, grace_s: float = 3.0, lifespan: str = "auto") -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan=lifespan,
                          timeout_graceful_shutdown=grace_s)  # open SSE streams never end by themselves


async def serve(app, host: str, port: int, *, ready: asyncio.Event | None = None, grace_s: float = 3.0,
                lifespan: str = "auto") -> int:
    """Serve until stopped; the exit code the process should end with. `ready` is set once listening."""
    server = Server(config(app, host, port, grace_s=grace_s, lifespan=lifespan))
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if ready is not None and server.started:
        ready.set()
    await task
    if not server.started:
        raise OSError(f"cannot listen on {host}:{port} (in use, or not an address of this host)")
    return server.exit_code


def end_service(code: int) -> None:
    """End a service command with `serve`'s code: after Ctrl-C, say "interrupted" (as every
    command does) and exit 130; after SIGTERM, exit 0."""
    from captionbus.cli.common import end_of_service

    end_of_service(signal.SIGINT if code == INTERRUPTED else None)
    sys.exit(code)
