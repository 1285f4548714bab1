"""The CLI when things go wrong, against a real nats-server: a read the server refuses is exit 4 with
its reason (never an empty list or "no job"), a reader that goes away (`| head`) is quiet, Ctrl-C
on `submit --wait` names the job that goes on, and the services exit 130 on Ctrl-C (issues 18, 19)."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from captionbus import exitcodes
from captionbus.server import _free_port
from tests.natsroles import users_server
from captionbus.contracts import ArtifactRef, JobSpec, JobState, JobSubmitted, new_job_id
from captionbus.contracts.jobs import JobStatus

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_bus import cli, cli_env, finish, start, write  # noqa: E402

INPUT = ArtifactRef(key="0" * 64, name="talk.mp4", size=1)


def jobs(n: int) -> list[JobState]:
    return [JobState(spec=JobSpec(job_id=new_job_id(), input=INPUT), status=JobStatus.running) for _ in range(n)]


@pytest.fixture
def refusing_server(tmp_path):
    """A nats-server with two users: `owner` may do anything; `reader` may connect and see the
    streams (what `require_provisioned` asks) but the server refuses its KV reads and consumers,
    as reads fail while a cluster elects a leader. Yields (owner URL, reader URL)."""
    reader = ('publish: {allow: [">"], deny: ["$JS.API.CONSUMER.>", "$JS.API.DIRECT.GET.>", '
              '"$JS.API.STREAM.MSG.GET.>"]}, subscribe: {allow: [">"]}')
    with users_server(tmp_path, {"owner": None, "reader": reader}, name="server") as urls:
        yield urls["owner"], urls["reader"]


def test_reads_the_server_refuses_are_exit_4_with_the_reason_not_an_empty_answer(refusing_server, tmp_path):
    """Issue 18: `jobs --json` printed 0 jobs with exit 0 while 37 existed, and `status ID` said
    "no job", because every failed read became "nothing"."""
    owner, reader = refusing_server
    states = jobs(3)
    write(owner, states)
    listed = cli(owner, tmp_path, "jobs", "--json")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 3, listed.stderr
    started = time.monotonic()
    procs = {name: start(reader, tmp_path, *args) for name, args in (
        ("jobs", ["jobs", "--json"]), ("status", ["status", states[0].job_id]),
        ("events", ["events", states[0].job_id]), ("fetch", ["fetch", states[0].job_id]))}
    errors = {}
    for name, proc in procs.items():
        out, errors[name] = finish(proc, 60)
        assert proc.returncode == exitcodes.BUS, (name, proc.returncode, out, errors[name])
        assert out == "", (name, out)  # not an empty list, not a table header
        assert "no job" not in errors[name] and "Traceback" not in errors[name], errors[name]
        assert "no answer from NATS within 20 s (last: timeout)" in errors[name], errors[name]
    assert "error: listing jobs:" in errors["jobs"]
    assert f"error: reading job {states[0].job_id}:" in errors["status"]
    took = time.monotonic() - started
    assert 19 < took < 45, took  # retried through the failover window, then stopped


@pytest.mark.parametrize("command", [["jobs", "--json"], ["events"]])
def test_a_reader_that_goes_away_is_quiet(nats_server, tmp_path, command):
    """`captionbus jobs --json | head` printed `internal error: BrokenPipeError`. 300 records are
    more than a pipe holds (64 KiB), so the write after `head` has gone fails for certain."""
    states = jobs(300)
    write(nats_server, states, [JobSubmitted(job_id=s.job_id, spec=s.spec) for s in states])
    done = subprocess.run(
        f"{sys.executable} -m captionbus {' '.join(command)} | head -n 1; echo \"exit=${{PIPESTATUS[0]}}\" >&2",
        shell=True, executable="/bin/bash", env=cli_env(nats_server, tmp_path), capture_output=True, text=True,
        timeout=120)
    assert len(done.stdout.splitlines()) == 1 and json.loads(done.stdout)["spec"]
    assert done.stderr.strip() == f"exit={exitcodes.BROKEN_PIPE}", done.stderr


def test_ctrl_c_on_submit_wait_names_the_job_and_leaves_it_running(nats_server, tmp_path):
    """Issue 19: `submit --wait` on Ctrl-C printed only "interrupted". The job is the bus's: it goes
    on, and the user is told its id and how to follow, fetch or stop it."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    write(nats_server)  # the streams, as a running stack has them
    coordinator = start(nats_server, tmp_path, "coordinator")
    try:
        waiter = start(nats_server, tmp_path, "submit", str(clip), "--wait", "--out", str(tmp_path / "out"))
        deadline = time.monotonic() + 60
        said = ""
        while "submitted" not in said:
            assert time.monotonic() < deadline and waiter.poll() is None, said
            said += waiter.stderr.readline()
        job_id = re.search(r"job (\S+) \(transcribe\) submitted", said)[1]
        time.sleep(1)
        waiter.send_signal(signal.SIGINT)
        out, err = finish(waiter, 30)
        err = said + err
        assert waiter.returncode == exitcodes.INTERRUPTED, err
        assert f"interrupted; job {job_id} goes on" in err, err
        assert f"captionbus events {job_id} --follow" in err and f"captionbus fetch {job_id} --out" in err, err
        assert f"captionbus cancel {job_id}" in err and "Traceback" not in err
        state = cli(nats_server, tmp_path, "status", job_id, "--json")
        assert state.returncode == 0 and json.loads(state.stdout)["status"] in ("pending", "running"), state.stdout
    finally:
        coordinator.send_signal(signal.SIGINT)
        _, err = finish(coordinator, 30)
    assert coordinator.returncode == exitcodes.INTERRUPTED, err  # Ctrl-C: 130, as README says


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, exitcodes.INTERRUPTED), (signal.SIGTERM, exitcodes.OK)])
@pytest.mark.parametrize("command, path", [(["gateway"], "/healthz"), (["dashboard"], "/healthz")])
def test_services_exit_130_on_ctrl_c_and_0_when_a_supervisor_stops_them(nats_server, tmp_path, command, path, sig,
                                                                        code):
    """Issue 19: `gateway` and `dashboard` exited 0 on Ctrl-C (README: 130); SIGTERM, systemd's
    stop, is a normal stop (the gateway ended by the signal itself, -15)."""
    write(nats_server)
    port = _free_port()
    proc = start(nats_server, tmp_path, *command, "--listen", f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = finish(proc, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert err.rstrip().endswith("interrupted") == (sig == signal.SIGINT) and "Traceback" not in err, err


def test_submit_refuses_credentials_in_clear_text_to_another_host(tmp_path):
    """Issue 18: `submit` neither refused nor warned on plaintext credentials off loopback."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 16)
    env = {**cli_env("nats://someone:secret@192.0.2.10:4222", tmp_path)}
    refused = subprocess.run([sys.executable, "-m", "captionbus", "submit", str(clip)], env=env,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == exitcodes.USAGE, refused.stderr
    assert "192.0.2.10 is not on loopback" in refused.stderr and "TLS" in refused.stderr
    assert "--insecure" in refused.stderr and "secret" not in refused.stderr
    # A read-only command warns, then tries (and fails here, no such host: exit 4).
    warned = subprocess.run([sys.executable, "-m", "captionbus", "jobs"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert warned.returncode == exitcodes.BUS and warned.stderr.startswith("warning: NATS server 192.0.2.10"), \
        warned.stderr
    assert "cannot connect to NATS" in warned.stderr and "secret" not in warned.stderr


def test_serve_with_a_bad_password_exits_4_with_the_servers_reason(refusing_server, tmp_path):
    """Issue 18: `serve` exited 2 on a bad password; the exit-code table says 4 (the bus)."""
    owner, _ = refusing_server
    write(owner)
    done = cli(owner.replace("pw-owner", "wrong"), tmp_path, "serve", "demux")
    assert done.returncode == exitcodes.BUS, done.stderr
    assert "authorization violation" in done.stderr.lower() and "wrong" not in done.stderr, done.stderr


def test_jobs_and_status_ride_through_the_job_buckets_leader_being_killed(tmp_path):
    """The real case behind issue 18: on a 3-node cluster at R3, kill -9 the node leading
    KV_cb_jobs and read (and submit) at once. Every answer is whole (all jobs, the job's state) or an error
    with exit 4; never 0 jobs with exit 0, never "no job"."""
    import asyncio

    from benchmarks.chaos import Cluster, stream_leader
    from captionbus.core.bus import connect, provision

    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        states = jobs(20)

        async def prepare() -> None:
            nc = await connect(cluster.url(), "test-writer")
            js = nc.jetstream()
            deadline = time.monotonic() + 60
            while True:  # a fresh cluster may still be electing its meta leader
                try:
                    await provision(js, replicas=3)
                    break
                except Exception:  # noqa: BLE001 - bounded by the deadline
                    assert time.monotonic() < deadline, "the cluster never took the streams"
                    await asyncio.sleep(0.5)
            kv = await js.key_value("cb_jobs")
            for state in states:
                await kv.put(state.job_id, state.model_dump_json().encode())
            leader = cluster.by_name(await stream_leader(js, "KV_cb_jobs"))
            await nc.close()
            leader.process.send_signal(signal.SIGKILL)
            leader.process.wait(10)

        clip = tmp_path / "clip.mp4"
        clip.write_bytes(b"\x00" * 64)
        asyncio.run(asyncio.wait_for(prepare(), 120))
        listed = start(cluster.url(), tmp_path, "jobs", "--json")
        status = start(cluster.url(), tmp_path, "status", states[-1].job_id, "--json")
        # the chaos run: a submit 6 s after a leader's kill exited 1, "internal error: TimeoutError"
        submitted = start(cluster.url(), tmp_path, "submit", str(clip))
        out, err = finish(listed, 90)
        assert "Traceback" not in err and "internal error" not in err, err
        if listed.returncode == exitcodes.OK:
            assert sorted(json.loads(line)["spec"]["job_id"] for line in out.splitlines()) == \
                sorted(s.job_id for s in states), err
        else:
            assert listed.returncode == exitcodes.BUS and out == "", (listed.returncode, out, err)
        out, err = finish(status, 90)
        if status.returncode == exitcodes.OK:
            assert json.loads(out)["spec"]["job_id"] == states[-1].job_id
        else:
            assert status.returncode == exitcodes.BUS and "no job" not in err, (status.returncode, err)
        out, err = finish(submitted, 90)
        assert submitted.returncode in (exitcodes.OK, exitcodes.BUS) and "internal error" not in err, err
        if submitted.returncode == exitcodes.OK:
            replay = [json.loads(line) for line in cli(cluster.url(), tmp_path, "events").stdout.splitlines()]
            assert [e["kind"] for e in replay if e["job_id"] == out.strip()] == ["submitted"]  # stored once
    finally:
        cluster.stop()
