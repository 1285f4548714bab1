"""Joining the bus: every connection failure ends in seconds with the server's reason, several
servers in NATS_URL, and no fleet part starts on an open bus off loopback unless told so."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captionbus.server import nats_server_binary
from captionbus.core.bus import connect, insecure_reason, server_urls
from captionbus.core.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(home: Path, *args: str, env: dict[str, str], timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTIONBUS_NATS_", "NATS_URL"))}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "captionbus", *args],
                          env={**clean, "CAPTIONBUS_HOME": str(home), **env},
                          capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    return done, time.monotonic() - started


@pytest.fixture
def auth_server(tmp_path):
    """A JetStream server that requires user `alice` / password `right`."""
    port = _free_port()
    conf = tmp_path / "auth.conf"
    conf.write_text(
        f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        'authorization { users: [ {user: alice, password: right} ] }\n'
    )
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_wrong_password_and_no_credentials_exit_in_seconds_with_the_reason(auth_server, tmp_path):
    host_port = auth_server.removeprefix("nats://")
    for env in ({"NATS_URL": f"nats://alice:wrong@{host_port}"},
                {"NATS_URL": auth_server},
                {"NATS_URL": auth_server, "CAPTIONBUS_NATS_USER": "alice", "CAPTIONBUS_NATS_PASSWORD": "wrong"}):
        done, seconds = cli(tmp_path, "jobs", env=env)
        assert done.returncode == 4, done.stderr  # exit 4: cannot reach the bus or not authorised
        assert seconds < 15
        assert "Authorization Violation" in done.stderr, done.stderr
        assert "wrong" not in done.stderr  # the password is never printed
    # The right password through the settings gets through (and finds no bus yet: exit 2, its hint).
    done, _ = cli(tmp_path, "jobs", env={"NATS_URL": auth_server, "CAPTIONBUS_NATS_USER": "alice",
                                           "CAPTIONBUS_NATS_PASSWORD": "right"})
    assert "stream CB_REQUESTS missing" in done.stderr, done.stderr


def test_unreachable_server_and_tls_mismatch_exit_in_seconds(nats_server, tmp_path):
    dead = f"nats://127.0.0.1:{_free_port()}"
    done, seconds = cli(tmp_path, "jobs", env={"NATS_URL": dead})
    assert done.returncode == 4 and seconds < 15
    assert "cannot connect to NATS" in done.stderr and "refused" in done.stderr.lower(), done.stderr
    # TLS asked for (tls://) from a server that has none: refused, not silently clear text.
    done, seconds = cli(tmp_path, "jobs", env={"NATS_URL": nats_server.replace("nats://", "tls://")})
    assert done.returncode == 4 and seconds < 15
    assert "does not use TLS" in done.stderr, done.stderr
    # A CA file that is not there is named.
    done, _ = cli(tmp_path, "jobs", env={"NATS_URL": nats_server, "CAPTIONBUS_NATS_CA": str(tmp_path / "no-ca.pem")})
    assert done.returncode == 4 and "CAPTIONBUS_NATS_CA" in done.stderr and "no such file" in done.stderr


def test_several_servers_in_nats_url_survive_the_first_being_down(nats_server, tmp_path):
    from captionbus.core.bus import provision

    async def main():
        nc = await connect(nats_server, "provision")
        await provision(nc.jetstream())
        await nc.close()

    asyncio.run(main())
    dead = f"nats://127.0.0.1:{_free_port()}"
    assert server_urls(f"{dead}, {nats_server}") == [dead, nats_server]
    done, seconds = cli(tmp_path, "jobs", env={"NATS_URL": f"{dead},{nats_server}"})
    assert done.returncode == 0, done.stderr
    assert seconds < 15


def test_insecure_reason_needs_credentials_and_tls_off_loopback(tmp_path):
    plain = Settings(home=tmp_path)
    assert insecure_reason("nats://127.0.0.1:4222,nats://localhost:4223,nats://[::1]:4224", plain) is None
    reason = insecure_reason("nats://127.0.0.1:4222,nats://10.0.0.7:4222", plain)
    assert "10.0.0.7" in reason and "credentials" in reason and "TLS" in reason and "--insecure" in reason
    creds = tmp_path / "w.creds"
    with_creds = Settings(home=tmp_path, nats_creds=creds)
    assert "credentials" not in insecure_reason("nats://10.0.0.7:4222", with_creds)
    assert insecure_reason("tls://10.0.0.7:4222", with_creds) is None
    assert insecure_reason("nats://10.0.0.7:4222", Settings(home=tmp_path, nats_creds=creds, nats_ca=creds)) is None
    assert insecure_reason("tls://w:pw@10.0.0.7:4222", plain) is None
    assert "TLS" in insecure_reason("nats://w:pw@fleet.example:4222", plain)


@pytest.mark.parametrize("command", [["coordinator"], ["serve", "demux"], ["up"]])
def test_fleet_parts_refuse_an_open_bus_off_loopback_unless_insecure(command, tmp_path):
    # 192.0.2.1 (TEST-NET-1) is never a real host: refused before any connection is tried.
    env = {"NATS_URL": "nats://192.0.2.1:4222"}
    done, seconds = cli(tmp_path, *command, env=env)
    assert done.returncode == 2 and seconds < 15  # refused before connecting: a set-up to fix
    assert "not on loopback" in done.stderr and "--insecure" in done.stderr, done.stderr
    if command == ["coordinator"]:
        # Told --insecure, it goes on to connect (and fails there, in seconds, for want of a server).
        done, seconds = cli(tmp_path, *command, "--insecure", env=env)
        assert done.returncode == 4 and seconds < 15
        assert "cannot connect to NATS" in done.stderr, done.stderr


class FreezingProxy:
    """A TCP proxy to a NATS server whose freeze() makes every connection open at that moment go
    silent both ways without closing it: what a network cut leaves behind (no RST, the peer's
    TCP in retransmit backoff long after the cut healed). New connections pass as before."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.connections: list[dict] = []  # {"frozen": bool}, one per connection

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        state = {"frozen": False}
        self.connections.append(state)

        async def pipe(src, dst):
            while data := await src.read(65536):
                if not state["frozen"]:  # frozen: read and dropped, the sockets stay open and silent
                    dst.write(data)
                    await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    def freeze(self) -> None:
        for state in self.connections:
            state["frozen"] = True

    async def stop(self) -> None:
        self.server.close()


def test_a_connection_gone_silent_is_dropped_and_reconnected_in_seconds(nats_server, tmp_path):
    """Found by the chaos run (benchmarks/chaos.py): after a 29 s network cut healed, a worker's
    connection stayed silent ~20 s more (nats-py pings every 120 s by default), its finished
    result's upload gave up and the work was done again. Pings every CAPTIONBUS_PING_INTERVAL
    (default 5 s) drop a silent connection after two unanswered ones and reconnect."""
    port = int(nats_server.rsplit(":", 1)[1])

    async def main():
        proxy = FreezingProxy(port)
        url = await proxy.start()
        nc = await connect(url, "test-silent", Settings(home=tmp_path, ping_interval=1.0))
        await nc.flush(timeout=2)
        assert nc.stats["reconnects"] == 0
        proxy.freeze()
        frozen_at = time.monotonic()
        while nc.stats["reconnects"] == 0:
            assert time.monotonic() - frozen_at < 15, "a silent connection was never dropped"
            await asyncio.sleep(0.1)
        await nc.flush(timeout=2)  # the new connection works
        await nc.close()
        await proxy.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert Settings(home=tmp_path).ping_interval <= 5.0
