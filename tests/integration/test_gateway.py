"""The gateway's job API and its errors against a real nats-server and the real coordinator
(in-process); no stage services, so jobs stay queued until cancelled. The e2e test
(tests/e2e/test_gateway.py) runs real jobs through it."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import httpx
import pytest

from captionbus.gateway.app import GatewayConfig
from captionbus.gateway.keys import KeyRing, add_key
from captionbus.runner import coordinator_task
from captionbus.core.bus import connect, provision
from captionbus.core.settings import Settings
from tests.gatewaytools import check_waits_for_the_bus, free_port, running_gateway


@pytest.fixture
def coordinator(nats_server):
    """The real coordinator on the test's bus, in a thread of its own event loop."""
    stop = threading.Event()
    ready = threading.Event()

    def run():
        async def go():
            nc = await connect(nats_server, "test-coordinator")
            await provision(nc.jetstream())
            async with coordinator_task(nc):
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.1)
            await nc.close()

        asyncio.run(go())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield nats_server
    stop.set()
    thread.join(20)


@pytest.fixture
def gateway(tmp_path, coordinator):
    key = add_key(tmp_path / "keys", "ci")
    (tmp_path / "scrape.key").write_text(add_key(tmp_path / "keys", "scrape", metrics=True))  # reads /metrics only
    config = GatewayConfig(
        settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object", host_id="gw"),
        nats_url=coordinator, keys=KeyRing.load(tmp_path / "keys"), max_upload_bytes=64 * 1024,
        concurrency_per_key=2, inputs_dir=tmp_path / "inputs",
    )
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "clip.wav").write_bytes(b"RIFF not really")
    (tmp_path / "secret.wav").write_bytes(b"outside")
    with running_gateway(config) as url:
        yield httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == response.status_code
    assert "\n" not in body["error"]["message"]
    return body["error"]["message"]


def test_job_api_errors_and_lifecycle(gateway, tmp_path):
    # 401: no key, a wrong key
    assert httpx.get(f"{gateway.base_url}/v1/jobs").status_code == 401
    bad = httpx.get(f"{gateway.base_url}/v1/jobs", headers={"Authorization": "Bearer cbk_nope"})
    assert bad.status_code == 401 and "add-key" in error_of(bad)
    # 400: not multipart, no input, a URL, a path outside the inputs dir
    assert gateway.post("/v1/jobs", json={"workflow": "transcribe"}).status_code == 400
    assert "no input" in error_of(gateway.post("/v1/jobs", data={"workflow": "transcribe"}))
    assert "reads no URLs" in error_of(gateway.post("/v1/jobs", data={"url": "http://169.254.169.254/x"}))
    outside = gateway.post("/v1/jobs", data={"path": "../secret.wav"})
    assert outside.status_code == 400 and "outside" in error_of(outside)
    # 413: over the upload limit (64 KiB here)
    big = gateway.post("/v1/jobs", files={"file": ("big.wav", b"x" * (200 * 1024))})
    assert big.status_code == 413 and "limit" in error_of(big)
    # 422: validated as `submit` validates
    unknown = gateway.post("/v1/jobs", files={"file": ("a.wav", b"RIFF")}, data={"workflow": "nope"})
    assert unknown.status_code == 422 and "unknown workflow 'nope'" in error_of(unknown)
    bad_option = gateway.post("/v1/jobs", files={"file": ("a.wav", b"RIFF")},
                              data={"options": '{"asr": {"bogus": 1}}'})
    assert bad_option.status_code == 422 and "bogus" in error_of(bad_option)
    bad_lang = gateway.post("/v1/jobs", files={"file": ("a.wav", b"RIFF")}, data={"source_language": "xx"})
    assert bad_lang.status_code == 422 and "unknown language code" in error_of(bad_lang)
    # 422: a callback URL on a gateway that sends no webhooks
    hook = gateway.post("/v1/jobs", files={"file": ("a.wav", b"RIFF")}, data={"callback_url": "http://127.0.0.1:1/"})
    assert hook.status_code == 422 and "webhook" in error_of(hook)
    # 404
    assert "no job" in error_of(gateway.get("/v1/jobs/jnope"))
    assert gateway.get("/v1/jobs/..%2F..%2Fetc").status_code == 404

    # A job from an upload and one from the inputs dir; no stage services: they stay queued.
    created = gateway.post("/v1/jobs", files={"file": ("talk.wav", b"RIFF upload")},
                           data={"workflow": "transcribe", "source_language": "en"})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert gateway.get(created.json()["url"]).status_code == 200  # a 201's URL answers at once
    by_path = gateway.post("/v1/jobs", data={"path": "clip.wav", "workflow": "speech"})
    assert by_path.status_code == 201, by_path.text
    wait_status(gateway, by_path.json()["id"], {"pending", "running"})  # recorded by the coordinator

    job = wait_status(gateway, job_id, {"running"})
    assert job["input"] == "talk.wav" and job["workflow"] == "transcribe" and "demux" in job["nodes"]
    listed = gateway.get("/v1/jobs", params={"workflow": "speech"}).json()["data"]
    assert [j["id"] for j in listed] == [by_path.json()["id"]]
    assert job_id in [j["id"] for j in gateway.get("/v1/jobs", params={"status": "running"}).json()["data"]]
    missing = gateway.get(f"/v1/jobs/{job_id}/outputs/srt")
    assert missing.status_code == 404 and "no output 'srt'" in error_of(missing)
    # 409: retry of a running job; cancel, then cancel again
    assert gateway.post(f"/v1/jobs/{job_id}/retry").status_code == 409
    assert gateway.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    wait_status(gateway, job_id, {"cancelled"})
    again = gateway.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "already cancelled" in error_of(again)

    # SSE: the whole history of a finished job, then a resume after the first event.
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.iter_lines())
    kinds = [e["event"] for e in events]
    assert kinds[0] == "submitted" and kinds[-1] == "cancelled" and "cancel_requested" in kinds
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[0])}) as response:
        resumed = parse_sse(response.iter_lines())
    assert [e["id"] for e in resumed] == [e["id"] for e in events[1:]]


def test_openapi_declares_the_bearer_scheme_response_models_and_the_real_error_shape(gateway):
    spec = gateway.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/models", "/metrics"} <= set(spec["paths"])
    # a keyed gateway's default (routes/docs.py): the document with a key, no pages
    assert httpx.get(f"{gateway.base_url}/openapi.json").status_code == 401 and gateway.get("/docs").status_code == 404
    models = gateway.get("/v1/models").json()
    assert models == {"object": "list", "data": []}  # no asr worker is up
    # "Try it out" sends the key: a bearer scheme, required by every /v1 operation.
    assert spec["components"]["securitySchemes"]["apiKey"] == {**spec["components"]["securitySchemes"]["apiKey"],
                                                               "type": "http", "scheme": "bearer"}
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's {"detail"} is not what the API answers
    assert set(schemas["ErrorBody"]["properties"]) == {"error"}
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            if path.startswith("/v1/"):
                assert operation["security"] == [{"apiKey": []}], (method, path)
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
            ok = operation["responses"].get("200") or operation["responses"].get("201") or operation["responses"]["202"]
            assert ok.get("content"), (method, path)  # a schema or the media type it streams
    assert spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/Job"}
    verbose = schemas["VerboseSegment"]["properties"]
    assert {"type": "null"} in verbose["no_speech_prob"]["anyOf"]  # null, never a made-up 0.0
    form = spec["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and form["properties"]["file"]["format"] == "binary"
    assert "known_speaker_references[]" in form["properties"]  # gpt-4o-transcribe-diarize takes them
    translation = spec["paths"]["/v1/audio/translations"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert not {"known_speaker_names[]", "known_speaker_references[]"} & set(translation["schema"]["properties"])


def test_every_refusal_is_one_error_shape_and_nothing_is_started(gateway):
    """An attacker's and a careless client's requests: each is a 4xx in {"error": ...} with a short
    message, none starts a job, and the connection is fine for the next request."""
    before = len(gateway.get("/v1/jobs").json()["data"])
    empty = gateway.post("/v1/jobs", files={"file": ("empty.wav", b"")})
    assert empty.status_code == 400 and "empty (0 bytes)" in error_of(empty)
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        empty = gateway.post(path, files={"file": ("empty.wav", b"")}, data={"model": "whisper-1"})
        assert empty.status_code == 400 and "empty (0 bytes)" in error_of(empty), empty.text
        for size in (5_000_000, 100_000):  # over the body's limit (64 KiB upload + 2 MiB fields), and not
            huge = gateway.post(path, files={"file": ("a.wav", b"RIFF")}, data={"language": "e" * size})
            assert huge.status_code == 413 and "limit" in error_of(huge) and len(huge.content) < 1000  # not echoed
            assert huge.headers["connection"] == "close"  # the rest of the body is unread: not reused
        assert "form field 'language' is over its limit of 4096 bytes" in error_of(huge)
        unknown = gateway.post(path, files={"file": ("a.wav", b"RIFF")}, data={"model": "gpt-4o-transcribe"})
        assert unknown.status_code == 400 and "'gpt-4o-transcribe' is not served here" in error_of(unknown)
        assert unknown.headers.get("connection") != "close"  # the body was read: the connection serves on
    long_value = gateway.post("/v1/jobs", files={"file": ("a.wav", b"RIFF")}, data={"workflow": "w" * 3000})
    assert long_value.status_code == 422 and len(error_of(long_value)) <= 400  # clipped, one line
    assert error_of(gateway.get("/v1/nope")) and gateway.get("/v1/nope").status_code == 404
    assert gateway.delete("/v1/jobs").status_code == 405 and error_of(gateway.delete("/v1/jobs"))
    bad_query = gateway.get("/v1/jobs", params={"limit": "many"})
    assert bad_query.status_code == 422 and "limit" in error_of(bad_query)
    assert len(gateway.get("/v1/jobs").json()["data"]) == before  # no job was created by any of them


def test_models_are_names_a_client_sends_back_and_an_unknown_model_is_400(gateway, coordinator):
    """An asr worker (a real $SRV service on the bus, registered as the runtime registers one)
    describes its model by a server path; /v1/models lists the folder's name, which the asr stage
    accepts as `model`, and an unknown model is refused naming those that are served."""
    import nats.micro

    async def asr_worker(stop: threading.Event, up: threading.Event):
        nc = await connect(coordinator, "test-asr")
        service = await nats.micro.add_service(
            nc, name="captionbus-asr", version="1.0.0", metadata={"stage": "asr", "worker_id": "t-asr"},
            stats_handler=lambda _e: {"model": "/srv/secret/models/whisper-base-ct2 (int8, cpu)"})
        await service.add_endpoint(name="info", subject="captionbus.test.asr.info", handler=lambda r: r.respond(b"{}"))
        await nc.flush()
        up.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await service.stop()
        await nc.close()

    stop, up = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: asyncio.run(asr_worker(stop, up)), daemon=True)
    worker.start()
    try:
        assert up.wait(20)
        ids = [m["id"] for m in gateway.get("/v1/models").json()["data"]]
        for _ in range(50):  # the list is cached 5 s; the first look may predate the worker
            if len(ids) == 2:
                break
            time.sleep(0.2)
            ids = [m["id"] for m in gateway.get("/v1/models").json()["data"]]
        assert ids == ["whisper-1", "whisper-base-ct2"]
        unknown = gateway.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")},
                               data={"model": "/srv/secret/models/whisper-base-ct2"})
        assert unknown.status_code == 400 and "whisper-1, whisper-base-ct2" in error_of(unknown)
        assert "/srv/secret" not in gateway.get("/v1/models").text
    finally:
        stop.set()
        worker.join(10)


def test_the_gateway_counts_its_requests_and_their_latency_on_metrics(gateway, tmp_path):
    gateway.get("/v1/jobs/jnope")
    gateway.get("/v1/jobs")
    assert httpx.get(f"{gateway.base_url}/metrics").status_code == 401  # keys are on: a metrics or admin key reads it
    assert gateway.get("/metrics").status_code == 403  # an ordinary key: it counts every key's requests
    scrape = {"Authorization": f"Bearer {(tmp_path / 'scrape.key').read_text()}"}
    text = httpx.get(f"{gateway.base_url}/metrics", headers=scrape).text
    assert 'captionbus_gateway_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'captionbus_gateway_requests_total{method="GET",route="/v1/jobs",status="200"} 1.0' in text
    assert 'captionbus_gateway_requests_total{method="GET",route="/metrics",status="403"} 1.0' in text
    assert 'captionbus_gateway_request_seconds_count{method="GET",route="/v1/jobs"} 1.0' in text
    assert "captionbus_gateway_webhook_deliveries_total" in text or "captionbus_gateway_webhook_failed_attempts" in text
    assert "jnope" not in text  # labels are route templates, never ids


def test_a_key_sees_and_acts_on_its_own_jobs_only(tmp_path, coordinator):
    """Bob holds Alice's job id (leaked, guessed, or seen in a log) and tries everything with it;
    each answers exactly as for a job that does not exist, and the job is untouched. An admin key
    sees and acts on every job."""
    keys = tmp_path / "keys"
    alice, bob, ops = add_key(keys, "alice"), add_key(keys, "bob"), add_key(keys, "ops", admin=True)
    config = GatewayConfig(
        settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object", host_id="gw"),
        nats_url=coordinator, keys=KeyRing.load(keys), max_upload_bytes=64 * 1024)
    with running_gateway(config) as url:
        as_alice, as_bob, as_ops = (httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=30)
                                    for k in (alice, bob, ops))
        created = as_alice.post("/v1/jobs", files={"file": ("talk.wav", b"RIFF alice")}, data={"workflow": "speech"})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        mine = wait_status(as_alice, job_id, {"running"})
        assert mine["owner"] == "alice"
        unknown = as_bob.get("/v1/jobs/jdoesnotexist")

        assert job_id not in [j["id"] for j in as_bob.get("/v1/jobs").json()["data"]]
        for method, path in [("GET", ""), ("GET", "/events"), ("GET", "/outputs/transcript"), ("GET", "/webhooks"),
                             ("GET", "/deliveries"), ("POST", "/cancel"), ("POST", "/retry")]:
            answer = as_bob.request(method, f"/v1/jobs/{job_id}{path}")
            assert answer.status_code == 404, (method, path, answer.text)
            assert error_of(answer) == f"no job {job_id!r}" and unknown.json()["error"]["type"] == answer.json()["error"]["type"]
        with as_bob.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "1"}) as sse:
            assert sse.status_code == 404 and "text/event-stream" not in sse.headers["content-type"]
        assert as_alice.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # bob's cancel did nothing

        # The admin key lists and acts on it; Alice still reads it; Bob's own job is his alone.
        assert job_id in [j["id"] for j in as_ops.get("/v1/jobs").json()["data"]]
        assert as_ops.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        wait_status(as_alice, job_id, {"cancelled"})
        bobs = as_bob.post("/v1/jobs", files={"file": ("b.wav", b"RIFF bob")}, data={"workflow": "speech"}).json()["id"]
        wait_status(as_bob, bobs, {"pending", "running"})  # the coordinator has recorded it
        assert [j["id"] for j in as_bob.get("/v1/jobs").json()["data"]] == [bobs]
        assert as_alice.post(f"/v1/jobs/{bobs}/cancel").status_code == 404
        assert as_bob.post(f"/v1/jobs/{bobs}/cancel").status_code == 202
        assert as_alice.post(f"/v1/jobs/{job_id}/retry").status_code == 202  # her own, cancelled: retried


def test_openai_endpoints_refuse_bad_requests_with_openai_errors(gateway):
    wav = {"file": ("a.wav", b"RIFF")}
    cases = [
        ("/v1/audio/transcriptions", None, {"model": "whisper-1"}, "file is required"),
        ("/v1/audio/transcriptions", wav, {"response_format": "tsv"}, "response_format 'tsv' unknown"),
        ("/v1/audio/transcriptions", wav, {"timestamp_granularities[]": "letter"}, "word and/or segment"),
        ("/v1/audio/transcriptions", wav, {"language": "xx"}, "unknown language code 'xx'"),
        ("/v1/audio/transcriptions", wav, {"temperature": "hot"}, "temperature must be a number"),
        ("/v1/audio/translations", wav, {"language": "xx"}, "unknown language code 'xx'"),
        ("/v1/audio/translations", wav, {"response_format": "tsv"}, "response_format 'tsv' unknown"),
    ]
    for path, files, data, message in cases:
        response = gateway.post(path, files=files, data=data) if files else gateway.post(path, data=data)
        assert response.status_code == 400 and message in error_of(response), (path, data, response.text)
        assert error_of(response) and response.json()["error"]["type"] == "invalid_request_error"

def test_bus_unavailable_is_503(tmp_path):
    dead = f"nats://127.0.0.1:{free_port()}"
    config = GatewayConfig(settings=Settings(home=tmp_path / "gw", nats_url=dead, host_id="gw"), nats_url=dead)
    with running_gateway(config, ready=False) as url:
        response = httpx.get(f"{url}/v1/jobs", timeout=30)
    assert response.status_code == 503 and "bus unavailable" in error_of(response)


def wait_status(client: httpx.Client, job_id: str, wanted: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}")
        if job.status_code == 200 and job.json()["status"] in wanted:
            return job.json()
        time.sleep(0.2)
    pytest.fail(f"job {job_id} never reached {wanted}: {client.get(f'/v1/jobs/{job_id}').text}")


def parse_sse(lines) -> list[dict]:
    events, current = [], {}
    for line in lines:
        if not line:
            if "data" in current:
                events.append(current)
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value.lstrip(" ")
    return events


def test_concurrency_limit_429_and_job_timeout_504(tmp_path, coordinator):
    """One request in flight per key here: a second is refused while the first waits for a job
    that no asr worker will run, which then answers 504 (its job goes on)."""
    key = add_key(tmp_path / "keys", "ci")
    config = GatewayConfig(
        settings=Settings(home=tmp_path / "gw", nats_url=coordinator, artifacts_mode="object", host_id="gw"),
        nats_url=coordinator, keys=KeyRing.load(tmp_path / "keys"), concurrency_per_key=1, job_timeout_s=4,
    )
    headers = {"Authorization": f"Bearer {key}"}
    with running_gateway(config) as url:
        first: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: first.append(httpx.post(
            f"{url}/v1/audio/transcriptions", headers=headers, files={"file": ("a.wav", b"RIFF")},
            data={"model": "whisper-1"}, timeout=30)))
        waiting.start()
        time.sleep(1.5)
        second = httpx.post(f"{url}/v1/audio/transcriptions", headers=headers,
                            files={"file": ("b.wav", b"RIFF")}, timeout=30)
        assert second.status_code == 429 and "in flight" in error_of(second)
        waiting.join(30)
    assert first[0].status_code == 504 and "did not end within 4 s" in error_of(first[0])


def test_gateway_refuses_non_loopback_without_keys(tmp_path):
    done = subprocess.run([sys.executable, "-m", "captionbus", "gateway", "--listen", "0.0.0.0:0"],
                          env={**os.environ, "CAPTIONBUS_HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0 and "without auth: pass --keys FILE" in done.stderr and "Traceback" not in done.stderr



def test_sse_resume_on_a_running_job(gateway, coordinator):
    """A client reads a running job's events, drops the connection, events happen while it is
    away, and it reconnects with Last-Event-ID: it gets exactly the stored events after that id,
    then live ones as they are published, to the job's end. The test plays the demux worker (no
    stage services here) by publishing real stage_progress events on the bus."""
    from captionbus.contracts.events import StageProgress
    from captionbus.core.bus import publish_event

    created = gateway.post("/v1/jobs", files={"file": ("talk.wav", b"RIFF upload")},
                           data={"workflow": "speech", "source_language": "en"})
    job_id = created.json()["id"]
    wait_status(gateway, job_id, {"running"})

    async def publish_progress(fractions: list[float]) -> None:
        nc = await connect(coordinator, "test-worker")
        js = nc.jetstream()
        for fraction in fractions:
            await publish_event(js, StageProgress(job_id=job_id, stage="demux", node="demux", attempt=1,
                                                  fraction=fraction, message=f"at {fraction}"))
        await nc.close()

    # First connection: read up to demux's stage_requested, then hang up mid-job.
    first = []
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        for event in iter_sse(response.iter_lines()):
            first.append(event)
            if event["event"] == "stage_requested":
                break
    assert [e["event"] for e in first][:2] == ["submitted", "started"]
    last_id = first[-1]["id"]

    asyncio.run(publish_progress([0.1, 0.2]))  # while the client is away: stored, not seen
    resumed: list[dict] = []
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last_id}) as response:
        lines = response.iter_lines()
        events = iter_sse(lines)
        resumed += [next(events), next(events)]  # the two stored while away, and nothing before them
        assert [json.loads(e["data"])["fraction"] for e in resumed] == [0.1, 0.2]
        assert int(resumed[0]["id"]) > int(last_id)
        asyncio.run(publish_progress([0.3]))  # live, on the open stream
        resumed.append(next(events))
        assert json.loads(resumed[-1]["data"])["fraction"] == 0.3
        assert gateway.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        resumed += list(events)  # cancel_requested, cancelled: then the stream ends
    assert [e["event"] for e in resumed] == ["stage_progress"] * 3 + ["cancel_requested", "cancelled"]
    ids = [int(e["id"]) for e in resumed]
    assert ids == sorted(set(ids)) and ids[0] > int(last_id)

    # The whole history is the first connection's events + the resumed ones, nothing lost or twice.
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        everything = parse_sse(response.iter_lines())
    assert [e["id"] for e in everything] == [e["id"] for e in first + resumed]


def iter_sse(lines):
    """Events as they arrive (parse_sse reads to the end of the stream)."""
    current: dict = {}
    for line in lines:
        if not line:
            if "data" in current:
                yield current
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value.lstrip(" ")


def test_the_openai_client_gets_documented_errors_and_its_next_request_succeeds(gateway):
    """The official client, as integrators use it: each refusal raises the client's exception for
    its status with our message, and the same client's next request goes through (it once failed
    with APIConnectionError 3 times in 6 after a refused upload). Six rounds, one connection pool."""
    import openai

    key = gateway.headers["authorization"].split(" ", 1)[1]
    ai = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0, timeout=30)
    cases = [
        (openai.BadRequestError, 400, "empty (0 bytes)", dict(model="whisper-1", file=("e.wav", b""))),
        (openai.APIStatusError, 413, "'language' is over its limit", dict(model="whisper-1", file=("a.wav", b"RIFF"),
                                                                          language="e" * 100_000)),
        (openai.APIStatusError, 413, "over this gateway's limit", dict(model="whisper-1", file=("a.wav", b"R" * 200_000))),
        (openai.BadRequestError, 400, "'gpt-4o-transcribe' is not served here", dict(model="gpt-4o-transcribe",
                                                                                     file=("a.wav", b"RIFF"))),
        (openai.BadRequestError, 400, "response_format 'tsv' unknown", dict(model="whisper-1", file=("a.wav", b"RIFF"),
                                                                            response_format="tsv")),
    ]
    for _ in range(6):
        for kind, status, message, request in cases:
            with pytest.raises(kind) as raised:
                ai.audio.transcriptions.create(**request)
            assert raised.value.status_code == status and message in raised.value.message, raised.value
            assert raised.value.body["code"] == status  # the client hands over our {"error": {...}}
            assert ai.models.list().data == []  # the next request on the same client succeeds
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="cbk_wrong", max_retries=0).models.list()
        with pytest.raises(openai.NotFoundError, match="no job"):
            ai.get(f"/jobs/jnope-{_}", cast_to=dict)


def test_the_gateway_starts_before_the_bus_waits_and_survives_its_restart(tmp_path):
    check_waits_for_the_bus(["gateway"], "/v1/jobs", tmp_path, {**os.environ, "CAPTIONBUS_HOME": str(tmp_path / "home")})


def test_an_end_recovered_by_replay_is_the_jobs_last_terminal_event(nats_server, tmp_path):
    """The gateway's plain subscription missed the job's end (it was reconnecting), so the OpenAI
    request reads the end back from the job's stream (Gateway.wait_for_end's replay). A job that
    was cancelled, retried and then completed has `cancelled` in the middle of its history: the
    recovered end is `completed`, the last terminal event, and its outputs are the completed ones."""
    from captionbus import client
    from captionbus.gateway.state import Gateway
    from captionbus.contracts import ArtifactRef, JobSpec, JobState, new_job_id, subjects
    from captionbus.contracts import events as ev
    from captionbus.contracts.jobs import JobStatus
    from captionbus.core.bus import publish_event

    job_id = new_job_id()
    spec = JobSpec(job_id=job_id, workflow="transcribe", input=ArtifactRef(key="0" * 64, name="talk.wav", size=1))
    transcript = ArtifactRef(key="1" * 64, name="talk.transcript.json", size=2)
    started = ev.JobStarted(job_id=job_id, workflow="transcribe", nodes=["asr"])
    history = [ev.JobSubmitted(job_id=job_id, spec=spec), started, ev.JobCancelRequested(job_id=job_id),
               ev.JobCancelled(job_id=job_id), ev.JobRetryRequested(job_id=job_id), started.model_copy(),
               ev.JobCompleted(job_id=job_id, outputs={"transcript": transcript})]

    async def go():
        nc = await connect(nats_server, "test-history")
        js = nc.jetstream()
        await provision(js)
        for event in history:
            await publish_event(js, event)
        kv = await js.key_value(subjects.JOBS_BUCKET)
        await kv.put(job_id, JobState(spec=spec, status=JobStatus.completed).model_dump_json().encode())
        gateway = Gateway(GatewayConfig(settings=Settings(home=tmp_path / "gw", nats_url=nats_server, host_id="gw"),
                                        nats_url=nats_server, job_timeout_s=30), client.job_events)
        gateway.ends.recheck_s = 0.05
        lost = asyncio.get_running_loop().create_future()  # the subscription never delivers the end
        try:
            with gateway.ends.expect(job_id):
                return await gateway.wait_for_end(js, job_id, lost)
        finally:
            await gateway.webhook_client.aclose()
            await nc.close()

    end = asyncio.run(go())
    assert end.kind == "completed" and end.outputs == {"transcript": transcript}, end
def test_the_speakers_field_switches_on_diarization(gateway):
    """POST /v1/jobs `speakers` (captionbus run --speakers) becomes the diarization stage's param,
    checked like every option; the job's plan then holds the diarization node."""
    created = gateway.post("/v1/jobs", files={"file": ("talk.wav", b"RIFF upload")},
                           data={"workflow": "chunked", "source_language": "en", "speakers": "2-3",
                                 "options": '{"diarization": {"embedder": "campplus"}}'})
    assert created.status_code == 201, created.text
    job = wait_status(gateway, created.json()["id"], {"pending", "running"})
    assert job["options"] == {"diarization": {"embedder": "campplus", "speakers": "2-3"}}
    assert job["nodes"]["diarization"]["stage"] == "diarization"
    assert job["nodes"]["diarization"]["status"] not in ("skipped", "failed"), job["nodes"]
    bad = gateway.post("/v1/jobs", files={"file": ("a.wav", b"RIFF")}, data={"speakers": "0"})
    assert bad.status_code == 422 and "need 1 <= MIN <= MAX <= 20" in error_of(bad)
    clash = gateway.post("/v1/jobs", files={"file": ("a.wav", b"RIFF")},
                         data={"speakers": "3", "options": '{"diarization": {"speakers": "2"}}'})
    assert clash.status_code == 400 and "disagree" in error_of(clash)
    assert gateway.post(f"/v1/jobs/{created.json()['id']}/cancel").status_code == 202


def tone_data_url(tmp_path, seconds: float) -> str:
    clip = tmp_path / f"tone-{seconds}.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"sine=frequency=180:duration={seconds}", str(clip)], check=True, timeout=60)
    return "data:audio/mpeg;base64," + base64.b64encode(clip.read_bytes()).decode()


def test_known_speakers_on_the_job_api_become_uploaded_reference_clips(gateway, tmp_path, coordinator):
    """POST /v1/jobs with OpenAI's known_speaker_names[] / known_speaker_references[]: each data
    URL is decoded, converted to 16 kHz mono WAV and stored as an artifact the diarization params
    name (speakers switched on, the names as SDH names); a caller may not name artifacts itself,
    and a clip that cannot be used is one 400 line, before a job exists."""
    from captionbus.contracts import ArtifactRef
    from captionbus.core.artifacts import ArtifactStore

    clip = tone_data_url(tmp_path, 3)
    created = gateway.post("/v1/jobs", files={"file": ("talk.wav", b"RIFF upload")},
                           data={"workflow": "chunked", "source_language": "en",
                                 "known_speaker_names[]": ["Anna", "Ben"], "known_speaker_references[]": [clip, clip]})
    assert created.status_code == 201, created.text
    job = wait_status(gateway, created.json()["id"], {"pending", "running"})
    options = job["options"]
    assert options["diarization"]["speakers"] == "auto" and list(options["diarization"]["references"]) == ["Anna", "Ben"]
    assert options["subtitle_gen"] == {"speaker_names": {"Anna": "Anna", "Ben": "Ben"}}
    ref = ArtifactRef(**options["diarization"]["references"]["Anna"])
    assert ref.name == "reference-0.wav" and ref.in_object_store

    async def read() -> bytes:
        nc = await connect(coordinator, "t-read")
        try:
            return Path(await ArtifactStore(Settings(home=tmp_path / "reader", nats_url=coordinator,
                                                     artifacts_mode="object", host_id="reader"),
                                            nc.jetstream()).get(ref)).read_bytes()
        finally:
            await nc.close()

    data = asyncio.run(read())
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels()) == (16000, 1) and 2.9 < w.getnframes() / 16000 < 3.1
    assert gateway.post(f"/v1/jobs/{created.json()['id']}/cancel").status_code == 202

    jobs_before = len(gateway.get("/v1/jobs").json()["data"])
    for data, message in [
        ({"options": json.dumps({"diarization": {"speakers": "auto", "references": {"Anna": ref.model_dump()}}})},
         "options.diarization.references is set by the gateway"),
        # a node of another name (the coordinator merges groups by node name and id too)
        ({"options": json.dumps({"who-speaks": {"references": {"Anna": ref.model_dump()}}})},
         "options.who-speaks.references is set by the gateway"),
        ({"known_speaker_names[]": "Anna", "known_speaker_references[]": tone_data_url(tmp_path, 12)},
         "known_speaker_references[0] (Anna) is 12.0 s long; a reference clip is 2-10 s of one speaker"),
        ({"known_speaker_names[]": "Anna", "known_speaker_references[]": "data:audio/wav;base64,UklGRg=="},
         "known_speaker_references[0] (Anna) is not audio FFmpeg can read"),
        ({"known_speaker_names[]": "SPEAKER_00", "known_speaker_references[]": clip}, "SPEAKER_nn"),
        ({"known_speaker_names[]": ["Anna", "Anna"], "known_speaker_references[]": [clip, clip]},
         "'Anna' has two reference clips"),
    ]:
        bad = gateway.post("/v1/jobs", files={"file": ("a.wav", b"RIFF")}, data={"workflow": "chunked", **data})
        assert bad.status_code == 400 and message in error_of(bad), bad.text
    assert len(gateway.get("/v1/jobs").json()["data"]) == jobs_before


def test_fields_total_is_2_mb_on_every_route_and_reference_clips_count_apart_where_taken(gateway, tmp_path):
    """Form fields are held in memory: every route caps them at forms.FIELDS_TOTAL (2 MiB) together;
    known speakers' reference clips (2.6 MB of base64 for 10 s of 48 kHz stereo WAV) count apart,
    only on the routes that take them (POST /v1/jobs, /v1/audio/transcriptions). Before, 14 MB of
    any fields passed on every route."""
    import openai

    jobs_before = len(gateway.get("/v1/jobs").json()["data"])
    # 3 MB of text in `options` fields, each under its own 1 MiB limit: over the total
    options = [json.dumps({"asr": {"pad": "x" * 1_000_000}})] * 3
    over = gateway.post("/v1/jobs", files={"file": ("a.wav", b"RIFF")}, data={"options": options})
    assert over.status_code == 413 and "form fields are over 2097152 bytes together" in error_of(over), over.text
    one = gateway.post("/v1/jobs", files={"file": ("a.wav", b"RIFF")}, data={"options": "x" * 3_000_000})
    assert one.status_code == 413 and "form field 'options' is over its limit of 1048576 bytes" in error_of(one)

    wav = tmp_path / "ref.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=180:duration=9",
                    "-ar", "48000", "-ac", "2", str(wav)], check=True, timeout=60)
    clip = "data:audio/wav;base64," + base64.b64encode(wav.read_bytes()).decode()
    assert 2_200_000 < len(clip) < 3 * 1024 * 1024  # more than every other field may hold together
    created = gateway.post("/v1/jobs", files={"file": ("talk.wav", b"RIFF upload")},
                           data={"workflow": "chunked", "known_speaker_names[]": "Anna", "known_speaker_references[]": clip})
    assert created.status_code == 201, created.text
    assert gateway.post(f"/v1/jobs/{created.json()['id']}/cancel").status_code == 202
    assert len(gateway.get("/v1/jobs").json()["data"]) == jobs_before + 1

    key = gateway.headers["authorization"].split(" ", 1)[1]
    ai = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0, timeout=30)
    # transcriptions takes the clip (the form passes; no diarization worker is up here, so the job is refused)
    with pytest.raises(openai.BadRequestError, match="captionbus serve diarization"):
        ai.audio.transcriptions.create(model="gpt-4o-transcribe-diarize", file=("a.wav", b"RIFF"),
                                       response_format="diarized_json", known_speaker_names=["Anna"],
                                       known_speaker_references=[clip])
    with pytest.raises(openai.APIStatusError) as raised:  # and its other fields have the same 2 MiB total
        ai.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"), prompt="p",
                                       extra_body={f"x{n}": "y" * 4000 for n in range(600)})
    assert raised.value.status_code == 413 and "form fields are over 2097152 bytes together" in raised.value.message
    with pytest.raises(openai.APIStatusError) as raised:  # translations takes no known speakers
        ai.audio.translations.create(model="whisper-1", file=("a.wav", b"RIFF"),
                                     extra_body={"known_speaker_references": [clip[:100_000]]})
    assert raised.value.status_code == 413
    assert "form field 'known_speaker_references[]' is over its limit of 4096 bytes" in raised.value.message


def test_the_door_refuses_diarization_it_cannot_give(gateway):
    """Refused before a job exists: diarized_json from a model that does not diarize, the diarizing
    model while no diarization worker is up (none here), known speakers for a model that does not
    diarize."""
    def ask(**data):
        return gateway.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")}, data=data)

    wrong = ask(model="whisper-1", response_format="diarized_json")
    assert wrong.status_code == 400 and "needs model gpt-4o-transcribe-diarize" in error_of(wrong)
    nobody = ask(model="gpt-4o-transcribe-diarize", response_format="diarized_json")
    assert nobody.status_code == 400 and "captionbus serve diarization" in error_of(nobody)
    named = ask(model="whisper-1", **{"known_speaker_names[]": "Anna"})
    assert named.status_code == 400 and "need model gpt-4o-transcribe-diarize" in error_of(named)
    assert "gpt-4o-transcribe-diarize" not in [m["id"] for m in gateway.get("/v1/models").json()["data"]]
    assert gateway.get("/v1/jobs").json()["data"] == []  # no job was made


def test_a_job_collected_between_the_listing_and_its_parts_leaves_the_listing(nats_server, tmp_path, monkeypatch):
    """GET /v1/jobs lists the jobs' heads, then reads the parts of those it shows (Gateway.whole).
    A job gc removes in between (its record, then its parts) is left out of the answer, as one
    removed before the listing is; before (review of 5ae3b0d) its missing part failed the whole
    listing. A part missing while the job's record is still there stays an error, never a job
    short of nodes."""
    from captionbus.contracts import JobSpec, JobState, JobStatus, NodeState, NodeStatus, subjects
    from captionbus.core.artifacts import ArtifactStore
    from captionbus.gateway.state import Gateway
    from tests.integration.test_gc import _write_parted

    settings = Settings(home=tmp_path / "gw", nats_url=nats_server, artifacts_mode="object", host_id="gw")

    async def seed():
        nc = await connect(nats_server, "seed")
        js = nc.jetstream()
        await provision(js)
        src = tmp_path / "film.wav"
        src.write_bytes(b"RIFF film")
        ref = await ArtifactStore(settings, js).put(src)
        for job_id in ("job-kept", "job-collected", "job-torn"):
            await _write_parted(js, JobState(spec=JobSpec(job_id=job_id, input=ref), status=JobStatus.completed,
                                             nodes={"asr": NodeState(stage="asr", status=NodeStatus.completed,
                                                                     outputs={"srt": ref})}))
        await nc.close()

    asyncio.run(seed())
    listed = Gateway.jobs
    tear = {"job-collected"}

    async def listed_then_collected(self, js, caller):
        heads = await listed(self, js, caller)
        for job_id in tear:  # as gc does (gc._purge_job): the record, then its parts
            await (await js.key_value(subjects.JOBS_BUCKET)).purge(subjects.job_key(job_id))
            await js.purge_stream(f"KV_{subjects.JOBS_BUCKET}",
                                  subject=f"$KV.{subjects.JOBS_BUCKET}.{subjects.job_part_keys(job_id)}")
        return heads

    monkeypatch.setattr(Gateway, "jobs", listed_then_collected)
    config = GatewayConfig(settings=settings, nats_url=nats_server)
    with running_gateway(config) as url:
        response = httpx.get(f"{url}/v1/jobs", timeout=30)
        assert response.status_code == 200, response.text
        shown = {job["id"]: job for job in response.json()["data"]}
        assert set(shown) == {"job-kept", "job-torn"}
        assert all(job["status"] == "completed" for job in shown.values())

        async def torn():  # its parts gone, its record not: an error, not a listing without it
            nc = await connect(nats_server, "tear")
            js = nc.jetstream()
            await js.purge_stream(f"KV_{subjects.JOBS_BUCKET}",
                                  subject=f"$KV.{subjects.JOBS_BUCKET}.{subjects.job_part_keys('job-torn')}")
            await nc.close()

        asyncio.run(torn())
        tear.clear()
        response = httpx.get(f"{url}/v1/jobs", timeout=30)
        assert response.status_code >= 500 and "job-torn" in response.text, response.text
