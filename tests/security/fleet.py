"""A secured fleet for attack tests: nats-server with exactly the users and permission blocks of
deploy/nats/roles.conf (tests/natsroles.py), the coordinator with a result secret, a noop stage
worker under the `worker` user, and one completed job whose output (random bytes the worker
wrote, a distinct object) and input are fetched from the bus before and after each attack.

Everything here is real: the server, JetStream, the coordinator, the stage runtime, the
artifact store. An attacker is just another connection with one ordinary credential.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from captionbus.authcallout import Callout, read_users
from captionbus.client import acting_for, artifacts_of, job_state, submit
from captionbus.contracts import JobState, tenant_of
from captionbus.coordinator.decide import Policy
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import Coordinator
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import StagePolicy, connect, provision
from captionbus.core.settings import Settings
from captionbus.services.noop.stage import STAGE as NOOP
from captionbus.services.runtime.serve import serve
from tests.natsroles import CALLOUT_USER, callout_server, roles_server
from tests.security.attacks import WRITERS  # noqa: F401  (the tests import it from here)

# Every ordinary role, with the block roles.conf gives it.
ROLES = {"coordinator": "COORDINATOR", "worker": "WORKER", "worker-asr": "WORKER_ASR", "client": "CLIENT",
         "gateway": "HTTP_GATEWAY", "dashboard": "DASHBOARD", "dashboard_downloads": "DASHBOARD_DOWNLOADS",
         "dashboard_operator": "DASHBOARD_OPERATOR", "gc": "GC"}
# Behind the auth callout, a second client login: another tenant (captionbus.authcallout.read_users).
# Not with static users: there it would share the CLIENT block's reply prefix `_INBOX_client`.
CALLOUT_ROLES = {**ROLES, "rival": "CLIENT"}
OUTPUT_BYTES = 300_000

GRAPHS = {"made": Workflow.from_dict({
    "name": "made",
    "nodes": {"noop": {"inputs": {"media": "job.input"}, "outputs": ["out"],
                       "params": {"write_bytes": OUTPUT_BYTES}}},
    "outputs": {"out": "noop.out"}}),
    # the same, with its worker busy for 6 s: an attacker acts while the request is delivered
    "slow": Workflow.from_dict({
        "name": "slow",
        "nodes": {"noop": {"inputs": {"media": "job.input"}, "outputs": ["out"],
                           "params": {"write_bytes": OUTPUT_BYTES, "sleep_s": 6.0}}},
        "outputs": {"out": "noop.out"}})}


@dataclass
class Fleet:
    tmp: Path
    urls: dict[str, str]
    log: Path
    nc: dict = field(default_factory=dict)
    js: dict = field(default_factory=dict)
    fetches: int = 0
    callout: Callout | None = None  # the auth callout that let every connection in (callout mode)

    def tenant(self, user: str = "client") -> str | None:
        """The tenant a client login acts for: behind the callout its user name, else none."""
        return user if self.callout is not None else None

    def job(self, name: str, user: str = "client") -> str:
        """The id of job `name` as `user` submits it: in its tenant behind the callout."""
        tenant = self.tenant(user)
        return name if tenant is None or tenant_of(name) == tenant else f"{tenant}_{name}"

    def settings(self, user: str, home: str) -> Settings:
        return Settings(home=self.tmp / home, nats_url=self.urls[user], artifacts_mode="object",
                        nats_auth_callout=self.callout is not None)

    async def connect(self, user: str, name: str):
        """A new connection with `user`'s credential (in callout mode, with a key of its own)."""
        return await connect(self.urls[user], name, self.settings(user, f"conn-{name}"))

    async def run_job(self, job_id: str, size: int = 200_000) -> tuple[JobState, dict[str, bytes]]:
        """Submit a job as the client, wait until it completes, and fetch its input and outputs
        from the bus (a fresh local root, so every byte comes through the object store)."""
        media = await self.submit(job_id, size)
        state = await self.wait(self.job(job_id), "completed")
        fetched = await self.fetch(state)
        assert fetched["job.input"] == media.read_bytes()
        assert len(fetched["out"]) == OUTPUT_BYTES
        return state, fetched

    async def submit(self, job_id: str, size: int = 200_000, workflow: str = "made") -> Path:
        """Submit a job of random bytes as the client; returns its input file."""
        media = self.tmp / f"{job_id}.wav"
        media.write_bytes(b"RIFF" + os.urandom(size))
        store = ArtifactStore(self.settings("client", f"client-{job_id}"), self.js["client"])
        with acting_for(self.tenant()):
            await submit(self.js["client"], store, media, workflow=workflow, job_id=self.job(job_id))
        return media

    async def wait(self, job_id: str, status: str, timeout: float = 30) -> JobState:
        deadline = time.monotonic() + timeout
        job_id = self.job(job_id)
        with acting_for(self.tenant()):
            while (state := await job_state(self.js["client"], job_id)) is None or state.status.value != status:
                assert time.monotonic() < deadline, f"job {job_id} not {status}: {state}"
                await asyncio.sleep(0.1)
        return state

    async def fetch(self, state: JobState) -> dict[str, bytes]:
        """The job's input and outputs as the client fetches them, each time into a new root."""
        self.fetches += 1
        store = ArtifactStore(self.settings("client", f"fetch-{self.fetches}"), self.js["client"])
        with acting_for(self.tenant()):  # behind the callout: as the tenant's client, in its namespace
            store = artifacts_of(store, state.job_id)
        refs = {"job.input": state.spec.input, **state.outputs}
        return {name: (await store.get(ref)).read_bytes() for name, ref in refs.items()}


@contextlib.asynccontextmanager
async def _worker(fleet: Fleet) -> AsyncIterator[None]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(NOOP, fleet.settings("worker", "worker"), fleet.urls["worker"],
                                     env_name="security", stop=stop, ready=ready,
                                     policy=StagePolicy(ack_wait=5.0, max_deliver=3)))
    await asyncio.wait({task, asyncio.ensure_future(ready.wait())}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def _callout_server(tmp: Path, accounts_edit=None) -> AsyncIterator[tuple[dict[str, str], Path, Callout]]:
    """callout_server() with the callout answering (captionbus.authcallout, as `captionbus
    auth-callout run` runs it) on a connection of the callout's own user. accounts_edit: the
    accounts file's text -> the text the callout reads instead."""
    with callout_server(tmp, CALLOUT_ROLES) as (urls, log, accounts, seed):
        if accounts_edit is not None:
            accounts.write_text(accounts_edit(accounts.read_text()))
        callout = Callout(read_users(accounts), seed)
        nc = await connect(urls[CALLOUT_USER], "auth-callout", Settings(nats_auth_callout=False))
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(callout.serve(nc, stop, ready))
        await asyncio.wait_for(ready.wait(), 10)
        try:
            yield urls, log, callout
        finally:
            stop.set()
            await task
            await nc.close()


@contextlib.asynccontextmanager
async def _server(tmp: Path, callout: bool, accounts_edit=None) -> AsyncIterator[tuple[dict[str, str], Path, Callout | None]]:
    if callout:
        async with _callout_server(tmp, accounts_edit) as served:
            yield served
    else:
        with roles_server(tmp, ROLES) as (urls, log):
            yield urls, log, None


@contextlib.asynccontextmanager
async def secured_fleet(tmp: Path, *, worker: bool = True, callout: bool = False,
                        accounts_edit=None) -> AsyncIterator[Fleet]:
    """callout: connections are let in by the auth callout (each its own reply prefix), not by
    the server's user table; accounts_edit: see _callout_server."""
    async with _server(tmp, callout, accounts_edit) as (urls, log, authority):
        fleet = Fleet(tmp, urls, log, callout=authority)
        try:
            for user in CALLOUT_ROLES if callout else ROLES:
                fleet.nc[user] = await fleet.connect(user, f"security-{user}")
                fleet.js[user] = fleet.nc[user].jetstream()
            await provision(fleet.js["coordinator"])
            async with Coordinator(fleet.nc["coordinator"], graphs=GRAPHS, tick_interval_s=0.2,
                                   policy=Policy(result_secret=b"security-tests")):
                if worker:
                    async with _worker(fleet):
                        yield fleet
                else:
                    yield fleet
        finally:
            for nc in fleet.nc.values():
                with contextlib.suppress(Exception):
                    await nc.close()


def start_worker(fleet: Fleet):
    """The noop worker, for a test that started the fleet without one."""
    return _worker(fleet)
