"""Speaker turns on the dashboard's job page (issue 21), in Debian's Chromium driven by Playwright,
against a `captionbus dashboard` process logged in as deploy/nats/roles.conf's read-only `dashboard`
user (it may read job state and events, never an artifact) on a real nats-server, with a real
coordinator (the `coordinator` user) and the client's submit (the `client` user).

A job of a one-node workflow (diarization over the input) runs through the coordinator; the test
plays the diarization worker as the `worker` user: it stores a turns.json (SpeakerTurns) in the
object store and publishes the StageCompleted naming it with the turns' bounded copy
(`speaker_turns`, TurnSummary.of, as the stage does through the runtime). The page draws what the
bus recorded on that node: one bar per turn on the film's time axis (left and width in proportion
to the film; a zero-length turn that shares its start with the next still gets its own bar), one
row per speaker with its seconds of speech; the JSON behind it equals the artifact's turns. A node
that completed with no turns on its record (a worker older than the field) is a 404 the page shows,
never an empty lane. tests/e2e/test_speakers.py checks the same lane against a job the real
diarization stage ran."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from captionbus.client import with_record_parts
from captionbus.contracts import JobSpec, JobState, JobStatus, JobSubmitted, StageCompleted, StageRequest, subjects
from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns, TurnSummary
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import Coordinator
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import connect, provision
from captionbus.core.settings import Settings
from tests.dashboardtools import lane_of, start_dashboard
from tests.integration.test_coordinator import INPUT, POLICY, FakeWorker, publish_event
from tests.natsroles import roles_server, violations

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="apt-get install chromium")

USERS = {"coordinator": "COORDINATOR", "worker": "WORKER", "client": "CLIENT", "dashboard": "DASHBOARD"}
GRAPH = Workflow.from_dict({
    "name": "who",
    "nodes": {"diarization": {"inputs": {"audio": "job.input", "regions": "job.input"}, "outputs": ["turns"]}},
    "outputs": {"turns": "diarization.turns"},
})
TURNS = SpeakerTurns(duration=40.0, speakers=["Anna", "SPEAKER_01"], requested="auto",
                     models={"embedder": "campplus (campplus_cn_en_common.pt, 192-d)", "regions": "silero"},
                     turns=[SpeakerTurn(start=1.0, end=9.0, speaker="Anna"),
                            SpeakerTurn(start=9.0, end=9.0, speaker="SPEAKER_01"),  # shares its start with the next
                            SpeakerTurn(start=9.0, end=21.0, speaker="SPEAKER_01"),
                            SpeakerTurn(start=22.0, end=30.0, speaker="Anna")])


def run_jobs(urls: dict[str, str], home: Path) -> list[str]:
    """Two jobs through a real coordinator: the first answered as the diarization stage answers
    (turns.json stored, its TurnSummary on the completion), the second as a worker older than
    StageCompleted.speaker_turns (the artifact only)."""

    class Worker(FakeWorker):
        async def answer(self, summary: bool, timeout: float = 20.0, **_) -> StageRequest:
            sub = await self.sub()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    msgs = await sub.fetch(1, timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                request = StageRequest.model_validate_json(msgs[0].data)
                turns = home / "turns.json"
                turns.write_text(TURNS.model_dump_json())
                ref = await store.put(turns, name="turns.json")
                await publish_event(self.js, StageCompleted(
                    job_id=request.job_id, stage=request.stage, node=request.node, attempt=request.attempt,
                    outputs={"turns": ref}, worker={"name": "test"},
                    speaker_turns=TurnSummary.of(TURNS) if summary else None), f"{request.key}.completed")
                await msgs[0].ack()
                return request
            raise AssertionError("no diarization request came")

    async def go() -> list[str]:
        home.mkdir(parents=True, exist_ok=True)
        coordinator, worker, client = [await connect(urls[u], f"t-{u}") for u in ("coordinator", "worker", "client")]
        await provision(coordinator.jetstream())
        nonlocal store
        store = ArtifactStore(Settings(home=home, nats_url=urls["worker"], artifacts_mode="object", host_id="worker"),
                              worker.jetstream())
        kv = await client.jetstream().key_value(subjects.JOBS_BUCKET)
        done = []
        try:
            async with Coordinator(coordinator, graphs={"who": GRAPH}, policy=POLICY, tick_interval_s=0.2):
                for job_id, summary in (("job-who", True), ("job-old", False)):
                    spec = JobSpec(job_id=job_id, workflow="who", input=INPUT, options={"diarization": {"speakers": "auto"}})
                    await publish_event(client.jetstream(), JobSubmitted(job_id=job_id, spec=spec), f"{job_id}.submitted")
                    await Worker(worker.jetstream(), "diarization").answer(summary)
                    deadline = time.monotonic() + 20
                    while (state := JobState.model_validate_json((await kv.get(job_id)).value)).status \
                            != JobStatus.completed:
                        assert time.monotonic() < deadline, "the job did not complete"
                        await asyncio.sleep(0.1)
                    # the node is a part of its own and its summary another, each written once;
                    # the record names the node's, the node the summary's, and the client
                    # (`status --json`, job.json) shows the summary on the node
                    name = json.loads((await kv.get(job_id)).value)["nodes"]["diarization"]
                    node = json.loads((await kv.get(subjects.job_part_key(job_id, name))).value)
                    key = (subjects.job_part_key(job_id, subjects.part_name(TurnSummary.of(TURNS).model_dump_json().encode()))
                           if summary else None)
                    assert "speaker_turns" not in node and node.get("speaker_turns_key") == key
                    shown = await with_record_parts(client.jetstream(), state)
                    assert shown.nodes["diarization"].speaker_turns == (TurnSummary.of(TURNS) if summary else None)
                    done.append(job_id)
            return done
        finally:
            for nc in (coordinator, worker, client):
                await nc.close()

    store = None
    return asyncio.run(go())


def test_the_read_only_dashboard_shows_who_speaks_when_from_the_job_state(tmp_path):
    with roles_server(tmp_path / "bus", USERS) as (urls, server_log):
        new_job, old_job = run_jobs(urls, tmp_path / "worker")
        dashboard, base = start_dashboard(urls["dashboard"], tmp_path / "dash", tmp_path / "dash.log")
        try:
            lane = lane_of(base, new_job).json()
            assert lane["node"] == "diarization" and lane["duration"] == 40.0
            assert lane["turns"] == [t.model_dump() for t in TURNS.turns]  # the artifact's turns, as they are
            assert (lane["turns_total"], lane["turns_truncated"]) == (4, False)
            assert [(s["label"], s["seconds"], s["turns"]) for s in lane["speakers"]] == [("Anna", 16.0, 2),
                                                                                       ("SPEAKER_01", 12.0, 2)]
            old = lane_of(base, old_job)
            assert old.status_code == 404 and "completed without speaker turns on its record" in old.json()["error"]["message"]
            assert httpx.get(f"{base}/api/jobs/nope/speakers", timeout=10).status_code == 404
            output = httpx.get(f"{base}/api/jobs/{new_job}/outputs/turns", timeout=10)
            assert output.status_code == 403  # this dashboard reads no artifact: the lane came from the job state

            with playwright.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"{base}/#/job/{new_job}")
                turns = page.locator("[data-testid=speakers] .turn")
                turns.first.wait_for(timeout=20_000)
                assert turns.count() == 4  # one bar per turn, two of them starting at 9.0 s
                assert [turns.nth(i).get_attribute("data-speaker") for i in range(4)] == [
                    "Anna", "SPEAKER_01", "SPEAKER_01", "Anna"]
                track = page.locator("[data-testid=speakers] .gtrack.lane").bounding_box()
                for i, turn in enumerate(TURNS.turns):  # placed on the film's axis: 40 s across the track
                    box = turns.nth(i).bounding_box()
                    assert abs((box["x"] - track["x"]) / track["width"] - turn.start / 40) < 0.01, (i, box, track)
                    if turn.end > turn.start:
                        assert abs(box["width"] / track["width"] - (turn.end - turn.start) / 40) < 0.01, (i, box, track)
                colors = [turns.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(4)]
                assert colors[0] == colors[3] != colors[2]
                assert page.locator("[data-testid=speakers-count]").inner_text() == "4 turns"
                rows = page.locator("[data-testid=speakers] [data-speaker-row]")
                assert rows.count() == 2 and "16.0 s · 2 turns · 57 %" in rows.nth(0).inner_text()
                page.screenshot(path=str(tmp_path / "dashboard-speakers.png"), full_page=True)

                page.goto(f"{base}/#/job/{old_job}")
                error = page.locator("[data-testid=speakers-error]")
                error.wait_for(timeout=20_000)
                assert "completed without speaker turns on its record" in error.inner_text()
                assert page.locator("[data-testid=speakers] .turn").count() == 0
                browser.close()
        finally:
            dashboard.terminate()
            dashboard.wait(20)
        assert violations(server_log) == []  # every role did only what it may
