"""The gateway attacked through HTTP as a key holder would (issue 18, "tenancy at the door"): a real
nats-server, the real coordinator (in-process; no stage services, so jobs stay running), the real
app under uvicorn, httpx as the attacker's client. Bob holds an ordinary key and Alice's job id;
each attack must answer exactly as for a job that does not exist (or be refused) and leave Alice's
job and its webhook records untouched. tests/integration/test_gateway.py has the plain cross-key
checks (every route with Alice's id as written); these are the tricks around them."""
from __future__ import annotations

import contextlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from captionbus.core.settings import Settings
from captionbus.gateway.app import GatewayConfig
from captionbus.gateway.dispatch import Subscriber
from captionbus.gateway.keys import KeyRing, add_key
from tests.gatewaytools import free_port, running_gateway
from tests.integration.test_gateway import coordinator, error_of, wait_status  # noqa: F401  (a fixture)

SECRET = b"door-test-secret"
# The operator's gateway-wide subscriber: an incoming-webhook URL whose path is its credential.
AUDIT_PATH = "/audit/T0001/B0002/xoxb-operator-secret"


class Hooks:
    """A receiver on loopback that records the path of every POST (whatever it is)."""

    def __init__(self):
        self.paths: list[str] = []
        self.posts: list[tuple[str, dict[str, str], bytes]] = []  # (path, headers, body)
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                hooks.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                hooks.paths.append(self.path)
                if self.path.endswith("/redirect"):  # a receiver (or a hijacked one) sends the gateway elsewhere
                    self.send_response(307)
                    self.send_header("Location", f"{hooks.base}/admin")
                else:
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def door(tmp_path, coordinator):  # noqa: F811
    """(clients by key name: alice, bob, ops (admin); the receiver)."""
    hooks = Hooks()
    keys = tmp_path / "keys"
    made = {name: add_key(keys, name, admin=name == "ops") for name in ("alice", "bob", "ops")}
    config = GatewayConfig(
        settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object", host_id="gw"),
        nats_url=coordinator, keys=KeyRing.load(keys), max_upload_bytes=64 * 1024,
        webhook_allow=[f"{hooks.base}/team-a", f"{hooks.base}/audit/"], webhook_secret=SECRET,
        webhook_subscribers=[Subscriber(name="audit", url=hooks.base + AUDIT_PATH)])
    with running_gateway(config) as url:
        clients = {name: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
                   for name, key in made.items()}
        yield clients, hooks
        for client in clients.values():
            client.close()
    hooks.server.shutdown()


def submit(client: httpx.Client, **data) -> str:
    created = client.post("/v1/jobs", files={"file": ("talk.wav", b"RIFF talk")}, data={"workflow": "speech", **data})
    assert created.status_code == 201, created.text
    return created.json()["id"]


def test_callback_urls_that_leave_the_allowed_prefix_are_refused(door):
    """The allow-list said `http://HOOKS/team-a`; each URL below was accepted before (urlsplit kept
    the path as written, startswith had no segment boundary) and httpx POSTed to a path outside
    it (`/team-a/../admin` went to `/admin`), or a decoding receiver routes it there."""
    clients, hooks = door
    alice = clients["alice"]
    for path in ("/team-a/../admin", "/team-a/./../admin", "/team-abc", "/team-a%2f..%2fadmin", "/team-a/%2e%2e/admin",
                 "/team-a/%2E%2E/admin", "/team-a\\..\\admin"):
        answer = alice.post("/v1/jobs", files={"file": ("a.wav", b"RIFF a")},
                            data={"workflow": "speech", "callback_url": hooks.base + path})
        assert answer.status_code == 422, (path, answer.status_code, answer.text)
        assert "callback URL" in error_of(answer), path
    for url in ("http://169.254.169.254/team-a", "http://127.0.0.1:1/team-a", f"http://user:pw@{hooks.base[7:]}/team-a"):
        answer = alice.post("/v1/jobs", files={"file": ("a.wav", b"RIFF a")},
                            data={"workflow": "speech", "callback_url": url})
        assert answer.status_code == 422, (url, answer.text)
    # Under the prefix, it is taken and delivered; nothing went anywhere else.
    job_id = submit(alice, callback_url=f"{hooks.base}/team-a/jobs")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "/team-a/jobs" not in hooks.paths:
        time.sleep(0.1)
    assert "/team-a/jobs" in hooks.paths, hooks.paths
    assert set(hooks.paths) <= {"/team-a/jobs", AUDIT_PATH}, hooks.paths
    assert alice.get(f"/v1/jobs/{job_id}").status_code == 200
    # A receiver under the prefix that redirects: the gateway does not follow (held before too).
    redirected = submit(alice, callback_url=f"{hooks.base}/team-a/redirect")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tried = [d for d in alice.get(f"/v1/jobs/{redirected}/deliveries").json()["data"] if d["http_status"] == 307]
        if tried:
            break
        time.sleep(0.2)
    assert tried and tried[0]["status"] != "delivered", tried
    assert "/admin" not in hooks.paths, hooks.paths


def test_a_key_reads_its_own_callback_record_not_the_operators_subscribers(door):
    """Every job has a record for the gateway-wide `audit` subscriber; Bob's own job listed it with
    its URL (the operator's credential) and its delivery errors. Now only an admin key sees it."""
    clients, hooks = door
    bob, ops = clients["bob"], clients["ops"]
    job_id = submit(bob, callback_url=f"{hooks.base}/team-a/bob")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # both records are made: the admin sees two
        if len(ops.get(f"/v1/jobs/{job_id}/webhooks").json()["data"]) == 2:
            break
        time.sleep(0.2)
    admin_view = ops.get(f"/v1/jobs/{job_id}/webhooks").json()["data"]
    assert sorted(r["subscriber"] for r in admin_view) == ["audit", "callback"], admin_view
    for path in ("webhooks", "deliveries"):
        answer = bob.get(f"/v1/jobs/{job_id}/{path}")
        assert answer.status_code == 200 and "xoxb-operator-secret" not in answer.text, (path, answer.text)
        assert {r["subscriber"] for r in answer.json()["data"]} <= {"callback"}, answer.text
    assert [r["url"] for r in bob.get(f"/v1/jobs/{job_id}/webhooks").json()["data"]] == [f"{hooks.base}/team-a/bob"]


def test_job_ids_in_every_form_reach_no_other_job(door):
    """Alice's job, and Bob trying ids that a subject or KV key could widen or a decoder could
    rewrite: wildcards, dotted ids, URL-encoded separators, unicode look-alikes, very long ids.
    Each answers 404 like an unknown id on every route; Alice's job stays running."""
    clients, _ = door
    alice, bob = clients["alice"], clients["bob"]
    job_id = submit(alice)
    wait_status(alice, job_id, {"running"})
    tricks = ["*", ">", "%2A", "%3E", f"{job_id}.>", f"{job_id[:-2]}*", f"{job_id}%2E*", f"{job_id}%00",
              f"{job_id}%20", f"{job_id}%0A", f"{job_id.upper()}", f"ｊ{job_id[1:]}", "j" * 5000, "..%2F..%2Fetc",
              f"%2E%2E%2F{job_id}", f"{job_id};x", f" {job_id}", "KV.cb_jobs.>"]
    routes = [("GET", ""), ("GET", "/events"), ("GET", "/outputs/transcript"), ("GET", "/webhooks"),
              ("GET", "/deliveries"), ("POST", "/cancel"), ("POST", "/retry")]
    for trick in tricks:
        for method, route in routes:
            answer = bob.request(method, f"/v1/jobs/{trick}{route}")
            assert answer.status_code in (404, 405, 414, 431), (trick, method, route, answer.status_code, answer.text)
            assert job_id not in answer.text or answer.status_code == 404 and "no job" in answer.text, answer.text
            assert "Traceback" not in answer.text and "/tmp" not in answer.text and "/home" not in answer.text
    # the list filters are not a way round either
    for query in ("?status=running", "?workflow=speech", "?workflow=*", "?limit=10000"):
        assert job_id not in bob.get(f"/v1/jobs{query}").text, query
    assert alice.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


def test_last_event_id_tricks_are_refused_and_never_reach_another_job(door):
    """Last-Event-ID is read as a stream sequence. '²' (byte 0xB2: headers are latin-1) passed
    str.isdigit() and made int() raise (a 500), as did 5000 digits; a sequence of another job's event read nothing of it (the consumer is
    filtered on the job's subject); on Alice's job Bob gets the 404, whatever the header."""
    clients, _ = door
    alice, bob = clients["alice"], clients["bob"]
    secret_job, own_job = submit(alice), submit(bob)
    wait_status(alice, secret_job, {"running"})
    wait_status(bob, own_job, {"running"})
    assert bob.post(f"/v1/jobs/{own_job}/cancel").status_code == 202
    wait_status(bob, own_job, {"cancelled"})
    for text in ("²", "1¹", "9" * 5000, "-1", "1e3", "1 1", "0x10", "1.5", "18446744073709551616"):
        header = text.encode("latin-1")
        with bob.stream("GET", f"/v1/jobs/{secret_job}/events", headers={"Last-Event-ID": header}) as sse:
            assert sse.status_code == 404, (header, sse.status_code)
        answer = bob.get(f"/v1/jobs/{own_job}/events", headers={"Last-Event-ID": header})
        assert answer.status_code == 400, (header, answer.status_code, answer.text[:200])
        assert "Last-Event-ID" in error_of(answer)
    # A valid sequence resumes Bob's own stream after it; none shows Alice's job.
    whole = bob.get(f"/v1/jobs/{own_job}/events").text
    ids = [int(line[4:]) for line in whole.splitlines() if line.startswith("id: ")]
    assert ids and secret_job not in whole
    resumed = bob.get(f"/v1/jobs/{own_job}/events", headers={"Last-Event-ID": "0"}).text
    assert [int(line[4:]) for line in resumed.splitlines() if line.startswith("id: ")] == ids
    for after in (0, ids[0], 10**18):
        text = bob.get(f"/v1/jobs/{own_job}/events", headers={"Last-Event-ID": str(after)}).text
        assert secret_job not in text and all(int(line[4:]) > after for line in text.splitlines()
                                              if line.startswith("id: ")), (after, text[:300])


def test_a_keyless_gateway_answers_no_other_site_and_no_rebound_name(tmp_path, coordinator):  # noqa: F811
    """Without --keys the gateway is loopback's, and its one user is an admin. A page of any site
    the user opens could POST a cross-site form to it (multipart needs no CORS preflight): a job
    was created (201) and a job cancelled (202) with `Origin: http://evil.example`; a page whose
    name was rebound to 127.0.0.1 sent `Host: evil.example:PORT` and listed every job (200).
    Now both are 403; the same requests from loopback itself, or the /docs page (same origin),
    work."""
    config = GatewayConfig(
        settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object", host_id="gw"),
        nats_url=coordinator, max_upload_bytes=64 * 1024)
    with running_gateway(config) as url:
        port = url.rsplit(":", 1)[1]
        local = httpx.Client(base_url=url, timeout=30)
        job_id = submit(local)
        wait_status(local, job_id, {"running"})
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, rebound, {"Host": f"evil.example:{port}"},
                        {"Origin": f"http://localhost:{int(port) + 1}"}):
            attempts = [local.post("/v1/jobs", files={"file": ("x.wav", b"RIFF x")}, data={"workflow": "speech"},
                                   headers=headers),
                        local.post(f"/v1/jobs/{job_id}/cancel", headers=headers),
                        local.get("/v1/jobs", headers=headers), local.get(f"/v1/jobs/{job_id}/events", headers=headers)]
            for answer in attempts:
                assert answer.status_code == 403, (headers, answer.request.url, answer.status_code, answer.text[:200])
                assert job_id not in answer.text and "credentials" in error_of(answer)
        assert [j["id"] for j in local.get("/v1/jobs").json()["data"]] == [job_id]  # nothing was created
        assert local.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # nor cancelled
        for host in ("localhost", "127.0.0.1", "[::1]"):  # every loopback name, and the page's own origin
            same = {"Host": f"{host}:{port}", "Origin": f"http://{host}:{port}"}
            assert local.get("/v1/jobs", headers=same).status_code == 200, host
        assert local.post(f"/v1/jobs/{job_id}/cancel", headers={"Origin": url}).status_code == 202
        local.close()


def test_an_unauthenticated_probe_learns_nothing_of_the_host(tmp_path, monkeypatch):
    """/readyz is open (probes send no key). While the bus was unreachable it answered anyone, off
    loopback too, with the reason: the TLS file's host path, the bus's address. Now a caller
    without a key gets "not on the bus yet" and nothing more; a key holder gets the reason."""
    secret_dir = tmp_path / "etc-captionbus-private"
    monkeypatch.setenv("CAPTIONBUS_NATS_CA", str(secret_dir / "ca.pem"))
    dead = f"nats://127.0.0.1:{free_port()}"
    key = add_key(tmp_path / "keys", "alice")
    config = GatewayConfig(settings=Settings(home=tmp_path / "gw", nats_url=dead, host_id="gw"), nats_url=dead,
                           keys=KeyRing.load(tmp_path / "keys"))
    with running_gateway(config, ready=False) as url:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the first connect attempt has failed and says why
            told = httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            if "ca.pem" in told.text:
                break
            time.sleep(0.1)
        assert told.status_code == 503 and str(secret_dir) in error_of(told), told.text
        for headers in ({}, {"Authorization": "Bearer cbk_wrong"}, {"Host": "gateway.example"}):
            answer = httpx.get(f"{url}/readyz", headers=headers, timeout=5)
            assert answer.status_code == 503 and "not on the bus yet" in error_of(answer), answer.text
            assert "etc-captionbus" not in answer.text and "127.0.0.1" not in answer.text and "nats" not in answer.text
        assert httpx.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}


def app_routes(app) -> list:
    """The app's own routes, and those of the routers it includes (FastAPI 0.165 wraps each)."""
    return [inner for route in app.routes for inner in getattr(getattr(route, "original_router", None), "routes", [route])]


def test_every_route_but_the_probes_needs_a_key(door):
    """Every route the app has (read from the app itself, so a route added later is tried too),
    with each method it takes, no key, a wrong key, a key in the query string, a Basic password,
    and loopback claimed by forwarding headers and Host: 401 before anything is read or run. Open:
    the probes (/readyz says no more than "not ready" without a key). The API document was open
    too; by default a keyed gateway now serves it to a key only (test_api_documents_...)."""
    from fastapi.routing import APIRoute

    from captionbus.gateway.app import create_app

    clients, _ = door
    base = str(clients["alice"].base_url)
    app = create_app(GatewayConfig(settings=Settings(), nats_url="nats://127.0.0.1:1", keys=KeyRing({})))
    open_paths = {"/healthz", "/readyz"}  # a keyed gateway's /openapi.json needs a key too (docs "key")
    routes = app_routes(app)
    assert {route.path for route in routes} >= {"/v1/jobs", "/v1/audio/transcriptions", "/metrics", "/readyz"}
    tried = 0
    with httpx.Client(base_url=base, timeout=30) as anonymous:
        for route in routes:
            if route.path in open_paths:
                continue
            assert isinstance(route, APIRoute), route.path
            path = route.path.replace("{job_id}", "jnosuchjob").replace("{name}", "srt")
            for method in route.methods:
                for headers, query in (({}, ""), ({"Authorization": "Bearer cbk_wrong"}, ""), ({}, "?api_key=x&key=x"),
                                       ({"Authorization": "Basic " + "b3BzOmNia193cm9uZw=="}, ""),
                                       ({"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Host": "localhost",
                                         "Forwarded": "for=127.0.0.1;proto=https"}, "")):
                    answer = anonymous.request(method, path + query, headers=headers,
                                               files={"file": ("a.wav", b"RIFF a")} if method == "POST" else None)
                    assert answer.status_code == 401, (method, path, headers, answer.status_code, answer.text[:200])
                    assert answer.headers["www-authenticate"] == "Bearer"
                    tried += 1
    assert tried >= 5 * 12  # the job API, webhooks, openai and /metrics routes were all tried


def test_outputs_of_a_finished_job_fetch_for_their_owner_only_and_a_lost_one_says_so(door, coordinator, tmp_path):  # noqa: F811
    """A completed job of Alice's with two outputs: one whose bytes are stored, one whose bytes are
    gone (retention, gc, a purge). Bob gets 404 "no job" for both, under every name. Alice gets
    the first byte for byte; the second was a 500 "internal error (ArtifactMissing)", now a 404
    saying it is no longer stored, naming no host path, host or bucket."""
    import asyncio

    from captionbus.contracts import ArtifactRef, JobState, JobStatus, subjects
    from captionbus.core.bus import connect

    clients, _ = door
    alice, bob = clients["alice"], clients["bob"]
    uploaded = submit(alice)
    done_id = "jdone-alice"

    async def write(nats_url: str) -> None:
        nc = await connect(nats_url, "t-seed")
        kv = await nc.jetstream().key_value(subjects.JOBS_BUCKET)
        first = JobState.model_validate_json((await kv.get(uploaded)).value)
        gone = ArtifactRef(key="ab" * 32, name="talk.vtt", size=12, media_type="text/vtt", in_object_store=True)
        # as the gateway submits it: Alice's name and its proof for this id (keys.KeyRing.proof)
        spec = first.spec.model_copy(update={"job_id": done_id})
        spec = spec.model_copy(update={"owner_proof": KeyRing.load(tmp_path / "keys").proof("alice", spec)})
        state = JobState(spec=spec, status=JobStatus.completed, outputs={"srt": first.spec.input, "vtt": gone})
        await kv.put(done_id, state.model_dump_json().encode())
        await nc.close()

    asyncio.run(write(coordinator))
    wait_status(alice, done_id, {"completed"})
    got = alice.get(f"/v1/jobs/{done_id}/outputs/srt")
    assert got.status_code == 200 and got.content == b"RIFF talk", got.text
    for name in ("srt", "vtt", "input", "%2A", "srt%00"):
        answer = bob.get(f"/v1/jobs/{done_id}/outputs/{name}")
        assert answer.status_code == 404 and error_of(answer) == f"no job {done_id!r}", (name, answer.text)
    lost = alice.get(f"/v1/jobs/{done_id}/outputs/vtt")
    assert lost.status_code == 404, lost.text
    message = error_of(lost)
    assert "no longer stored" in message and "vtt" in message, message
    for leak in (str(tmp_path), "/tmp", "cb_artifacts", "host", "gw"):
        assert leak not in message, (leak, message)


def test_a_key_holds_no_more_event_streams_than_its_concurrency(tmp_path, coordinator):  # noqa: F811
    """Each SSE stream holds a JetStream consumer on the bus for as long as it is open; the
    per-key limit did not count them: one key at --concurrency 8 held 60 streams on its own job,
    61 consumers on CB_EVENTS (measured). Now a stream is a request in flight like any other:
    past the limit 429; another key is not affected; a closed stream, or one its job's end
    closed, frees its slot."""
    import asyncio

    keys = tmp_path / "keys"
    made = {name: add_key(keys, name) for name in ("alice", "bob")}
    config = GatewayConfig(
        settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object", host_id="gw"),
        nats_url=coordinator, keys=KeyRing.load(keys), concurrency_per_key=3)
    with running_gateway(config) as url:
        sync = {name: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
                for name, key in made.items()}
        jobs = {name: submit(client) for name, client in sync.items()}
        for name, client in sync.items():
            wait_status(client, jobs[name], {"running"})

        async def consumers() -> int:
            from captionbus.core.bus import connect

            nc = await connect(coordinator, "t-count")
            try:
                return (await nc.jetstream().stream_info("CB_EVENTS")).state.consumer_count
            finally:
                await nc.close()

        async def go():
            def client(name):
                return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {made[name]}"}, timeout=30)

            async with client("bob") as bob, client("alice") as alice, contextlib.AsyncExitStack() as held:
                before = await consumers()
                opened = [await held.enter_async_context(bob.stream("GET", f"/v1/jobs/{jobs['bob']}/events"))
                          for _ in range(3)]
                assert [r.status_code for r in opened] == [200, 200, 200]
                for _ in range(5):
                    async with bob.stream("GET", f"/v1/jobs/{jobs['bob']}/events") as refused:
                        assert refused.status_code == 429, refused.status_code  # (200 and a 4th consumer before)
                        await refused.aread()
                        assert "limit" in error_of(refused), refused.text
                assert await consumers() <= before + 3
                async with alice.stream("GET", f"/v1/jobs/{jobs['alice']}/events") as hers:
                    assert hers.status_code == 200
                await opened[0].aclose()  # the client goes: its slot comes back
                deadline = time.monotonic() + 15
                while True:
                    async with bob.stream("GET", f"/v1/jobs/{jobs['bob']}/events") as again:
                        if again.status_code == 200:
                            break
                    assert time.monotonic() < deadline, "a closed stream never gave its slot back"
                    await asyncio.sleep(0.2)
            # the job ends: every stream of it ends, and the slots are free again
            async with client("bob") as bob, contextlib.AsyncExitStack() as held:
                streams = [await held.enter_async_context(bob.stream("GET", f"/v1/jobs/{jobs['bob']}/events"))
                           for _ in range(3)]
                assert [r.status_code for r in streams] == [200, 200, 200]
                assert (await bob.post(f"/v1/jobs/{jobs['bob']}/cancel")).status_code == 202
                for stream in streams:
                    text = "".join([chunk async for chunk in stream.aiter_text()])
                    assert "event: cancelled" in text
                deadline = time.monotonic() + 15
                while (await bob.get(f"/v1/jobs/{jobs['bob']}/events")).status_code != 200:
                    assert time.monotonic() < deadline, "an ended stream never gave its slot back"
                    await asyncio.sleep(0.2)

        asyncio.run(asyncio.wait_for(go(), 120))
        for client in sync.values():
            client.close()


def in_flight(admin: httpx.Client) -> float:
    """The gateway's requests in flight, all keys together, from its /metrics (admin key)."""
    for line in admin.get("/metrics").text.splitlines():
        if line.startswith("captionbus_gateway_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no captionbus_gateway_requests_in_flight")


def test_a_keys_slots_hold_under_a_burst_and_come_back_after_aborts_and_errors(tmp_path, coordinator):  # noqa: F811
    """Bob at --concurrency 3 fires bursts of 12 requests at once, aborts uploads half sent and
    sends requests that fail inside their handler. The slot dependency was a sync generator that
    FastAPI ran in its thread pool, with an unlocked counter: a burst could pass the check
    together and a lost update left the key's count off for good. Each burst now gets exactly 3
    answers and 9 refusals; after every abort and error the count is 0 again (the gateway's
    in-flight gauge, and the next burst gets its 3 again). Over the limit, a request for a job
    is refused before the job is read: an unknown id answers 429, not 404 (OwnedJob read the
    bus first)."""
    import asyncio

    keys = tmp_path / "keys"
    made = {name: add_key(keys, name, admin=name == "ops") for name in ("bob", "ops")}
    config = GatewayConfig(
        settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object", host_id="gw"),
        nats_url=coordinator, keys=KeyRing.load(keys), concurrency_per_key=3, max_upload_bytes=64 * 1024)
    uploads = tmp_path / "gw" / "gateway" / "uploads"
    with running_gateway(config) as url:
        ops = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {made['ops']}"}, timeout=30)
        bob_sync = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {made['bob']}"}, timeout=30)
        job_id = submit(bob_sync)
        wait_status(bob_sync, job_id, {"running"})

        def settled(expected: float) -> None:
            deadline = time.monotonic() + 15
            while (now := in_flight(ops)) != expected:
                assert time.monotonic() < deadline, f"{now} requests in flight, expected {expected}"
                time.sleep(0.05)

        async def go():
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {made['bob']}"},
                                         timeout=30, limits=limits) as bob:
                async def burst(path: str) -> list[int]:
                    async with contextlib.AsyncExitStack() as held:
                        opened = await asyncio.gather(*(held.enter_async_context(bob.stream("GET", path))
                                                        for _ in range(12)))
                        codes = sorted(r.status_code for r in opened)
                        if codes.count(200) == 3:  # (ops' own /metrics holds no slot of bob's)
                            assert await asyncio.to_thread(in_flight, ops) == 3.0
                        return codes

                for _ in range(2):
                    assert await burst(f"/v1/jobs/{job_id}/events") == [200] * 3 + [429] * 9
                    await asyncio.to_thread(settled, 0.0)
                # over the limit, an id nobody has: refused before it is looked up
                async with contextlib.AsyncExitStack() as held:
                    for _ in range(3):
                        stream = await held.enter_async_context(bob.stream("GET", f"/v1/jobs/{job_id}/events"))
                        assert stream.status_code == 200
                    # (the listing and a download hold a slot too: each reads the bus)
                    for path in ("/v1/jobs/jnosuchjob/events", f"/v1/jobs/{job_id}/events", "/v1/jobs",
                                 f"/v1/jobs/{job_id}/outputs/srt"):
                        refused = await bob.get(path)
                        assert refused.status_code == 429 and "in flight" in error_of(refused), refused.text
                await asyncio.to_thread(settled, 0.0)

                # an upload whose client goes half way: its slot comes back, its part file is gone
                boundary = "cbburst"
                head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"workflow\"\r\n\r\nspeech\r\n"
                        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                        "Content-Type: audio/wav\r\n\r\n").encode() + b"RIFF" * 4096
                never = asyncio.Event()

                async def half_sent():
                    yield head
                    await never.wait()

                for _ in range(3):
                    aborted = asyncio.create_task(bob.post(
                        "/v1/jobs", content=half_sent(),
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}))
                    await asyncio.to_thread(settled, 1.0)
                    aborted.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await aborted
                    await asyncio.to_thread(settled, 0.0)
                # refusals made inside the handler or the form: each gives its slot back
                for data, files, status in (({"workflow": "nosuchflow"}, {"file": ("a.wav", b"RIFF a")}, 422),
                                            ({"workflow": "speech"}, {"file": ("a.wav", b"")}, 400),
                                            ({"workflow": "speech"}, {"file": ("a.wav", b"x" * 200_000)}, 413),
                                            ({"workflow": "speech", "options": "{"}, {"file": ("a.wav", b"RIFF")}, 400)):
                    async def post():
                        # A refused upload's unread body makes the server's close reset the socket, and
                        # the client may see that (httpx.ReadError) before the answer (1 run in 6): such
                        # a request is sent again once, as a client would, and counted by that answer.
                        try:
                            return await bob.post("/v1/jobs", data=data, files=files)
                        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                            return await bob.post("/v1/jobs", data=data, files=files)

                    answers = await asyncio.gather(*(post() for _ in range(6)))
                    assert {a.status_code for a in answers} <= {status, 429}, [a.text for a in answers]
                    assert [a.status_code for a in answers].count(status) >= 3, [a.status_code for a in answers]
                    await asyncio.to_thread(settled, 0.0)
                # and the key still has exactly its 3
                assert await burst(f"/v1/jobs/{job_id}/events") == [200] * 3 + [429] * 9
            await asyncio.to_thread(settled, 0.0)

        asyncio.run(asyncio.wait_for(go(), 120))
        assert not [p for p in uploads.rglob("*") if p.is_file()], list(uploads.rglob("*"))
        ops.close()
        bob_sync.close()


def test_api_documents_are_served_from_the_gateway_and_only_as_its_docs_mode_says(tmp_path, coordinator, monkeypatch):  # noqa: F811
    """/docs loaded Swagger UI from a CDN (a third party's script on the gateway's origin, where the
    key is typed into "Authorize") and answered anyone off loopback. Now the pages' scripts come
    from the gateway; a keyed gateway serves the document to a key only and no pages unless told
    `open`; `off` serves nothing. The CLI's default is `open` on loopback only."""
    from captionbus.gateway.cli import build_config

    keys = tmp_path / "keys"
    key = add_key(keys, "alice")
    auth = {"Authorization": f"Bearer {key}"}
    pages = ("/docs", "/redoc", "/docs/oauth2-redirect", "/docs-assets/swagger-ui-bundle.js")
    for mode in (None, "key", "open", "off"):
        config = GatewayConfig(
            settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object", host_id="gw"),
            nats_url=coordinator, keys=KeyRing.load(keys), docs=mode)
        with running_gateway(config) as url, httpx.Client(base_url=url, timeout=30) as web:
            if mode == "open":
                for path in ("/openapi.json", *pages):
                    assert web.get(path).status_code == 200, path
                for path in ("/docs", "/redoc"):
                    page = web.get(path).text
                    sources = re.findall(r'(?:src|href)="([^"]*)"', page) + re.findall(r"url: '([^']*)'", page)
                    assert sources and all(s.startswith("/") for s in sources), (path, sources)
                    assert "cdn" not in page and "googleapis" not in page, path
                for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"):
                    served = web.get(f"/docs-assets/{asset}")
                    assert served.status_code == 200 and len(served.content) > 1000, asset
                assert web.get("/docs-assets/../../keys").status_code == 404
                continue
            for path in pages:  # no pages, no scripts, with a key or without
                assert web.get(path, headers=auth).status_code == 404, (mode, path)
            if mode == "off":
                assert web.get("/openapi.json", headers=auth).status_code == 404
                continue
            for headers in ({}, {"Authorization": "Bearer cbk_wrong"}, {"X-Forwarded-For": "127.0.0.1"}):
                refused = web.get("/openapi.json", headers=headers)
                assert refused.status_code == 401 and "paths" not in refused.text, (mode, refused.text)
            assert "/v1/jobs" in web.get("/openapi.json", headers=auth).json()["paths"]
    monkeypatch.setenv("NATS_URL", coordinator)
    assert build_config("127.0.0.1", None, 10, 2, None, (), 60.0).docs == "open"
    assert build_config("127.0.0.1", keys, 10, 2, None, (), 60.0).docs == "key"  # behind a proxy, maybe
    assert build_config("0.0.0.0", keys, 10, 2, None, (), 60.0).docs == "key"
    assert build_config("0.0.0.0", keys, 10, 2, None, (), 60.0, docs="open").docs == "open"


def test_metrics_are_the_operators_and_a_metrics_key_reads_nothing_else(tmp_path, coordinator):  # noqa: F811
    """/metrics counts every key's requests (route, status) and the webhook deliveries of every
    job, and any key read it. Now an ordinary key gets 403; a scraper's key (`add-key --metrics`)
    reads it and is refused every other route (403), so a leaked scraper key lists, submits and
    follows nothing; an admin key reads it too."""
    from fastapi.routing import APIRoute

    keys = tmp_path / "keys"
    made = {"bob": add_key(keys, "bob"), "ops": add_key(keys, "ops", admin=True),
            "scrape": add_key(keys, "scrape", metrics=True)}
    with pytest.raises(ValueError, match="admin or metrics"):
        add_key(keys, "both", admin=True, metrics=True)
    config = GatewayConfig(
        settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object", host_id="gw"),
        nats_url=coordinator, keys=KeyRing.load(keys), max_upload_bytes=64 * 1024)
    with running_gateway(config) as url:
        client = {name: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
                  for name, key in made.items()}
        job_id = submit(client["bob"])
        refused = client["bob"].get("/metrics")
        assert refused.status_code == 403 and "--metrics" in error_of(refused), refused.text
        assert "captionbus_gateway" not in refused.text
        for reader in ("scrape", "ops"):
            text = client[reader].get("/metrics").text
            assert 'route="/v1/jobs",status="201"' in text, reader
            assert "bob" not in text and job_id not in text  # labels name no key and no job
        from captionbus.gateway.app import create_app

        routes = app_routes(create_app(config))
        tried = 0
        for route in routes:
            if route.path in ("/metrics", "/healthz", "/readyz"):
                continue
            assert isinstance(route, APIRoute), route.path
            path = route.path.replace("{job_id}", job_id).replace("{name}", "srt")
            for method in route.methods:
                answer = client["scrape"].request(method, path, files={"file": ("a.wav", b"RIFF a")}
                                                  if method == "POST" else None)
                assert answer.status_code == 403 and "metrics only" in error_of(answer), (method, path, answer.text)
                assert job_id not in answer.text
                tried += 1
        assert tried >= 10
        assert [j["id"] for j in client["ops"].get("/v1/jobs").json()["data"]] == [job_id]  # the scraper made none
        assert client["ops"].get(f"/v1/jobs/{job_id}").json()["status"] in ("pending", "running")  # nor cancelled
        for c in client.values():
            c.close()


def test_a_webhook_names_the_key_whose_job_it_is(door):
    """One secret and one allow-list serve every key: Bob may point his job's callback_url at
    Alice's receiver (both under the allowed `/team-a`), and the events, signed with the one
    secret, did not say whose job they were about. Every delivery now names the job's key (its
    name, never the key) in the signed body's `owner` and in `X-Captionbus-Owner`, on the job's
    own callback and the gateway-wide subscriber's alike; Alice's receiver tells Bob's events from
    her own."""
    import json as jsonlib

    from captionbus.gateway.webhooks import OWNER_HEADER, SIGNATURE_HEADER, verify

    clients, hooks = door
    theirs = submit(clients["bob"], callback_url=f"{hooks.base}/team-a/alice")  # Alice's receiver
    mine = submit(clients["alice"], callback_url=f"{hooks.base}/team-a/alice")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = {(p, jsonlib.loads(b)["job_id"]) for p, _, b in hooks.posts}
        if {(path, job) for path in ("/team-a/alice", AUDIT_PATH) for job in (theirs, mine)} <= got:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"not every delivery came: {sorted(got)}")
    keys = {name: str(c.headers["authorization"]).split()[1] for name, c in clients.items()}
    for path, headers, body in list(hooks.posts):
        assert verify(SECRET, body, headers[SIGNATURE_HEADER.lower()]), path
        event = jsonlib.loads(body)
        owner = {theirs: "bob", mine: "alice"}[event["job_id"]]
        assert event["owner"] == owner and headers[OWNER_HEADER.lower()] == owner, (path, event, headers)
        assert not any(key in body.decode() or key in str(headers) for key in keys.values())
    # a job with no key (the CLI's) names none
    from captionbus.contracts.events import JobStarted
    from captionbus.gateway.dispatch import event_body

    assert "owner" not in jsonlib.loads(event_body(JobStarted(job_id="jcli", workflow="speech", nodes=[]), None))


def test_a_keys_own_webhook_prefixes_are_its_alone(tmp_path, coordinator, monkeypatch):  # noqa: F811
    """With one allow-list for every key, Bob aimed his job's signed events at Alice's receiver.
    The config file's `key_webhook_allow` gives a key prefixes of its own: Bob's callback under
    Alice's prefix is a 422 (as is one under no prefix), under his own or the shared one it is
    taken, and nothing of Bob's reaches Alice's receiver. A file naming a key the keys file
    lacks is refused at start."""
    import json as jsonlib

    import click

    from captionbus.gateway.cli import build_config

    hooks = Hooks()
    keys = tmp_path / "keys"
    made = {name: add_key(keys, name) for name in ("alice", "bob")}
    config = GatewayConfig(
        settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object", host_id="gw"),
        nats_url=coordinator, keys=KeyRing.load(keys), max_upload_bytes=64 * 1024, webhook_secret=SECRET,
        webhook_allow=[f"{hooks.base}/shared"],
        key_webhook_allow={"alice": [f"{hooks.base}/alice"], "bob": [f"{hooks.base}/bob"]})
    with running_gateway(config) as url:
        alice, bob = (httpx.Client(base_url=url, headers={"Authorization": f"Bearer {made[n]}"}, timeout=30)
                      for n in ("alice", "bob"))
        for path in ("/alice", "/alice/x", "/alicex", "/bob/../alice", "/other"):
            answer = bob.post("/v1/jobs", files={"file": ("a.wav", b"RIFF a")},
                              data={"workflow": "speech", "callback_url": hooks.base + path})
            assert answer.status_code == 422 and "callback URL" in error_of(answer), (path, answer.text)
        jobs = {"bob": submit(bob, callback_url=f"{hooks.base}/bob/in"),
                "bob-shared": submit(bob, callback_url=f"{hooks.base}/shared/bob"),
                "alice": submit(alice, callback_url=f"{hooks.base}/alice/in")}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if {jsonlib.loads(b)["job_id"] for _, _, b in hooks.posts} >= set(jobs.values()):
                break
            time.sleep(0.1)
        seen = {(p, jsonlib.loads(b)["job_id"], jsonlib.loads(b)["owner"]) for p, _, b in hooks.posts}
        assert {(p, owner) for p, _, owner in seen} == {("/bob/in", "bob"), ("/shared/bob", "bob"),
                                                         ("/alice/in", "alice")}, seen
        alice.close()
        bob.close()
    hooks.server.shutdown()
    gateway_file = tmp_path / "gateway.toml"
    gateway_file.write_text('[key_webhook_allow]\ncarol = ["http://127.0.0.1:9/carol"]\n')
    monkeypatch.setenv("NATS_URL", coordinator)
    monkeypatch.setenv("CAPTIONBUS_WEBHOOK_SECRET", "s")
    with pytest.raises(click.ClickException, match="carol"):
        build_config("127.0.0.1", keys, 10, 2, None, (), 60.0, gateway_file)
    gateway_file.write_text('[key_webhook_allow]\nalice = ["http://127.0.0.1:9/alice"]\n')
    assert build_config("127.0.0.1", keys, 10, 2, None, (), 60.0, gateway_file).key_webhook_allow == \
        {"alice": ["http://127.0.0.1:9/alice"]}


def test_a_bus_client_cannot_give_its_job_to_a_key(door, coordinator, tmp_path):  # noqa: F811
    """`JobSpec.owner` is a name any login that may submit can write: a CLI `client` login (or
    a tenant) submitting with `owner="alice"` planted a job in Alice's list, readable and
    cancellable with her key, and the gateway-wide subscriber's signed events named Alice as
    its owner. The gateway now trusts an owner only with its proof (an HMAC of the job id and
    what it asks for under the key's stored hash, made when the gateway submits): jobs submitted
    on the bus with Alice's name and no proof, a made-up proof, the proof of Alice's real job
    copied onto another id, or onto her own id once her job is gone (gc) with other work, are no
    key's. Alice sees only her own jobs; the admin key sees the planted ones with no owner; their
    deliveries to the subscriber name no owner while Alice's job's do."""
    import asyncio
    import json as jsonlib

    import nats

    from captionbus import client as bus_client
    from captionbus.contracts import JobStatus, subjects
    from captionbus.core.artifacts import ArtifactStore
    from captionbus.gateway.webhooks import OWNER_HEADER

    clients, hooks = door
    real = submit(clients["alice"])
    real_proof = clients["ops"].get(f"/v1/jobs/{real}").json()["owner"]
    assert real_proof == "alice"
    media = tmp_path / "planted.wav"
    media.write_bytes(b"RIFF planted")

    async def plant() -> dict[str, str]:
        nc = await nats.connect(coordinator)
        try:
            js = nc.jetstream()
            store = ArtifactStore(Settings(home=tmp_path / "bus", nats_url=coordinator, artifacts_mode="object",
                                           host_id="bus"), js)
            state = await bus_client.job_state(js, real)
            copied = state.spec.owner_proof
            assert copied and len(copied) == 64
            planted = {}
            for label, proof in (("no proof", None), ("made up", lambda spec: "0" * 64),
                                 ("copied", lambda spec: copied)):
                spec = await bus_client.submit(js, store, media, workflow="speech", owner="alice", owner_proof=proof)
                planted[label] = spec.job_id
            # Alice's job gone (gc), its id submitted again with her name and proof but other work
            await (await js.key_value(subjects.JOBS_BUCKET)).delete(real)
            again = await bus_client.submit(js, store, media, workflow="speech", job_id=real, owner="alice",
                                            owner_proof=lambda spec: copied)
            planted["same id, other work"] = again.job_id
            return planted
        finally:
            await nc.close()

    planted = asyncio.run(plant())
    for job_id in planted.values():
        wait_status(clients["ops"], job_id, {s.value for s in JobStatus})
    listed = [j["id"] for j in clients["alice"].get("/v1/jobs").json()["data"]]
    assert not set(planted.values()) & set(listed), (listed, planted)
    for label, job_id in planted.items():
        assert clients["alice"].get(f"/v1/jobs/{job_id}").status_code == 404, label
        assert clients["alice"].post(f"/v1/jobs/{job_id}/cancel").status_code == 404, label
        seen = clients["ops"].get(f"/v1/jobs/{job_id}")
        assert seen.status_code == 200 and seen.json()["owner"] is None, (label, seen.text)
    mine = submit(clients["alice"])
    assert clients["alice"].get(f"/v1/jobs/{mine}").json()["owner"] == "alice"
    assert mine in [j["id"] for j in clients["alice"].get("/v1/jobs").json()["data"]]

    # (the id submitted twice has deliveries of both jobs: left out here)
    wanted = {mine, *planted.values()} - {real}
    deadline = time.monotonic() + 30
    while not wanted <= {jsonlib.loads(b)["job_id"] for p, _, b in list(hooks.posts) if p == AUDIT_PATH}:
        assert time.monotonic() < deadline, sorted(wanted)
        time.sleep(0.1)
    for path, headers, body in list(hooks.posts):
        event = jsonlib.loads(body)
        if path != AUDIT_PATH or event["job_id"] not in wanted:
            continue
        if event["job_id"] == mine:
            assert event["owner"] == "alice" and headers[OWNER_HEADER.lower()] == "alice"
        else:
            assert "owner" not in event and OWNER_HEADER.lower() not in headers, (event, headers)
