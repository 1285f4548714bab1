"""A long-running web service's NATS connection: the service is up before the bus is.

`captionbus gateway` and `captionbus dashboard` used to connect before serving and exit at once
(the gateway with a full BusError traceback) when started a second before the bus. Now they
serve at once: `/healthz` says the process is alive, `/readyz` answers 503 with the reason until
`BusLink` has connected. It says once (a warning) that the bus is not there, retries with
backoff (0.5 s doubling to 10 s; each later failure is a debug line), and says when it got
through. nats-py reconnects a live connection by itself; when it gives up (the bus was gone for
longer than `reconnect_attempts` cover) the connection closes and BusLink connects again from
scratch, running the `on_connect` hooks again (subscriptions, watchers on the new connection).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.client import Client as NATS

from captionbus.core.bus import connect, redact, require_provisioned
from captionbus.core.retry import RetryPolicy
from captionbus.core.tasks import cancel_and_wait

log = structlog.get_logger("captionbus.web")

BACKOFF = RetryPolicy(initial_s=0.5, multiplier=2.0, max_s=10.0)
PROVISION_TIMEOUT_S = 10.0


class BusLink:
    def __init__(self, url: str, name: str, on_connect: list[Callable[[NATS], Awaitable[None]]] | None = None,
                 backoff: RetryPolicy = BACKOFF, check_every_s: float = 1.0):
        self.url, self.name = url, name
        self.on_connect = list(on_connect or [])
        self.backoff, self.check_every_s = backoff, check_every_s
        self.nc: NATS | None = None
        self.reason = f"connecting to NATS at {redact(url)}"
        self.connected = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def not_ready_reason(self) -> str:
        if self.nc is not None and not self.nc.is_closed and not self.nc.is_connected:
            return f"not connected to NATS at {redact(self.url)}: reconnecting"
        return self.reason

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def run(self) -> None:
        attempt = 0
        while True:
            if self.nc is not None and not self.nc.is_closed:
                await asyncio.sleep(self.check_every_s)
                continue
            if self.nc is not None:
                log.warning("NATS connection closed; connecting again", client=self.name)
                self.nc, attempt = None, 0
                self.connected.clear()
            try:
                nc = await connect(self.url, self.name)
                try:
                    await asyncio.wait_for(require_provisioned(nc.jetstream()), PROVISION_TIMEOUT_S)
                    for hook in self.on_connect:
                        await hook(nc)
                except BaseException:
                    # shielded: close() ends even when this task is cancelled again meanwhile
                    # (core.tasks.cancel_and_wait re-cancels every 0.5 s), so no connection is left open
                    with contextlib.suppress(Exception):
                        await asyncio.shield(nc.close())
                    raise
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001  BusError, timeouts, a bus not provisioned yet: all "not yet"
                attempt += 1
                delay = self.backoff.delay(attempt)
                self.reason = f"no bus yet: {e}"
                if attempt == 1:
                    log.warning("the bus is not there yet; retrying with backoff until it is", client=self.name,
                                url=redact(self.url), reason=str(e))
                else:
                    log.debug("bus still not there", client=self.name, attempt=attempt, retry_in_s=delay)
                await asyncio.sleep(delay)
                continue
            if attempt:
                log.warning("connected to the bus", client=self.name, url=redact(self.url), after_attempts=attempt + 1)
            self.nc, attempt = nc, 0
            self.connected.set()

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])  # again if it lost the cancellation (core.tasks)
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)
