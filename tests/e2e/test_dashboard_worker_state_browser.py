"""Worker state in a real browser (Debian's headless Chromium, Playwright): a noop stage service
whose "model" takes seconds to load shows `loading`, the job it took meanwhile says "loading
model" on the jobs list, then the worker shows `busy` with that job linked, and the link opens
the job's page; a failed job carries its reason class. Real nats-server, coordinator, stage
service and dashboard (in one background event loop); screenshots kept like the other browser test."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from captionbus.client import submit
from captionbus.dashboard.serve import serve as serve_dashboard
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import Coordinator
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.bus import StagePolicy, connect, provision
from captionbus.core.settings import Settings
from captionbus.services.noop.stage import STAGE as NOOP
from captionbus.services.runtime.serve import serve as serve_stage

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="apt-get install chromium")

PROBE = {"name": "probe", "nodes": {"first": {"stage": "noop", "inputs": {"media": "job.input"},
                                              "outputs": ["media"]}},
         "outputs": {"media": "first.media"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Fleet:
    """Coordinator, a slow-loading noop worker and the dashboard on one loop in a thread
    (Playwright's sync API holds the test thread's)."""

    def __init__(self, url: str, home: Path, port: int):
        self.url, self.home, self.port = url, home, port
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        try:
            settings = Settings(home=self.home, nats_url=self.url, artifacts_mode="local", host_id="browserhost")
            self.nc = await connect(self.url, "t-browser")
            await provision(self.nc.jetstream())
            self.store = ArtifactStore(settings, self.nc.jetstream())
            self.stop = asyncio.Event()
            async with Coordinator(self.nc, graphs={"probe": Workflow.from_dict(PROBE)}, tick_interval_s=0.2):
                dash_ready = asyncio.Event()
                dashboard = asyncio.create_task(serve_dashboard(self.url, f"127.0.0.1:{self.port}", None, dash_ready))
                await asyncio.wait_for(dash_ready.wait(), 30)
                self.started.set()
                await self.stop.wait()
                dashboard.cancel()
                for task in getattr(self, "workers", []):
                    await asyncio.wait_for(task, 20)
        except BaseException as e:
            self.error = e
            self.started.set()
        finally:
            await self.nc.close()

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start_worker(self, setup_s: float) -> None:
        settings = Settings(home=self.home, nats_url=self.url, artifacts_mode="local", host_id="browserhost")
        self.workers = [asyncio.create_task(serve_stage(
            NOOP, settings, self.url, env_name="browser-test", stop=self.stop, replica_id="r1",
            options={"setup_s": setup_s}, policy=StagePolicy(ack_wait=2.0)))]

    async def submit(self, media: Path, job_id: str, **options) -> None:
        await submit(self.nc.jetstream(), self.store, media, workflow="probe", job_id=job_id, options={"noop": options})


def test_a_busy_worker_shows_its_job_in_the_browser(nats_server, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    fleet = _Fleet(nats_server, tmp_path / "home", port)
    fleet.thread.start()
    assert fleet.started.wait(60) and fleet.error is None, fleet.error
    media = tmp_path / "clip.wav"
    media.write_bytes(b"RIFF" + os.urandom(2000))
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(base + "/")
            page.wait_for_selector("[data-testid=live].ok", timeout=20_000)

            # The model takes 6 s to load: the worker is discoverable (`loading`) and takes a job.
            fleet.call(fleet.start_worker(setup_s=6))
            page.goto(base + "/#/workers")
            page.locator("[data-testid=workers] tr[data-stage='noop'][data-state='loading']").wait_for(timeout=20_000)
            page.goto(base + "/#/jobs")
            fleet.call(fleet.submit(media, "job-busy", sleep_s=12))
            note = page.locator("tr[data-job='job-busy'] .node[data-node='first'] .note")
            note.wait_for(timeout=20_000)
            assert "loading model" in note.inner_text()
            page.screenshot(path=str(tmp_path / "dashboard-loading.png"))

            # Loaded: `busy` on that job, linked; the link opens the job's page.
            page.goto(base + "/#/workers")
            busy = page.locator("[data-testid=workers] tr[data-stage='noop'][data-state='busy']")
            busy.wait_for(timeout=30_000)
            link = busy.locator("[data-testid=worker-job]")
            assert link.inner_text() == "job-busy"
            assert "first" in busy.locator("td.current").inner_text()
            page.screenshot(path=str(tmp_path / "dashboard-workers-busy.png"))
            link.click()
            page.wait_for_selector("[data-testid=job] h2 small", timeout=10_000)
            assert page.locator("[data-testid=job] h2 small").inner_text() == "job-busy"

            # A failed job is labelled with its reason class.
            page.goto(base + "/#/jobs")
            fleet.call(fleet.submit(media, "job-bad", fail="bad_input"))
            failed = page.locator("tr[data-job='job-bad'][data-status='failed']")
            failed.wait_for(timeout=60_000)
            assert failed.locator("[data-testid=failure-class]").inner_text() == "input"
            browser.close()
        if os.environ.get("CAPTIONBUS_TEST_ARTIFACTS"):
            target = Path(os.environ["CAPTIONBUS_TEST_ARTIFACTS"])
            target.mkdir(parents=True, exist_ok=True)
            for shot in tmp_path.glob("dashboard-*.png"):
                shutil.copy(shot, target / shot.name)
    finally:
        fleet.loop.call_soon_threadsafe(fleet.stop.set)
        fleet.thread.join(60)
