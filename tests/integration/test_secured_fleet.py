"""deploy/'s secured fleet, brought up for real: a 3-node JetStream cluster with TLS for clients
and routes and the per-role users of deploy/nats/roles.conf, certificates made at test time.
The coordinator runs as its own process (the CLI) with the CA and its role's password."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captionbus.server import nats_server_binary
from captionbus.contracts import subjects
from captionbus.core.bus import BusError, connect, require_provisioned
from captionbus.core.settings import Settings
from tests.natsroles import free_ports, unused_roles, users_block, violations

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nats"
ROLES = ("coordinator", "worker", "client", "dashboard")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(d: Path) -> None:
    """A CA, and one certificate for 127.0.0.1/localhost the nodes use for clients and routes."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=captionbus test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", *ec, "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    # Another CA nobody trusts, for the refusal.
    _openssl("req", "-x509", *ec, "-keyout", "other-key.pem", "-out", "other-ca.pem", "-days", "2",
             "-subj", "/CN=someone else", cwd=d)


def node_conf(template: str, i: int, port: int, cport: int, routes: list[int], tls: Path, store: Path,
              auth: str | None = None) -> str:
    """deploy/nats/cluster-node.conf for node i on loopback ports, this test's certificates and
    test passwords: the same TLS, JetStream and cluster blocks as the file a fleet copies.
    `auth`: what replaces `include ./accounts.conf` (default: the roles' users, test passwords)."""
    conf = template.replace("server_name: nats-1", f"server_name: nats-{i}")
    conf = conf.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}")
    conf = conf.replace("http: 127.0.0.1:8222\n", "")
    conf = conf.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{cport}")
    conf = conf.replace("/etc/nats/tls/route.pem", str(tls / "server.pem"))
    conf = conf.replace("/etc/nats/tls/route-key.pem", str(tls / "server-key.pem"))
    conf = conf.replace("/etc/nats/tls/", f"{tls}/")
    conf = conf.replace("/var/lib/nats/jetstream", str(store))
    conf = re.sub(r"routes: \[[^\]]*\]", "routes: [\n" + "\n".join(
        f"    nats-route://localhost:{p}" for p in routes) + "\n  ]", conf)
    users = users_block({r: r.upper() for r in ROLES})
    conf = conf.replace("include ./accounts.conf",
                        auth or f"include ./roles.conf\nauthorization {{\n  users: [\n{users}\n  ]\n}}")
    assert "/etc/" not in conf and "/var/" not in conf and "sync_interval: always" in conf
    return conf


@pytest.fixture
def secured_cluster(tmp_path):
    with _cluster(tmp_path) as cluster:
        yield cluster


@contextlib.contextmanager
def _cluster(tmp_path: Path, auth: str | None = None):
    """Three nodes of cluster-node.conf (TLS, test certificates); `auth` as node_conf's."""
    tls = tmp_path / "tls"
    make_certificates(tls)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir(exist_ok=True)
    (conf_dir / "roles.conf").write_text((DEPLOY / "roles.conf").read_text())
    template = (DEPLOY / "cluster-node.conf").read_text()
    numbers = free_ports(6)
    ports, cports = numbers[:3], numbers[3:]
    procs = []
    for i in range(3):
        conf = conf_dir / f"node{i + 1}.conf"
        conf.write_text(node_conf(template, i + 1, ports[i], cports[i], cports, tls, tmp_path / f"js{i + 1}", auth))
        log = open(tmp_path / f"node{i + 1}.log", "wb")
        procs.append(subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    try:
        deadline = time.monotonic() + 30
        for i, port in enumerate(ports):
            while True:
                assert procs[i].poll() is None, (tmp_path / f"node{i + 1}.log").read_text()[-2000:]
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"node {i + 1} never listened"
                    time.sleep(0.1)
        yield ports, tls, procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def _env(tls: Path, role: str) -> dict[str, str]:
    return {"CAPTIONBUS_NATS_CA": str(tls / "ca.pem"), "CAPTIONBUS_NATS_USER": role,
            "CAPTIONBUS_NATS_PASSWORD": f"pw-{role}"}


def _settings(tmp_path: Path, tls: Path, role: str, **kw) -> Settings:
    return Settings(home=tmp_path / role, nats_ca=tls / "ca.pem", nats_user=role, nats_password=f"pw-{role}",
                    artifacts_mode="object", host_id=role, **kw)


async def _provisioned_by(coordinator: subprocess.Popen, js, log: Path) -> None:
    """Wait until the coordinator process has created the streams (it must stay up meanwhile)."""
    deadline = time.monotonic() + 60
    while True:
        assert coordinator.poll() is None, log.read_text()[-2000:]
        try:
            await require_provisioned(js)
            return
        except Exception:  # missing yet, or a stream still electing its leader (a timeout)
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            await asyncio.sleep(0.5)


def test_a_secured_cluster_from_deploy_runs_with_tls_and_roles(secured_cluster, tmp_path):
    ports, tls, procs = secured_cluster
    url = ",".join(f"tls://127.0.0.1:{p}" for p in ports)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAPTIONBUS_NATS_")},
           "NATS_URL": url, "CAPTIONBUS_HOME": str(tmp_path / "coordinator-home"), "CAPTIONBUS_REPLICAS": "3",
           **_env(tls, "coordinator")}
    log = open(tmp_path / "coordinator.log", "wb")
    coordinator = subprocess.Popen([sys.executable, "-m", "captionbus", "coordinator"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    async def main():
        # The coordinator (its own process, over TLS, as its role) creates the R3 streams.
        nc = await connect(url, "dashboard", _settings(tmp_path, tls, "dashboard"))
        js = nc.jetstream()
        await _provisioned_by(coordinator, js, tmp_path / "coordinator.log")
        info = await js.stream_info(subjects.REQUESTS_STREAM)
        assert info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2
        assert nc._server_info.get("tls_required") is True
        await nc.close()

        # Each role connects with its password over TLS; a wrong password or an untrusted CA
        # fails in seconds with the reason.
        for role in ("worker", "client"):
            c = await connect(url, role, _settings(tmp_path, tls, role))
            await require_provisioned(c.jetstream())
            await c.close()
        started = time.monotonic()
        with pytest.raises(BusError, match="Authorization Violation"):
            await connect(url, "bad", Settings(home=tmp_path, nats_ca=tls / "ca.pem", nats_user="worker",
                                               nats_password="wrong"))
        with pytest.raises(BusError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await connect(url, "untrusted", Settings(home=tmp_path, nats_ca=tls / "other-ca.pem",
                                                     nats_user="worker", nats_password="pw-worker"))
        assert time.monotonic() - started < 15

        # The first node goes down: a client with all three in NATS_URL still gets in.
        procs[0].terminate()
        procs[0].wait(10)
        c = await connect(url, "after-node-1", _settings(tmp_path, tls, "client"))
        await require_provisioned(c.jetstream())
        await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        coordinator.terminate()
        coordinator.wait(15)


CALLOUT_ROLES = ("coordinator", "worker", "client")


def test_the_secured_cluster_behind_auth_callouts_gives_each_connection_its_own_replies(tmp_path):
    """deploy/nats/callout.conf on the 3-node TLS cluster, a `captionbus auth-callout run` per node
    (their own processes, the same accounts file and key): the coordinator CLI logs in through
    them and creates the R3 streams; two `worker` connections on different nodes get different
    reply prefixes, each subscribes to its own and not to the other's (refused); a wrong password
    is refused. With two of the three callouts stopped, logins on every node still succeed."""
    import bcrypt

    from captionbus.authcallout import new_account_seed, public_key

    seed = new_account_seed()
    (tmp_path / "callout.seed").write_text(seed)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    callout_conf = (DEPLOY / "callout.conf").read_text().replace("$2a$11$REPLACE_ME", "pw-auth-callout")
    (conf_dir / "callout.conf").write_text(callout_conf.replace("AREPLACE_ME_WITH_THE_KEYGEN_PUBLIC_KEY", public_key(seed)))
    salt = bcrypt.gensalt(rounds=4)
    users = "\n".join([f'    {{user: {r}, password: "{bcrypt.hashpw(f"pw-{r}".encode(), salt).decode()}", permissions: ${r.upper()}}}'
                       for r in CALLOUT_ROLES] + unused_roles(r.upper() for r in CALLOUT_ROLES))
    accounts = conf_dir / "accounts.conf"
    accounts.write_text(f"include ./roles.conf\nauthorization {{\n  users: [\n{users}\n  ]\n}}\n")
    with _cluster(tmp_path, "include ./callout.conf") as (ports, tls, _procs):
        urls = [f"tls://127.0.0.1:{p}" for p in ports]
        url = ",".join(urls)
        base = {**{k: v for k, v in os.environ.items() if not k.startswith("CAPTIONBUS_NATS_")},
                "CAPTIONBUS_NATS_CA": str(tls / "ca.pem"), "PYTHONPATH": str(DEPLOY.parents[1])}
        callouts = []
        for i in range(3):
            env = {**base, "NATS_URL": urls[i], "CAPTIONBUS_NATS_USER": "auth-callout",
                   "CAPTIONBUS_NATS_PASSWORD": "pw-auth-callout", "CAPTIONBUS_HOME": str(tmp_path / f"callout{i}")}
            callouts.append(subprocess.Popen(
                [sys.executable, "-m", "captionbus", "auth-callout", "run", "--accounts", str(accounts),
                 "--seed-file", str(tmp_path / "callout.seed")], env=env, stderr=subprocess.PIPE, text=True))
        for callout in callouts:
            assert "auth callout answering" in callout.stderr.readline()
        env = {**base, "NATS_URL": url, "CAPTIONBUS_HOME": str(tmp_path / "coordinator-home"),
               "CAPTIONBUS_REPLICAS": "3", "CAPTIONBUS_NATS_AUTH_CALLOUT": "1", **_env(tls, "coordinator")}
        log = open(tmp_path / "coordinator.log", "wb")
        coordinator = subprocess.Popen([sys.executable, "-m", "captionbus", "coordinator"], env=env,
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def login(role: str, server: str, password: str | None = None):
            return connect(server, role, _settings(tmp_path, tls, role, nats_auth_callout=True)
                           if password is None else Settings(home=tmp_path, nats_ca=tls / "ca.pem", nats_user=role,
                                                             nats_password=password, nats_auth_callout=True))

        async def main():
            worker = await login("worker", urls[1])
            js = worker.jetstream()
            await _provisioned_by(coordinator, js, tmp_path / "coordinator.log")
            assert (await js.stream_info(subjects.REQUESTS_STREAM)).config.num_replicas == 3
            peer = await login("worker", urls[2])
            mine, theirs = worker._inbox_prefix.decode(), peer._inbox_prefix.decode()
            assert mine != theirs and mine.startswith("_INBOX_worker_")
            await worker.subscribe(f"{mine}.>")
            await worker.subscribe(f"{theirs}.>")
            await worker.flush()
            await asyncio.sleep(0.5)
            with pytest.raises(BusError, match="Authorization Violation"):
                await login("client", urls[0], password="wrong")
            for nc in (worker, peer):
                await nc.close()
            for callout in callouts[:2]:
                callout.send_signal(signal.SIGTERM)
                assert callout.wait(15) == 0
            for server in urls:
                c = await login("client", server)  # a tenant: no stream info (deploy/README.md)
                await require_provisioned(c.jetstream(), names_only=True)
                await c.close()
            return mine, theirs

        try:
            mine, theirs = asyncio.run(asyncio.wait_for(main(), 150))
        finally:
            coordinator.terminate()
            coordinator.wait(15)
            for callout in callouts:
                callout.terminate()
                callout.wait(15)
    refused = [s for i in range(3) for _, s in violations(tmp_path / f"node{i + 1}.log")]
    assert refused == [f"{theirs}.>"] and f"{mine}.>" not in refused, refused
