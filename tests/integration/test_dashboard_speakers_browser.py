"""Speaker turns on the dashboard's job page (issue 21), in Debian's Chromium driven by Playwright,
against `captionbus dashboard` processes on a real nats-server with a real coordinator.

A job of a one-node workflow (diarization over the input) runs through the coordinator; the test
plays the diarization worker: it stores a turns.json (captionbus.contracts.speech.SpeakerTurns)
in the object store and publishes the StageCompleted naming it, as the stage runtime does. The
page draws what the bus recorded as that node's output: one bar per turn on the film's time axis
(left and width in proportion to the film), one row per speaker with its seconds of speech; the
JSON behind it is compared with the artifact. A dashboard without artifact reads (the default)
says why it shows no turns instead of an empty lane."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from captionbus.contracts import JobSpec, JobState, JobStatus, JobSubmitted, StageCompleted, StageRequest, subjects
from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import Coordinator
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import connect, provision
from captionbus.core.settings import Settings
from tests.gatewaytools import free_port
from tests.integration.test_coordinator import INPUT, POLICY, FakeWorker, publish_event

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="apt-get install chromium")

GRAPH = Workflow.from_dict({
    "name": "who",
    "nodes": {"diarization": {"inputs": {"audio": "job.input", "regions": "job.input"}, "outputs": ["turns"]}},
    "outputs": {"turns": "diarization.turns"},
})
TURNS = SpeakerTurns(duration=40.0, speakers=["Anna", "SPEAKER_01"], requested="auto",
                     models={"embedder": "campplus (campplus_cn_en_common.pt, 192-d)", "regions": "silero"},
                     turns=[SpeakerTurn(start=1.0, end=9.0, speaker="Anna"),
                            SpeakerTurn(start=9.0, end=21.0, speaker="SPEAKER_01"),
                            SpeakerTurn(start=22.0, end=30.0, speaker="Anna")])


def run_job(url: str, home: Path) -> str:
    """The job through a real coordinator, its diarization answered with TURNS stored for real."""

    class Worker(FakeWorker):
        async def answer(self, count: int = 1, timeout: float = 20.0, **_) -> list[StageRequest]:
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
                    outputs={"turns": ref}, worker={"name": "test"}), f"{request.key}.completed")
                await msgs[0].ack()
                return [request]
            raise AssertionError("no diarization request came")

    async def go() -> str:
        home.mkdir(parents=True, exist_ok=True)
        nc = await connect(url, "t-speakers")
        js = nc.jetstream()
        await provision(js)
        nonlocal store
        store = ArtifactStore(Settings(home=home, nats_url=url, artifacts_mode="object", host_id="worker"), js)
        try:
            async with Coordinator(nc, graphs={"who": GRAPH}, policy=POLICY, tick_interval_s=0.2):
                spec = JobSpec(job_id="job-who", workflow="who", input=INPUT, options={"diarization": {"speakers": "auto"}})
                await publish_event(js, JobSubmitted(job_id=spec.job_id, spec=spec), f"{spec.job_id}.submitted")
                await Worker(js, "diarization").answer()
                kv = await js.key_value(subjects.JOBS_BUCKET)
                deadline = time.monotonic() + 20
                while JobState.model_validate_json((await kv.get(spec.job_id)).value).status != JobStatus.completed:
                    assert time.monotonic() < deadline, "the job did not complete"
                    await asyncio.sleep(0.1)
            return spec.job_id
        finally:
            await nc.close()

    store = None
    return asyncio.run(go())


def start_dashboard(url: str, home: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "captionbus", "dashboard", "--listen", f"127.0.0.1:{port}", *args],
                               env={**os.environ, "NATS_URL": url, "CAPTIONBUS_HOME": str(home)},
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def test_the_job_page_shows_who_speaks_when(nats_server, tmp_path):
    job_id = run_job(nats_server, tmp_path / "worker")
    reading, base = start_dashboard(nats_server, tmp_path / "dash", tmp_path / "dash.log", "--downloads")
    plain, plain_base = start_dashboard(nats_server, tmp_path / "plain", tmp_path / "plain.log")
    try:
        lane = httpx.get(f"{base}/api/jobs/{job_id}/speakers", timeout=10).json()
        assert lane["node"] == "diarization" and lane["duration"] == 40.0
        assert lane["turns"] == [t.model_dump() for t in TURNS.turns]  # the artifact the bus recorded, as it is
        assert [(s["label"], s["seconds"], s["turns"]) for s in lane["speakers"]] == [("Anna", 16.0, 2),
                                                                                   ("SPEAKER_01", 12.0, 1)]
        refused = httpx.get(f"{plain_base}/api/jobs/{job_id}/speakers", timeout=10)
        assert refused.status_code == 403 and "speaker turns need artifact reads" in refused.json()["error"]["message"]
        assert httpx.get(f"{base}/api/jobs/nope/speakers", timeout=10).status_code == 404

        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{base}/#/job/{job_id}")
            turns = page.locator("[data-testid=speakers] .turn")
            turns.first.wait_for(timeout=20_000)
            assert turns.count() == 3
            assert [turns.nth(i).get_attribute("data-speaker") for i in range(3)] == ["Anna", "SPEAKER_01", "Anna"]
            track = page.locator("[data-testid=speakers] .gtrack.lane").bounding_box()
            for i, turn in enumerate(TURNS.turns):  # placed on the film's axis: 40 s across the track
                box = turns.nth(i).bounding_box()
                assert abs((box["x"] - track["x"]) / track["width"] - turn.start / 40) < 0.01, (i, box, track)
                assert abs(box["width"] / track["width"] - (turn.end - turn.start) / 40) < 0.01, (i, box, track)
            colors = [turns.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(3)]
            assert colors[0] == colors[2] != colors[1]
            rows = page.locator("[data-testid=speakers] [data-speaker-row]")
            assert rows.count() == 2 and "16.0 s · 2 turns · 57 %" in rows.nth(0).inner_text()
            page.screenshot(path=str(tmp_path / "dashboard-speakers.png"), full_page=True)

            page.goto(f"{plain_base}/#/job/{job_id}")
            error = page.locator("[data-testid=speakers-error]")
            error.wait_for(timeout=20_000)
            assert "speaker turns need artifact reads" in error.inner_text()
            assert page.locator("[data-testid=speakers] .turn").count() == 0
            browser.close()
    finally:
        for process in (reading, plain):
            process.terminate()
            process.wait(20)
