"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, against the
`captionbus dashboard` process on the session's real stack (coordinator + transcribe services).

Screenshots are kept in the test's tmp dir, and in $CAPTIONBUS_TEST_ARTIFACTS when it is set."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from captionbus.coordinator.graph import load_workflows
from tests.e2e.conftest import Stack
from tests.media import ENGLISH_SENTENCE, speech_video, text_named_mp4

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="apt-get install chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_thread(fn, *args, **kwargs):
    """Stack helpers run their own asyncio loop; Playwright's sync API holds one in this thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _keep(path: Path) -> None:
    if os.environ.get("CAPTIONBUS_TEST_ARTIFACTS"):
        target = Path(os.environ["CAPTIONBUS_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)


def _cancel(stack: Stack, job_id: str) -> None:
    from captionbus.client import cancel
    from captionbus.core.bus import connect

    async def go():
        nc = await connect(stack.url, "test-cancel")
        try:
            await cancel(nc.jetstream(), job_id)
        finally:
            await nc.close()

    asyncio.run(go())


def test_dashboard_in_a_browser_follows_jobs_live(stack: Stack, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "dashboard.log", "wb")
    dashboard = subprocess.Popen([sys.executable, "-m", "captionbus", "dashboard", "--listen", f"127.0.0.1:{port}"],
                                 env={**stack.env, "CAPTIONBUS_HOME": str(tmp_path / "dash")},
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stuck = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert dashboard.poll() is None and time.monotonic() < deadline, (tmp_path / "dashboard.log").read_text()
            time.sleep(0.2)
        video, _ = speech_video(tmp_path / "talk.mp4", ENGLISH_SENTENCE)
        bad = text_named_mp4(tmp_path / "notes.mp4")

        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(base + "/")
            page.wait_for_selector("[data-testid=live].ok", timeout=10_000)
            reloads = []
            page.on("framenavigated", lambda frame: reloads.append(frame.url) if frame == page.main_frame else None)

            # A job appears and goes to completed on the open page, without a reload.
            job_id = _in_thread(stack.submit, video, source_language="en")
            row = page.locator(f"tr[data-job='{job_id}']")
            row.wait_for(timeout=10_000)
            first_status = row.get_attribute("data-status")
            assert first_status in ("pending", "running"), first_status
            page.wait_for_selector(f"tr[data-job='{job_id}'][data-status='completed']", timeout=240_000)
            assert [u for u in reloads if "#/job" not in u] == [], reloads
            page.screenshot(path=str(tmp_path / "dashboard-jobs.png"))

            # Its page names the asr worker's env and python (not the interpreter's path: a job's
            # events reach its tenant; the workers view has it).
            row.locator("a").click()
            asr = page.locator("[data-testid=job-nodes] tr[data-node='asr-0']")  # a clip: one chunk
            asr.wait_for(timeout=10_000)
            assert asr.locator("td.env").inner_text() == "whisperx"
            python = asr.locator("td.python").inner_text()
            assert python.startswith("3."), python
            # One completed bar per node of the transcribe graph that ran, as the job state says
            # (a clip is one chunk: asr-0; `language` is skipped: -s en; `diarization`: no --speakers).
            state = _in_thread(stack.job_state, job_id)
            ran = sorted(n for n, node in state.nodes.items() if node.status.value == "completed")
            graph = load_workflows()["transcribe"].nodes
            assert ran == sorted([*(n for n in graph if n not in ("asr", "language", "diarization")), "asr-0"]), ran
            bars = page.locator("[data-testid=timeline] .gbar.completed")
            deadline = time.monotonic() + 10
            while bars.count() != len(ran) and time.monotonic() < deadline:
                page.wait_for_timeout(200)  # the last events may still be arriving over SSE
            assert bars.count() == len(ran), [page.locator("[data-testid=timeline] .glabel").all_inner_texts(), ran]
            page.screenshot(path=str(tmp_path / "dashboard-job.png"), full_page=True)

            # A failed job's one-line reason is on the list.
            page.goto(base + "/#/jobs")
            bad_id = _in_thread(stack.submit, bad, source_language="en")
            failed = page.locator(f"tr[data-job='{bad_id}'][data-status='failed']")
            failed.wait_for(timeout=120_000)
            reason = failed.locator("[data-testid=reason]").inner_text()
            assert "not a media file" in reason.lower() and "\n" not in reason, reason

            # A stage with waiting requests and no live worker is flagged: translate needs
            # alignment after asr, which this stack (the transcribe stages) does not serve.
            stuck = _in_thread(stack.submit, video, workflow="translate", source_language="en", target_languages=["fr"])
            problem = page.locator("[data-testid=problems] .problem[data-stage='alignment']")
            problem.wait_for(timeout=120_000)
            assert "no live alignment worker" in problem.inner_text()
            page.goto(base + "/#/queues")
            page.locator("[data-testid=queues] tr.problem[data-stage='alignment']").wait_for(timeout=10_000)
            page.goto(base + "/#/workers")
            page.locator("[data-testid=workers] tr[data-stage='asr'][data-state='idle']").wait_for(timeout=10_000)
            page.goto(base + "/#/jobs")
            page.wait_for_selector(f"tr[data-job='{stuck}']")
            page.screenshot(path=str(tmp_path / "dashboard-problem.png"))
            browser.close()
        for shot in tmp_path.glob("dashboard-*.png"):
            _keep(shot)
    finally:
        if stuck:
            _in_thread(_cancel, stack, stuck)
        dashboard.terminate()
        dashboard.wait(20)
        log.close()
