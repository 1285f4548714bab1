"""`captionbus dashboard`: serve at once, get on the bus with the read-only role when it is there.

The page, /healthz and /readyz answer from the first second; until the bus is reached (BusLink:
said once, retried with backoff) /readyz is 503 with the reason and the API answers 503. On each
new connection (the first, and one made from scratch after nats-py gave up reconnecting) the
board starts over on it; reconnects nats-py makes by itself keep the board."""
from __future__ import annotations

import asyncio

from captionbus.dashboard.app import Live, create_app
from captionbus.dashboard.auth import DEFAULT_LISTEN, check_bind
from captionbus.dashboard.board import Board
from captionbus.dashboard.downloads import Downloads
from captionbus.dashboard.metrics import Metrics
from captionbus.envs.stages import load_stage_map
from captionbus.web.buslink import BusLink
from captionbus.web.listen import parse_listen
from captionbus.web.serve import serve as serve_app
from captionbus.core.settings import Settings
from captionbus.core.settings import load as load_settings


async def serve(url: str, listen: str = DEFAULT_LISTEN, token: str | None = None,
                ready: asyncio.Event | None = None, downloads: bool = False, settings: Settings | None = None,
                operator: str | None = None) -> int:
    """Serve until stopped; the process's exit code (SIGINT 130, SIGTERM 0). `downloads`: offer
    download links where the credentials may read artifacts (captionbus.dashboard.downloads);
    off by default. `ready` is set once the page is served and the board is on the bus (the page
    itself answers from the first second). `operator`: the token that may cancel and retry
    (auth.Access); without it the dashboard is read-only."""
    host, port = parse_listen(listen)
    check_bind(host, token or operator)
    metrics = Metrics()
    live = Live()
    stages = sorted(load_stage_map())

    async def on_connect(nc) -> None:
        board = Board(nc, stages, metrics)
        gate = await Downloads.probe(nc.jetstream(), settings or load_settings()) if downloads else Downloads()
        await board.start()
        previous, live.board, live.downloads = live.board, board, gate
        if previous is not None:
            await previous.stop()

    link = BusLink(url, "captionbus-dashboard", [on_connect])
    live.waiting = link
    link.start()
    serving = asyncio.Event()

    async def tell_ready() -> None:  # serving and on the bus: what an in-process caller can use
        await serving.wait()
        await link.connected.wait()
        ready.set()

    telling = asyncio.create_task(tell_ready()) if ready is not None else None
    try:
        return await serve_app(create_app(live, metrics, token, operator=operator), host, port, ready=serving, lifespan="off")
    finally:
        if telling is not None:
            telling.cancel()
        if live.board is not None:
            await live.board.stop()
        await link.close()
