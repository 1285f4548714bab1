"""Every surface against every other, on one real local stack (issue 19): what the CLI, the
dashboard (/api/workers, /api/queues, /metrics, the job page), the gateway's SSE and webhook
deliveries say must be the same list of workers and the same history of a job.

The stack (tests/system/stack.py): a real nats-server; two hosts' worth of stage service
processes (CAPTIONBUS_HOST_ID `alpha` and `beta`): noop twice on alpha (replicas 0 and 1) and
once on beta, demux and vad on alpha, subtitle_gen and mux on beta, the real stages in their own
`common` env; the real coordinator; the gateway with a gateway-wide webhook subscriber (the
example receiver); the dashboard; the CLI as a subprocess. A job is created, cancelled while its
first noop node runs (a progress report of that attempt is stored right after its `cancelled`,
as a worker that has not yet seen the cancel sends it: no surface shows it), retried once its
webhook record is done, and completes; then the surfaces are compared."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from captionbus.client import submit
from captionbus.contracts import StageProgress, subjects
from captionbus.core.bus import event_msg_id
from captionbus.core.artifacts import ArtifactStore
from tests.integration.test_gateway_webhook_state import SECRET, receiver  # noqa: F401  (a fixture)
from tests.system.stack import LocalStack, until, webhook_log

PAIR = {"name": "pair", "nodes": {
    "first": {"stage": "noop", "inputs": {"media": "job.input"}, "outputs": ["media"], "params": {"sleep_s": 8}},
    "second": {"stage": "noop", "inputs": {"media": "first.media"}, "outputs": ["media"],
               "params": {"sleep_s": 0.3, "warn": "a warning"}}},
    "outputs": {"media": "second.media"}}
# (host, stage, replica): noop has two replicas on alpha.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER = Path(CHROMIUM).exists() and importlib.util.find_spec("playwright") is not None
FLEET = [("alpha", "noop", 0), ("alpha", "noop", 1), ("beta", "noop", 0), ("alpha", "demux", 0),
         ("alpha", "vad", 0), ("beta", "subtitle_gen", 0), ("beta", "mux", 0)]


def test_cli_dashboard_metrics_sse_and_webhooks_agree(nats_server, tmp_path, receiver):  # noqa: F811
    hooks, rec = receiver
    followers: list[subprocess.Popen] = []
    late_ids: set[str] = set()  # event ids of the late progress reports the test stored

    async def main():
        async with LocalStack(nats_server, tmp_path, fleet=FLEET, workflows={"pair": PAIR}, hooks=hooks,
                              secret=SECRET) as stack:
            workers = await stack.workers_agree()
            assert len(workers) == len(FLEET) and {w.split("/")[0] for w in workers} == {"alpha", "beta"}
            job_id = await cancel_then_retry(stack)
            await check_history(stack, job_id)
            await check_job_workers(stack, job_id)
            await check_record(stack, job_id)
            await stack.jobs_agree()
            if BROWSER:
                await check_pages(stack, job_id, workers)
            else:
                print("the browser check did not run: no playwright or no chromium")

    async def cancel_then_retry(stack: LocalStack) -> str:
        media = tmp_path / "clip.wav"
        media.write_bytes(b"RIFF" + os.urandom(2000))
        spec = await submit(stack.js, ArtifactStore(stack.settings("client"), stack.js), media, workflow="pair")
        job_id = spec.job_id

        async def running_first():
            rows = (await stack.dash.get("/api/workers")).json()
            return next((r for r in rows for c in r["current"] if c["job_id"] == job_id and c["node"] == "first"), None)
        holder = await until(running_first, 30, "a noop worker to run the first node")
        assert holder["stage"] == "noop"
        late = await late_progress_after_cancelled(stack, job_id)
        await asyncio.sleep(0.5)
        started = time.monotonic()
        assert (await stack.gw.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202

        async def let_go():
            rows = (await stack.dash.get("/api/workers")).json()
            return not any(c["job_id"] == job_id for r in rows for c in r["current"])
        await until(let_go, 10, "the worker to let the cancelled request go")
        # dashboard polls every 2 s: within 2 s of the cancel plus one poll
        assert time.monotonic() - started < 2.0 + 2.5
        await until(lambda: _status(stack, job_id, "cancelled"), 10, "cancelled")

        async def record_done():  # the job ended: its webhook record is done (a retry reopens it)
            records = (await stack.gw.get(f"/v1/jobs/{job_id}/webhooks")).json()["data"]
            return records and all(r["done"] for r in records)
        await until(record_done, 15, "the webhook record done at `cancelled`")
        await late_progress_dropped(stack, job_id, late)
        assert (await stack.gw.post(f"/v1/jobs/{job_id}/retry")).status_code == 202
        # A follower started now replays past `cancelled` (not the end any more) and ends by
        # itself at `completed`.
        followers.append(subprocess.Popen([sys.executable, "-m", "captionbus", "events", job_id, "--follow"],
                                          env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        await until(lambda: _status(stack, job_id, "completed"), 60, "completed after the retry")
        return job_id

    async def check_history(stack: LocalStack, job_id: str) -> None:
        read_at = time.monotonic()
        cli_events = await stack.history_agrees(job_id, webhook_log(rec))
        print(f"CLI, SSE, webhooks and the job page read in {time.monotonic() - read_at:.2f} s")
        ids = [e["event_id"] for e in cli_events]
        kinds = [e["kind"] for e in cli_events]
        print(f"job {job_id}: {len(ids)} events, {' '.join(k for k in kinds if k != 'stage_progress')}")
        # The late progress (stored between `cancelled` and `retry_requested`) is in no surface:
        # not in the replay, nor where SSE resumes after `cancelled`, nor in the reopened webhook
        # record's deliveries (history_agrees compared them; both resume after `cancelled`).
        assert late_ids and not late_ids & set(ids), "a late progress report shown after the retry"
        assert kinds[0] == "submitted" and kinds[-1] == "completed"
        for kind in ("cancel_requested", "cancelled", "retry_requested"):
            assert kind in kinds
        assert kinds.index("cancelled") < kinds.index("retry_requested") < len(kinds) - 1
        assert kinds.count("started") == 2  # the start and the restart
        cancelled_at = kinds.index("cancelled")
        # Nothing from the cancelled attempt's worker after `cancelled`: it stopped.
        after = [e for e in cli_events[cancelled_at:kinds.index("retry_requested")]
                 if e.get("node") == "first" and e.get("attempt") == 1]
        assert after == [], after

        out, err = await asyncio.to_thread(followers[0].communicate, timeout=20)
        assert followers[0].returncode == 0, err
        assert [json.loads(line)["event_id"] for line in out.splitlines()] == ids, "events --follow"
        # SSE resumed after `cancelled` with Last-Event-ID: exactly the rest.
        sse = await stack.sse(job_id)
        resumed = await stack.sse(job_id, last_id=sse[cancelled_at]["id"])
        assert [json.loads(e["data"])["event_id"] for e in resumed] == ids[cancelled_at + 1:]
        # The webhook record is done at `completed`.
        records = (await stack.gw.get(f"/v1/jobs/{job_id}/webhooks")).json()["data"]
        assert [(r["subscriber"], r["done"], r["cursor"]) for r in records] == [("audit", True, int(sse[-1]["id"]))]

        # The job page: the cancelled attempt is closed (no running bar), cancel and retry marked.
        page = (await stack.dash.get(f"/api/jobs/{job_id}")).json()
        assert page["status"] == "completed"
        first_attempts = {row["attempt"]: row["status"] for row in page["timeline"] if row["node"] == "first"}
        assert first_attempts == {1: "cancelled", 2: "completed"}
        assert [m["kind"] for m in page["marks"]] == [k for k in kinds if k in (
            "started", "cancel_requested", "cancelled", "retry_requested", "completed")]

    async def late_progress_after_cancelled(stack: LocalStack, job_id: str) -> dict:
        """A progress report of the cancelled attempt stored right after `cancelled`, as a worker
        that had not yet seen the cancel publishes it (its subject, its event, the real bus): sent
        the moment the `cancelled` event goes by, while the webhook record's reader still reads."""
        late: dict = {}

        async def on_cancelled(msg) -> None:
            if "event" not in late:
                late["event"] = StageProgress(job_id=job_id, stage="noop", node="first", attempt=1, fraction=0.9,
                                              message="late: the worker had not seen the cancel")
                late["ack"] = await stack.js.publish(subjects.job_event(job_id, "stage_progress"),
                                                     late["event"].model_dump_json().encode(),
                                                     headers={"Nats-Msg-Id": event_msg_id(late["event"])})
        late["watch"] = await stack.nc.subscribe(subjects.job_event(job_id, "cancelled"), cb=on_cancelled)
        return late

    async def late_progress_dropped(stack: LocalStack, job_id: str, late: dict) -> None:
        """The job's history ends at `cancelled` on every surface, though the bus stored a
        progress report after it: the webhooks' last delivery, SSE's last event, the CLI's
        replay, the job page's history; the job's record (gateway, CLI) stays cancelled."""
        checked_at = time.monotonic()
        await until(lambda: _true("ack" in late), 10, "the late progress report stored")
        await late["watch"].unsubscribe()
        late_ids.add(late["event"].event_id)
        sse, replay = await asyncio.gather(stack.sse(job_id), stack.cli("events", job_id))
        kinds = [json.loads(e["data"])["kind"] for e in sse]
        assert late["ack"].seq > int(sse[kinds.index("cancelled")]["id"]), \
            "the bus stored the progress report after `cancelled` (the case this checks)"
        assert kinds[-1] == "cancelled", f"SSE goes on after `cancelled`: {kinds[kinds.index('cancelled'):]}"
        assert [json.loads(line)["kind"] for line in replay.splitlines()][-1] == "cancelled", "events ID"
        hooks = [e for e, _ in rec.got if e["job_id"] == job_id]
        assert hooks[-1]["kind"] == "cancelled" and late_ids.isdisjoint(e["event_id"] for e in hooks), "webhooks"
        page = (await stack.dash.get(f"/api/jobs/{job_id}")).json()
        assert page["status"] == "cancelled" and page["history"][-1]["kind"] == "cancelled", "job page"
        assert await _status(stack, job_id, "cancelled"), "gateway job"
        status = await asyncio.to_thread(stack.cli_run, "status", job_id, "--json")  # not 0: the job did not complete
        assert json.loads(status.stdout)["status"] == "cancelled", "status --json"
        print(f"the late progress report checked on every surface in {time.monotonic() - checked_at:.2f} s")

    async def check_job_workers(stack: LocalStack, job_id: str) -> None:
        """job.json / the job page name the workers the Workers page lists."""
        page = (await stack.dash.get(f"/api/jobs/{job_id}")).json()
        workers = {r["worker_id"] for r in (await stack.dash.get("/api/workers")).json()}
        ran = {n["worker"]["worker_id"] for n in page["nodes"]}
        assert ran <= workers and all(w.split("/")[1] == "noop" for w in ran), ran
        state = json.loads(await stack.cli("status", job_id, "--json"))
        assert {n["worker"]["worker_id"] for n in state["nodes"].values()} == ran

    async def check_record(stack: LocalStack, job_id: str) -> None:
        """The record is a head plus a part per completed node (the KV); the CLI (`status --json`,
        `jobs --json`), the gateway (the job, the listing) and the dashboard's job page show the
        one whole record the library reads (client.job_state), and each completed node in it is
        what its applied StageCompleted said: what the record held inline before parts."""
        from captionbus.client import job_state
        from captionbus.contracts import ArtifactRef, NodeState, subjects
        from captionbus.dashboard.board import job_detail
        from captionbus.gateway.schemas import Job

        kv = await stack.js.key_value(subjects.JOBS_BUCKET)
        head = json.loads((await kv.get(job_id)).value)
        named = {node_id: v for node_id, v in head["nodes"].items() if isinstance(v, str)}
        whole = await job_state(stack.js, job_id)
        assert set(named) == {"first", "second"} and named == {n: node.part for n, node in whole.nodes.items()}
        for node_id, name in named.items():
            part = (await kv.get(subjects.job_part_key(job_id, name))).value
            assert NodeState.model_validate_json(part) == whole.nodes[node_id].model_copy(update={"part": None})
        shown = json.loads(whole.model_dump_json())
        assert json.loads(await stack.cli("status", job_id, "--json")) == shown, "status --json"
        listed = [json.loads(line) for line in (await stack.cli("jobs", "--json")).splitlines()]
        assert next(j for j in listed if j["spec"]["job_id"] == job_id) == shown, "jobs --json"
        job = (await stack.gw.get(f"/v1/jobs/{job_id}")).json()
        assert job == Job.of(whole).model_dump(mode="json") and job["nodes"]["first"]["env"], "gateway job"
        jobs = (await stack.gw.get("/v1/jobs", params={"limit": 10_000})).json()["data"]
        assert next(j for j in jobs if j["id"] == job_id) == job, "gateway job list"
        page = (await stack.dash.get(f"/api/jobs/{job_id}")).json()
        assert page["nodes"] == json.loads(json.dumps(job_detail(whole, [])["nodes"])), "dashboard job page"
        events = [json.loads(line) for line in (await stack.cli("events", job_id)).splitlines()]
        for node_id, node in whole.nodes.items():
            [event] = [e for e in events if e["kind"] == "stage_completed" and e["event_id"] in whole.applied
                       and e["node"] == node_id and e["attempt"] == node.attempt]
            assert node.outputs == {k: ArtifactRef.model_validate(v) for k, v in event["outputs"].items()}
            assert (node.worker, node.metrics, node.items) == (event["worker"], event["metrics"], event["items"])

    try:
        asyncio.run(asyncio.wait_for(main(), 300))
    finally:
        for follower in followers:
            if follower.poll() is None:
                follower.kill()
                follower.communicate()


async def check_pages(stack: LocalStack, job_id: str, workers: set[str]) -> None:
    """What a person sees in Chromium: the Workers page lists every worker process (5 stages,
    noop 3 times); the job page shows the cancel and the retry in its history and on the
    timeline, and no attempt still running on the completed job."""
    from playwright.async_api import async_playwright

    history = (await stack.dash.get(f"/api/jobs/{job_id}")).json()["history"]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await page.goto(f"{stack.dash.base_url}/#/workers")
            rows = page.locator("[data-testid=workers] tbody tr")
            await rows.nth(len(workers) - 1).wait_for(timeout=15_000)
            listed = await rows.evaluate_all("rows => rows.map(r => r.dataset.worker)")
            assert sorted(listed) == sorted(workers), listed
            await page.goto(f"{stack.dash.base_url}/#/job/{job_id}")
            table = page.locator("[data-testid=history] tbody tr")
            await table.nth(len(history) - 1).wait_for(timeout=15_000)
            kinds = await table.evaluate_all("rows => rows.map(r => r.dataset.kind)")
            assert kinds == [h["kind"] for h in history]
            assert {"cancel_requested", "cancelled", "retry_requested"} <= set(kinds)
            marks = await page.locator("[data-testid=marks] .gmark").evaluate_all("ms => ms.map(m => m.dataset.kind)")
            assert marks == [m for m in kinds if m in ("started", "cancel_requested", "cancelled", "retry_requested",
                                                       "completed")]
            bars = await page.locator("[data-testid=timeline] .gmeta[data-status]").all_inner_texts()
            assert bars and not any("running" in bar for bar in bars), bars
            assert any(bar.startswith("cancelled") for bar in bars), bars
            await page.screenshot(path=str(stack.root / "job-page.png"), full_page=True)
            print(f"job page: {stack.root / 'job-page.png'}")
        finally:
            await browser.close()


async def _status(stack: LocalStack, job_id: str, status: str) -> bool:
    return (await stack.gw.get(f"/v1/jobs/{job_id}")).json()["status"] == status


async def _true(value: bool) -> bool:
    return value


def test_a_reader_resumed_mid_history_reads_only_what_ends_a_job_and_a_refused_retry_reopens_nothing(
        nats_server, monkeypatch):
    """contracts.History on the real bus, with no fleet: the events are published as their
    publishers would (a worker's progress, the coordinator's ends, a tenant's retry_requested).

    A job with 20,001 progress events, cancelled, then a late progress report: a reader resumed
    after the `cancelled` (here `--since`: a webhook cursor and Last-Event-ID go the same way)
    learns the job had ended by reading only its terminal and `started` events, well within a
    HISTORY_READ_S of 0.5 s (reading every earlier event took longer than that); with no time
    for the read at all it raises rather than guessing. Then a `retry_requested` the coordinator
    refused (no `started` follows) and the old attempt's late report after it: no reader shows
    that report; after the coordinator's `started`, the new attempt's events are shown."""
    from datetime import UTC, datetime

    from captionbus import client
    from captionbus.contracts import JobCancelled, JobRetryRequested, JobStarted, StageRequested
    from captionbus.core.bus import BusError, connect, provision, publish_event

    job_id = "resumed1"

    def progress(i: int, attempt: int = 1) -> StageProgress:
        return StageProgress(job_id=job_id, stage="noop", node="first", attempt=attempt, fraction=0.5,
                             message=f"report {i}")

    async def since(js, at: datetime) -> list[str]:
        return [e.event_id async for e in client.follow(js, job_id, since=at, stop_when_caught_up=True)]

    async def main():
        nc = await connect(nats_server, "test")
        try:
            js = nc.jetstream()
            await provision(js)
            await publish_event(js, JobStarted(job_id=job_id, workflow="pair", nodes=["first"]))
            subject = subjects.job_event(job_id, "stage_progress")
            for i in range(20_001):  # a long film's reports, pipelined (core publishes the stream stores)
                await nc.publish(subject, progress(i).model_dump_json().encode())
            cancelled = JobCancelled(job_id=job_id)
            await publish_event(js, cancelled)  # acked: stored after every report
            await asyncio.sleep(0.01)
            after_cancel = datetime.now(UTC)
            late = progress(-1)
            await publish_event(js, late)
            monkeypatch.setattr(client, "HISTORY_READ_S", 0.5)
            started = time.monotonic()
            assert await since(js, after_cancel) == [], "the late report after `cancelled`, read from after it"
            took = time.monotonic() - started
            print(f"resumed after 20,002 earlier events: whether the job had ended read in {took:.3f} s")
            monkeypatch.setattr(client, "HISTORY_READ_S", 1e-6)
            try:
                await since(js, after_cancel)
            except BusError as e:
                assert "were not read within" in str(e)
            else:
                raise AssertionError("a read of the earlier kinds that did not finish answered")
            monkeypatch.setattr(client, "HISTORY_READ_S", 10.0)

            # A retry_requested the coordinator refused: the job stays ended for every reader.
            retry = JobRetryRequested(job_id=job_id)
            await publish_event(js, retry)
            stale = progress(-2)
            await publish_event(js, stale)
            replay = [e.event_id async for e in client.follow(js, job_id, stop_when_caught_up=True)]
            assert late.event_id not in replay and stale.event_id not in replay, "a late report shown"
            assert replay[-2:] == [cancelled.event_id, retry.event_id] and len(replay) == 20_004
            assert await since(js, after_cancel) == [retry.event_id], "resumed: only the retry request"
            # The coordinator accepted a retry: its `started` reopens the history.
            restarted = JobStarted(job_id=job_id, workflow="pair", nodes=["first"])
            await publish_event(js, restarted)
            again = StageRequested(job_id=job_id, stage="noop", node="first", attempt=2)
            await publish_event(js, again)
            assert await since(js, after_cancel) == [retry.event_id, restarted.event_id, again.event_id]
        finally:
            await nc.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_the_dashboards_live_feed_hides_late_events_of_a_job_that_ended_before_it_started(nats_server):
    """The dashboard's live feed reads new events only, so it never read the `cancelled` of a job
    that ended before it started: once the job records are loaded, every finished job is ended
    in its History, and a late progress report of that job (a worker that had not seen the
    cancel) is not fanned out; a running job's reports are, before and after it."""
    from captionbus.contracts import ArtifactRef, JobSpec, JobState, JobStatus
    from captionbus.core.bus import connect, provision, publish_event
    from captionbus.dashboard.board import Board

    async def main():
        nc = await connect(nats_server, "test")
        board = None
        try:
            js = nc.jetstream()
            await provision(js)
            kv = await js.key_value(subjects.JOBS_BUCKET)
            for job_id, status in (("ended1", JobStatus.cancelled), ("running1", JobStatus.running)):
                spec = JobSpec(job_id=job_id, input=ArtifactRef(key="0" * 64, name="a.mp4", size=1))
                await kv.put(job_id, JobState(spec=spec, status=status).model_dump_json().encode())
            board = Board(await connect(nats_server, "dashboard"), stages=[])
            feed = board.fanout.subscribe()
            await board.start()
            await asyncio.wait_for(board.jobs_loaded.wait(), 20)

            def report(job_id: str, message: str) -> StageProgress:
                return StageProgress(job_id=job_id, stage="noop", node="first", attempt=1, fraction=0.5, message=message)

            async def fanned_out(message: str, within: float) -> list[dict]:
                """The feed's events up to the one whose message is `message`."""
                got: list[dict] = []
                async with asyncio.timeout(within):
                    while True:
                        kind, data = await feed.get()
                        if kind == "event":
                            got.append(json.loads(data))
                            if got[-1].get("message") == message:
                                return got

            for i in range(100):  # the feed subscribes to new events: until it reads them
                await publish_event(js, report("running1", f"live {i}"))
                with contextlib.suppress(TimeoutError):
                    await fanned_out(f"live {i}", 0.2)
                    break
            else:
                raise AssertionError("the live feed never showed a running job's report")
            await publish_event(js, report("ended1", "late: the worker had not seen the cancel"))
            await publish_event(js, report("running1", "after"))
            got = await fanned_out("after", 10)
            assert [e["job_id"] for e in got if e["kind"] == "stage_progress"][-1:] == ["running1"]
            assert "ended1" not in {e["job_id"] for e in got}, got
        finally:
            if board is not None:
                await board.stop()
                await board.nc.close()
            await nc.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_follower_of_a_completed_job_ends_after_a_retry_request_the_coordinator_refuses(nats_server):
    """A tenant may publish `retry_requested` for its own completed job (not through the
    gateway's 409); the coordinator refuses it (only failed or cancelled jobs retry), so no
    `started` follows. A follower (`events ID --follow`, SSE, a webhook record the gateway reopens
    for the request) reads the request and ends at the job's end, from the start or resumed
    after `completed`, instead of waiting for a restart forever."""
    from captionbus import client
    from captionbus.contracts import (
        ArtifactRef,
        JobCompleted,
        JobRetryRequested,
        JobSpec,
        JobStarted,
        JobState,
        JobStatus,
    )
    from captionbus.core.bus import connect, provision, publish_event

    async def main():
        nc = await connect(nats_server, "test")
        try:
            js = nc.jetstream()
            await provision(js)
            job_id = "refused1"
            spec = JobSpec(job_id=job_id, input=ArtifactRef(key="0" * 64, name="a.mp4", size=1))
            await (await js.key_value(subjects.JOBS_BUCKET)).put(
                job_id, JobState(spec=spec, status=JobStatus.completed).model_dump_json().encode())
            for event in (JobStarted(job_id=job_id, workflow="pair", nodes=["first"]),
                          JobCompleted(job_id=job_id, outputs={}), JobRetryRequested(job_id=job_id)):
                await publish_event(js, event)
            started = time.monotonic()
            read = [(seq, e.kind) async for seq, e in client.job_events(js, job_id)]
            assert [kind for _, kind in read] == ["started", "completed", "retry_requested"]
            resumed = [kind async for _, e in client.job_events(js, job_id, read[1][0]) for kind in [e.kind]]
            assert resumed == ["retry_requested"]
            print(f"both reads ended {time.monotonic() - started:.2f} s after they began")
        finally:
            await nc.close()

    asyncio.run(asyncio.wait_for(main(), 20))
