"""A local stack with every surface, and the checks that compare the surfaces with each other
and with the bus (issue 19). Used by tests/integration/test_surfaces.py (one scripted job) and
tests/system/test_model.py (seeded random operations).

The stack: a real nats-server (the test's); stage service processes of two hosts (distinct
CAPTIONBUS_HOST_ID), `fleet` = [(host, stage, replica)], noop run by the test's interpreter and
real stages in their own environments; the real coordinator in-process with test workflows; the
gateway (uvicorn in a thread) with one gateway-wide webhook subscriber; the dashboard; the CLI as
subprocesses."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from captionbus.dashboard.serve import serve as serve_dashboard
from captionbus.gateway.app import GatewayConfig
from captionbus.gateway.dispatch import Subscriber
from captionbus.stack import ServiceProcess, start_service, stop_services, wait_ready
from captionbus.client import whole_record
from captionbus.contracts import JobState, subjects, worker_identity
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import Coordinator
from captionbus.core.bus import connect, provision
from captionbus.core.settings import PROJECT_ROOT, Settings
from captionbus.core.tasks import cancel_and_wait
from tests.gatewaytools import free_port, running_gateway
from tests.integration.test_dashboard import _until as until
from tests.integration.test_gateway import parse_sse

UNLISTED_ON_JOB_PAGE = ("stage_progress",)


class LocalStack:
    def __init__(self, url: str, root: Path, *, fleet: list[tuple[str, str, int]], workflows: dict[str, dict],
                 hooks: str, secret: str, ack_wait: float = 30.0):
        self.url, self.root, self.fleet, self.ack_wait = url, root, fleet, ack_wait
        self.workflows = {name: Workflow.from_dict(data) for name, data in workflows.items()}
        self.hooks, self.secret = hooks, secret
        self.env = {**os.environ, "NATS_URL": url, "CAPTIONBUS_HOME": str(root / "cli"), "PYTHONPATH": str(PROJECT_ROOT)}
        self.services: list[ServiceProcess] = []
        self._exit = contextlib.AsyncExitStack()

    def settings(self, who: str, host: str | None = None) -> Settings:
        return Settings(home=self.root / who, nats_url=self.url, artifacts_mode="object", host_id=host or who)

    async def __aenter__(self) -> "LocalStack":
        exit_stack = self._exit
        self.nc = await connect(self.url, "t-stack")
        exit_stack.push_async_callback(self.nc.close)
        self.js = self.nc.jetstream()
        await provision(self.js)
        self._start_fleet()
        exit_stack.callback(stop_services, self.services)
        # The coordinator, the gateway and the dashboard each have an exit stack of their own, so
        # the model-based test can restart them (restart_coordinator/_gateway/_dashboard).
        self._parts: dict[str, contextlib.AsyncExitStack] = {}
        exit_stack.push_async_callback(self._stop_parts)
        await self._start_coordinator()
        await wait_ready(self.nc, self.services, timeout=120)
        await self._start_gateway()
        await self._start_dashboard()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._exit.aclose()

    async def _stop_parts(self) -> None:
        for name in list(self._parts):
            await self._parts.pop(name).aclose()

    async def _part(self, name: str) -> contextlib.AsyncExitStack:
        """A fresh exit stack for part `name`, after closing (stopping) the one it had."""
        if name in self._parts:
            await self._parts.pop(name).aclose()
        self._parts[name] = contextlib.AsyncExitStack()
        return self._parts[name]

    async def _start_coordinator(self) -> None:
        part = await self._part("coordinator")
        await part.enter_async_context(Coordinator(self.nc, graphs=self.workflows, tick_interval_s=0.2,
                                                   event_ack_wait_s=self.ack_wait))

    async def _start_gateway(self) -> None:
        """uvicorn in a thread on a free port (a restart gets a new port and a new client)."""
        part = await self._part("gateway")
        config = GatewayConfig(
            settings=self.settings("gw"), nats_url=self.url, webhook_allow=[self.hooks],
            webhook_secret=self.secret.encode(), webhook_lease_s=5,
            webhook_subscribers=[Subscriber(name="audit", url=f"{self.hooks}audit/")])
        self.gateway = await part.enter_async_context(_off_the_loop(running_gateway(config)))
        self.gw = await part.enter_async_context(httpx.AsyncClient(base_url=self.gateway, timeout=15))

    async def _start_dashboard(self) -> None:
        part = await self._part("dashboard")
        port = free_port()
        ready = asyncio.Event()
        dashboard = asyncio.create_task(serve_dashboard(self.url, f"127.0.0.1:{port}", None, ready))
        part.push_async_callback(_cancelled, dashboard)
        await asyncio.wait_for(ready.wait(), 30)
        self.dash = await part.enter_async_context(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15))

    async def restart_coordinator(self) -> None:
        """Stop the coordinator and start a new one on the same bus (its durable consumer and the
        jobs' KV records carry on), as a supervisor restarts a crashed one."""
        await self._start_coordinator()

    async def restart_gateway(self) -> None:
        """Stop the gateway (its webhook leases lapse after webhook_lease_s) and start another."""
        await self._start_gateway()

    async def restart_dashboard(self) -> None:
        """Stop the dashboard and start another, which rebuilds its view from the bus."""
        await self._start_dashboard()

    def _start_fleet(self) -> None:
        self.services.extend(self._start(host, stage, replica) for host, stage, replica in self.fleet)

    def _start(self, host: str, stage: str, replica: int) -> ServiceProcess:
        from captionbus.envs import env_for_stage, interpreter_for_stage

        if stage == "noop":  # a test stage: no env of its own, the test's interpreter runs it
            env, interpreter = "test", Path(sys.executable)
        else:
            env, interpreter = env_for_stage(stage), interpreter_for_stage(stage)
        return start_service(stage, env, interpreter, self.url, self.settings(f"{host}-{stage}-{replica}", host),
                             replica=replica, extra_env={"CAPTIONBUS_ACK_WAIT": str(self.ack_wait)})

    async def kill_and_restart(self, index: int) -> ServiceProcess:
        """kill -9 fleet member `index` (its requests come back after ack_wait) and start the same
        host/stage/replica again, as a supervisor would: a new process, so a new worker id."""
        old = self.services[index]
        old.process.kill()
        await asyncio.to_thread(old.process.wait)
        self.services[index] = new = self._start(*self.fleet[index])
        self.services.append(old)  # stopped with the rest (already dead: nothing to do)
        await wait_ready(self.nc, [new], timeout=60)
        return new

    def expected_workers(self) -> set[str]:
        return {worker_identity(host, stage, str(replica), svc.process.pid)
                for (host, stage, replica), svc in zip(self.fleet, self.services)}

    # -- the surfaces ----------------------------------------------------------------------------
    def cli_run(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "captionbus", *args], env=self.env, capture_output=True,
                              text=True, timeout=120)
        assert "Traceback" not in done.stderr, (args, done.stderr)
        return done

    def cli_sync(self, *args: str) -> subprocess.CompletedProcess:
        done = self.cli_run(*args)
        assert done.returncode == 0, (args, done.stderr)
        return done

    def cli_sync_status(self, *args: str) -> int:
        """The CLI's exit status (a refused cancel or retry is not 0)."""
        return self.cli_run(*args).returncode

    async def cli(self, *args: str) -> str:
        return (await asyncio.to_thread(self.cli_sync, *args)).stdout

    async def sse(self, job_id: str, last_id: str | None = None) -> list[dict]:
        """The gateway's SSE stream of a finished job, read until the gateway closes it (it must)."""
        headers = {"Last-Event-ID": last_id} if last_id else {}
        lines = []
        async with asyncio.timeout(20):
            async with self.gw.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    lines.append(line)
        return parse_sse(lines + [""])

    async def kv_states(self) -> dict[str, JobState]:
        """Every job's whole record (the KV's records with their parts read in), by job id."""
        kv = await self.js.key_value("cb_jobs")
        try:
            keys = await kv.keys()
        except Exception:  # NoKeysError: an empty bucket
            return {}
        states = {}
        for key in filter(subjects.is_job_key, keys):
            head = JobState.model_validate_json((await kv.get(key)).value)
            states[key] = await whole_record(self.js, head)
        return states

    # -- invariants ------------------------------------------------------------------------------
    async def workers_agree(self) -> set[str]:
        """CLI `workers`, dashboard /api/workers (live rows), /api/queues and /metrics list the
        workers the stack started, one each; their ids."""
        expected = self.expected_workers()
        from_cli = [w["metadata"]["worker_id"] for w in json.loads(await self.cli("workers", "--json"))]
        assert sorted(from_cli) == sorted(expected), "captionbus workers"

        async def dashboard_sees_all():
            rows = (await self.dash.get("/api/workers")).json()
            return rows if sorted(r["worker_id"] for r in rows if r["state"] != "lost") == sorted(expected) else None
        rows = await until(dashboard_sees_all, 15, "the dashboard to list every worker")
        live = {(h, s, str(r)) for (h, s, r), svc in zip(self.fleet, self.services) if svc.alive()}
        assert {(r["host"], r["stage"], r["replica"]) for r in rows if r["state"] != "lost"} == live
        per_stage = Counter(stage for _, stage, _ in live)
        queues = {q["stage"]: q for q in (await self.dash.get("/api/queues")).json()}
        for stage, n in per_stage.items():
            if stage in queues:  # stages the dashboard knows (config) or the requests stream has
                assert queues[stage]["workers"] == n, f"/api/queues workers of {stage}"
        samples: Counter = Counter()
        for family in text_string_to_metric_families((await self.dash.get("/metrics")).text):
            if family.name == "captionbus_workers":
                for sample in family.samples:
                    if sample.labels["state"] != "lost":
                        samples[sample.labels["stage"]] += int(sample.value)
        assert samples == per_stage, "/metrics captionbus_workers"
        return expected

    async def jobs_agree(self) -> dict[str, str]:
        """The job lists of the CLI, the gateway and the dashboard equal the KV: job id -> status."""
        kv = {job_id: state.status.value for job_id, state in (await self.kv_states()).items()}
        from_cli = {s["spec"]["job_id"]: s["status"] for s in map(json.loads, (await self.cli("jobs", "--json")).splitlines())}
        assert from_cli == kv, "captionbus jobs"
        gateway = {j["id"]: j["status"] for j in (await self.gw.get("/v1/jobs", params={"limit": 10_000})).json()["data"]}
        assert gateway == kv, "gateway /v1/jobs"

        async def dashboard_agrees():
            rows, page = {}, 1
            while True:
                body = (await self.dash.get("/api/jobs", params={"page": page})).json()
                rows.update({j["job_id"]: j["status"] for j in body["jobs"]})
                if page * body["page_size"] >= body["total"]:
                    return rows == kv
                page += 1
        await until(dashboard_agrees, 10, "the dashboard's job list to equal the KV")
        return kv

    async def history_agrees(self, job_id: str, webhook_events) -> list[dict]:
        """One finished job's events: CLI `events ID` (replay), SSE, webhook deliveries and the job
        page (all but progress) are the same events in the same order; returns the CLI's."""
        cli_events = [json.loads(line) for line in (await self.cli("events", job_id)).splitlines()]
        ids = [e["event_id"] for e in cli_events]
        assert len(ids) == len(set(ids)), f"{job_id}: an event twice"
        sse = await self.sse(job_id)
        assert [json.loads(e["data"])["event_id"] for e in sse] == ids, f"{job_id}: SSE"

        async def delivered():
            got = webhook_events(job_id)
            return got if len(got) >= len(ids) else None
        got = await until(delivered, 30, f"every webhook delivery of {job_id}")
        assert [event_id for _, event_id in got] == ids, f"{job_id}: webhook deliveries"
        assert [seq for seq, _ in got] == [int(e["id"]) for e in sse], f"{job_id}: webhook sequences"

        page = (await self.dash.get(f"/api/jobs/{job_id}")).json()
        listed = [(int(e["id"]), json.loads(e["data"])["event_id"]) for e in sse
                  if e["event"] not in UNLISTED_ON_JOB_PAGE]
        assert [(h["seq"], h["event_id"]) for h in page["history"]] == listed, f"{job_id}: job page history"
        assert all(row["end"] for row in page["timeline"]), f"{job_id}: an open attempt on a finished job's page"
        return cli_events


@contextlib.asynccontextmanager
async def _off_the_loop(context):
    """A blocking context manager (running_gateway waits for uvicorn's start and joins its
    thread) entered and left in a worker thread, so the coordinator and the dashboard on this
    loop run on meanwhile."""
    value = await asyncio.to_thread(context.__enter__)
    try:
        yield value
    finally:
        await asyncio.to_thread(context.__exit__, None, None, None)


async def _cancelled(task: asyncio.Task) -> None:
    """Cancel `task` and wait for it to end (cancelling again if it lost a cancellation:
    captionbus.core.tasks): its cancellation is not raised here, ours is
    (contextlib.suppress(CancelledError) around `await task` swallowed both)."""
    await cancel_and_wait([task])


def webhook_log(rec) -> Any:
    """job_id -> [(sequence, event_id)] of what the example receiver got, each delivery once."""
    def events(job_id: str) -> list[tuple[int, str]]:
        with rec.lock:
            got = {h["X-Captionbus-Delivery"]: (int(h["X-Captionbus-Sequence"]), e["event_id"])
                   for e, h in rec.got if e["job_id"] == job_id}
        return sorted(got.values())
    return events
