"""The dashboard attacked through HTTP (issue 18, "tenancy at the door": its read-only role never
acts, and nothing off loopback answers without auth): a real nats-server, the real dashboard
served by uvicorn (`captionbus.dashboard.serve`), httpx as the attacker's client, a job record
seeded on the bus. tests/integration/test_dashboard_actions.py has the action rules (tokens, the
action header, Origin); these are the tricks around them."""
from __future__ import annotations

import asyncio
import base64
import contextlib

import httpx

from captionbus.contracts import ArtifactRef, JobSpec, JobState, subjects
from captionbus.core.bus import connect, provision
from captionbus.dashboard.serve import serve as serve_dashboard
from tests.integration.test_dashboard import _free_port, _ok, _until

VIEW, OPERATOR = "view-token", "operator-token"


@contextlib.asynccontextmanager
async def dashboard(nats_url: str, token: str | None = None, operator: str | None = None):
    """(base URL, the job record's KV) with one job, `job-kept` (pending), on the bus."""
    nc = await connect(nats_url, "t-writer")
    await provision(nc.jetstream())
    kv = await nc.jetstream().key_value(subjects.JOBS_BUCKET)
    spec = JobSpec(job_id="job-kept", input=ArtifactRef(key="0" * 64, name="private-board-meeting.mp4", size=1))
    await kv.put("job-kept", JobState(spec=spec).model_dump_json().encode())
    port = _free_port()
    ready = asyncio.Event()
    task = asyncio.create_task(serve_dashboard(nats_url, f"127.0.0.1:{port}", token, ready, operator=operator))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield f"http://127.0.0.1:{port}", kv
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await nc.close()


def test_a_tokenless_dashboard_answers_no_other_site_and_no_rebound_name(nats_server):
    """Without a token the dashboard is loopback's. A page whose name was rebound to 127.0.0.1
    (DNS rebinding: `Host: evil.example:PORT`, same origin as the page) read the job list, a job's
    page and the live stream (200 before); a cross-site request (`Origin: http://evil.example`)
    was answered too. Both are 403 now, on every path but the probes; loopback names still read."""
    async def main():
        async with dashboard(nats_server) as (base, _kv), httpx.AsyncClient(base_url=base, timeout=5) as http:
            await _until(lambda: _ok(http, "/readyz"), 20, "ready")
            port = base.rsplit(":", 1)[1]
            attackers = [{"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
                         {"Host": f"evil.example:{port}"}, {"Origin": "http://evil.example"}, {"Origin": "null"}]
            for headers in attackers:
                for path in ("/", "/api/jobs", "/api/jobs/job-kept", "/api/stream", "/api/workers", "/metrics",
                             "/api/session", "/static/index.html"):
                    answer = await http.get(path, headers=headers)
                    assert answer.status_code == 403, (headers, path, answer.status_code, answer.text[:200])
                    assert "private-board-meeting" not in answer.text and "credentials" in answer.json()["error"]["message"]
            for host in ("localhost", "127.0.0.1", "[::1]"):
                same = {"Host": f"{host}:{port}", "Origin": f"http://{host}:{port}"}
                answer = await http.get("/api/jobs", headers=same)
                assert answer.status_code == 200 and "private-board-meeting" in answer.text, host
            async with http.stream("GET", "/api/stream") as stream:  # the page's own stream still opens
                assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")

    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_viewer_cannot_act_by_any_header_trick_and_reads_nothing_outside_the_app(nats_server):
    """A viewer token on an acting dashboard (operator token set), trying what a proxy or a parser
    might read differently: two Authorization headers (the middleware reads the last, the action
    check the first), the operator token as the Basic user name, the token in the query string,
    X-Forwarded-* headers, an uppercase action header, HEAD/OPTIONS/PUT on the action routes, the
    SSE stream; and reads of files beside the static folder. None acts; the job is untouched.
    (Held before this change too: recorded as tried.)"""
    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    async def main():
        async with dashboard(nats_server, VIEW, OPERATOR) as (base, kv), \
                httpx.AsyncClient(base_url=base, timeout=5, auth=("ops", VIEW)) as viewer:
            await _until(lambda: _ok(viewer, "/readyz"), 20, "ready")
            act = {"X-Captionbus-Action": "1", "Origin": base}
            tricks = [
                [("authorization", f"Bearer {VIEW}"), ("authorization", "Bearer guess")],
                [("authorization", "Bearer guess"), ("authorization", f"Bearer {VIEW}")],
                [("authorization", basic(OPERATOR, VIEW))],
                [("authorization", basic(VIEW, ""))],
                [("authorization", f"Bearer {VIEW}"), ("x-forwarded-for", "127.0.0.1"), ("x-forwarded-host", "localhost"),
                 ("x-forwarded-proto", "https"), ("x-real-ip", "127.0.0.1")],
                [("authorization", f"bearer {VIEW}"), ("X-CAPTIONBUS-ACTION", "1")],
            ]
            async with httpx.AsyncClient(base_url=base, timeout=5) as raw:
                for headers in tricks:
                    for what in ("cancel", "retry"):
                        request = raw.build_request("POST", f"/api/jobs/job-kept/{what}?token={OPERATOR}",
                                                    headers=httpx.Headers([*act.items(), *headers]))
                        answer = await raw.send(request)
                        assert answer.status_code in (401, 403), (headers, what, answer.status_code, answer.text)
                for method in ("HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "GET"):
                    answer = await viewer.request(method, "/api/jobs/job-kept/cancel", headers=act)
                    assert answer.status_code == 405, (method, answer.status_code)
                for path in ("/static/../app.py", "/static/..%2Fapp.py", "/static/%2e%2e/auth.py", "/static//etc/passwd",
                             "/static/..%5Capp.py"):
                    answer = await viewer.get(path)
                    assert answer.status_code == 404 and "import" not in answer.text and "root:" not in answer.text, path
                async with viewer.stream("GET", "/api/stream") as stream:  # the viewer reads the stream
                    assert stream.status_code == 200
                answer = await raw.get("/api/stream")  # nobody else does
                assert answer.status_code == 401
                # Every route the app has, by every method it takes, without the token: 401 but the probes.
                from captionbus.dashboard.app import Live, create_app
                from captionbus.dashboard.auth import OPEN_PATHS

                for route in create_app(Live(), None, VIEW, operator=OPERATOR).routes:
                    path = route.path.replace("{job_id}", "job-kept").replace("{name}", "srt")
                    for method in sorted(getattr(route, "methods", None) or {"GET"}):
                        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": basic(VIEW, "x")}):
                            answer = await raw.request(method, path + ("/index.html" if path == "/static" else ""),
                                                       headers={**act, **headers})
                            expected = (503, 200) if path in OPEN_PATHS else (401,)
                            assert answer.status_code in expected, (method, path, headers, answer.status_code)
            entry = await kv.get("job-kept")
            assert JobState.model_validate_json(entry.value).status.value == "pending" and entry.revision == 1

    asyncio.run(asyncio.wait_for(main(), 90))


def test_an_unauthenticated_probe_learns_nothing_of_the_host(tmp_path, monkeypatch):
    """The dashboard's /readyz is open too; with a token set it told anyone the bus's address and
    the TLS file's host path while it could not connect. Now only a signed-in caller hears why."""
    from tests.gatewaytools import free_port

    secret_dir = tmp_path / "etc-captionbus-private"
    monkeypatch.setenv("CAPTIONBUS_NATS_CA", str(secret_dir / "ca.pem"))

    async def main():
        port = _free_port()
        ready = asyncio.Event()
        task = asyncio.create_task(serve_dashboard(f"nats://127.0.0.1:{free_port()}", f"127.0.0.1:{port}", VIEW, ready))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
                async def told():
                    try:
                        answer = await http.get("/readyz", auth=("ops", VIEW))
                    except httpx.TransportError:
                        return None
                    return answer if "ca.pem" in answer.text else None
                answer = await _until(told, 20, "the reason, to the viewer")
                assert answer.status_code == 503 and str(secret_dir) in answer.json()["error"]["message"]
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    answer = await http.get("/readyz", headers=headers)
                    assert answer.status_code == 503 and "not on the bus yet" in answer.json()["error"]["message"]
                    assert "etc-captionbus" not in answer.text and "127.0.0.1" not in answer.text
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_webhook_view_shows_no_receivers_credential(nats_server):
    """A gateway-wide subscriber that is an incoming-webhook URL (Slack's, Discord's: the path is
    the credential) was shown whole to every viewer on /api/webhooks (query and user info were
    hidden, the path was not), so a view token could post to the operator's channel. Now the page
    shows the path's first segment only."""
    from captionbus.gateway.dispatch import Record, record_key

    slack = "https://hooks.slack.example/services/T0001/B0002/xoxb-channel-secret"
    discord = "https://u:pw@discord.example/api/webhooks/1234/discord-token-secret?wait=true"

    async def main():
        async with dashboard(nats_server, VIEW) as (base, _kv):
            nc = await connect(nats_server, "t-gateway")
            kv = await nc.jetstream().key_value("cb_webhooks")
            for name, url in (("slack", slack), ("discord", discord)):
                record = Record(job_id="job-kept", subscriber=name, url=url, cursor=1, deliveries=[
                    {"kind": "submitted", "sequence": 1, "status": "delivered", "attempts": 1, "http_status": 200}])
                await kv.create(record_key("job-kept", name), record.model_dump_json().encode())
            await nc.close()
            async with httpx.AsyncClient(base_url=base, timeout=5, auth=("ops", VIEW)) as viewer:
                async def listed():
                    answer = await viewer.get("/api/webhooks")
                    return answer.json() if answer.status_code == 200 and len(answer.json()["records"]) == 2 else None
                view = await _until(listed, 20, "both webhook records")
                assert sorted(r["url"] for r in view["records"]) == [
                    "https://discord.example/api/…?…", "https://hooks.slack.example/services/…"]
                assert "secret" not in str(view) and "pw" not in str(view)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_no_other_site_can_frame_the_acting_dashboard(nats_server):
    """Clickjacking: a browser signed in as the operator opens another site's page that frames the
    dashboard (a different port is a different origin). Before, Chromium showed the job page in
    the frame, loaded with the operator's credentials (its own origin: a Cancel button's request
    passes the action header and Origin checks), ready to be clicked under a decoy. Now every answer forbids framing
    (X-Frame-Options DENY, CSP frame-ancestors 'none') and the frame shows nothing of it."""
    import shutil
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    import pytest

    playwright = pytest.importorskip("playwright.async_api", reason="pip install playwright (dev extra)")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("apt-get install chromium")

    async def main():
        async with dashboard(nats_server, VIEW, OPERATOR) as (base, _kv):
            page_html = (f'<html><body><p>win a prize: click here</p><iframe name="victim" width="1200" height="800" '
                         f'src="{base}/#/job/job-kept"></iframe></body></html>').encode()

            class Evil(BaseHTTPRequestHandler):
                def do_GET(self):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.end_headers()
                    self.wfile.write(page_html)

                def log_message(self, *args):
                    pass

            evil = ThreadingHTTPServer(("127.0.0.1", _free_port()), Evil)
            threading.Thread(target=evil.serve_forever, daemon=True).start()
            try:
                async with httpx.AsyncClient(base_url=base, timeout=5, auth=("ops", OPERATOR)) as op:
                    await _until(lambda: _ok(op, "/readyz"), 20, "ready")
                    for path in ("/", "/api/jobs", "/static/dashboard.js", "/api/session", "/nope"):
                        answer = await op.get(path)
                        assert answer.headers.get("x-frame-options") == "DENY", path
                        assert answer.headers.get("content-security-policy") == "frame-ancestors 'none'", path
                async with playwright.async_playwright() as p:
                    browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                    context = await browser.new_context(http_credentials={"username": "ops", "password": OPERATOR})
                    page = await context.new_page()
                    # goto returns at the page's load event, which waits for its frames to load
                    # or be refused. A refused frame is left on Chromium's error page at once; a
                    # frame that loaded the dashboard gets the time its page needs to render (not a
                    # fixed 3 s wait for both: the refusal is the expected case).
                    await page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
                    frame = page.frame(name="victim")
                    shown = 0
                    if frame is not None and frame.url.startswith(base):
                        with contextlib.suppress(Exception):
                            await frame.wait_for_selector("[data-testid=session]", state="attached", timeout=10_000)
                        with contextlib.suppress(Exception):
                            shown = await frame.locator("[data-testid=session]").count()
                    assert shown == 0, f"the dashboard rendered inside another site's frame ({frame and frame.url})"
                    # the operator's own tab still shows it
                    own = await context.new_page()
                    await own.goto(f"{base}/#/job/job-kept")
                    await own.wait_for_selector("[data-testid=session]", state="attached", timeout=10_000)
                    await browser.close()
            finally:
                evil.shutdown()

    asyncio.run(asyncio.wait_for(main(), 90))
