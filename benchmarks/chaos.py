"""A chaos run anyone can repeat (issue 9 part 6, issue 18): a 3-node JetStream cluster on this
machine whose users are deploy/nats/roles.conf's, a coordinator and stage workers as real
processes each logged in as its role, N `transcribe` jobs, and a seeded schedule of faults while
they run, with every attack of issue 18 made between the faults by the ordinary credentials. It
prints the jobs' table with one line per fault, then the attacks' table and the bytes lost.

    python benchmarks/chaos.py                    # 30 jobs, every fault kind, every attack, seed 9
    python benchmarks/chaos.py --seed 3 --jobs 40
    python benchmarks/chaos.py --quick            # 3 jobs, 3 faults, every attack (tests/e2e/test_chaos.py)
    python benchmarks/chaos.py --no-attacks       # the faults alone

What runs: three `nats-server` nodes (JetStream, `sync_interval: always` as in deploy/, separate
client and route ports on loopback), streams and the job KV at R3 (`CAPTIONBUS_REPLICAS=3`, the
coordinator creates them), `captionbus coordinator` as its own process, and one stage service
process per stage of `transcribe` (demux, vad, subtitle_gen, mux) plus two `asr` workers (the
stage whose work dominates), each in its own environment's interpreter, each with its own data
dir, artifacts through the object store (every byte crosses the bus, as between hosts). The stage
cache is off, so every job is work. `CAPTIONBUS_ACK_WAIT` is 6 s, so a dead or paused worker's
request comes back within seconds, and `CAPTIONBUS_EVENT_ACK_WAIT` 10 s, so does a job event the
killed coordinator held; `CAPTIONBUS_MAX_DELIVER` is 8 so the schedule's faults cannot
exhaust a request's deliveries by themselves. Clips are espeak-ng sentence pairs (tests/media),
each job a different clip; Whisper base (CTranslate2) as in the e2e tests.

Roles: the nodes include deploy/nats/roles.conf and log every client in with a password (test
passwords `pw-<user>`, tests/natsroles.py; the permission blocks are the deployment's). The
coordinator runs as `coordinator`, the asr workers as `worker-asr` (their consumer only), the other
stages as `worker`; this script submits, follows and fetches as `client`, and runs gc as `gc`. Each
connection replies on its user's own prefix `_INBOX_<user>` (captionbus.core.bus.inbox_prefix).

Two passes in one script: a no-fault pass over every clip first (its SRTs are the reference),
then the chaos pass over the same clips, their submits spread over the schedule's expected length
(`--gap` overrides) so every fault meets jobs in flight. The faults come one at a time (each is
healed before the next; overlapping faults are not tried). What a fault killed is restarted after
a seeded 1-3 s, as systemd would; a process that exits by itself is restarted too, and reported.

The schedule (seeded: `--seed` picks the order, the targets, the gaps and the pause/cut lengths):
  kill-worker   kill -9 of an asr worker (and once of another stage's worker); restarted
  kill-coord    kill -9 of the coordinator; restarted
  kill-leader   kill -9 of the NATS node that leads CB_REQUESTS (the stage requests); restarted
  kill-kv-leader kill -9 of the node that leads the job-state KV stream; restarted
  pause         SIGSTOP of an asr worker for ack_wait + 4 s, then SIGCONT (its request is
                redelivered meanwhile; its late result must not apply twice)
  cut           with root and `ip netns`: the second asr worker runs in its own network namespace
                (a veth pair to this host; the servers then listen on 0.0.0.0 and that worker
                joins with CAPTIONBUS_INSECURE=1: passwords without TLS on every interface for
                the length of the run, so use --no-netns on a shared network); the cut takes the host side of the link down for
                20-35 s, the heal brings it up. Without root/netns the cut is simulated by a
                SIGSTOP of that worker for the same time (the bus sees the same silence; only the
                TCP connection's fate differs), and the table says "cut (simulated)".
  poison        one extra job whose input is a truncated copy of a clip (an interrupted
                download): it must fail with a reason, not loop.
`--quick` keeps kill-worker (asr), kill-coord and kill-leader, and the poison job.

The attacks (`--attacks`, on by default, `--quick` included), each once, in the slots after the
faults (forge and msg-id after the first faults, while jobs run; rollup and tamper later; gc
after the first cut or NATS node kill); the
blocks are tests/security/attacks.py's, where tests/security/ makes each alone on one node:
  rollup   worker, worker-asr, client and gateway each publish `Nats-Rollup: all` and `sub` on
           `$O.cb_artifacts.M.zz`, on a stored object's meta subject, on `$O.cb_artifacts.C.zz`,
           on `$KV.cb_stage_cache.zz` (worker-asr: its own `asr.zz`) and on `$KV.cb_webhooks.zz`.
           Refused: the stream or the permissions said no; harmful: one was acknowledged, or
           OBJ_cb_artifacts / KV_cb_stage_cache / KV_cb_webhooks held fewer messages after, or an
           entry planted just before (worker in the stage cache, gateway in the webhook KV) is gone.
  tamper   the four writers each publish, on every object (input and outputs) of a completed
           no-fault job and of a chaos job that completed, chunks of their own with a live meta
           naming them, junk metadata, a chunk appended to the real chunk subject and a `deleted`
           tombstone. Harmless: the job's objects fetch as they did right after it completed.
  sniff    coordinator, worker, worker-asr, client, gc and gateway each subscribe to `_INBOX.>`
           and to the other roles' prefixes for the whole chaos pass (through every fault and
           reconnect). Harmless: the subscription received nothing (the servers' logged
           subscription violations are counted in the note).
  forge    worker-asr publishes a `stage_completed` for a node of a running job that waits on its
           worker, with a no-fault job's outputs of that node, `worker: {"host": "attacker"}`,
           no token and then a guessed one. Harmless: neither event id is in the job's applied
           list and the node's worker is not the attacker (the note counts the coordinator's
           "forged result refused" log lines for the job).
  msg-id   worker-asr and client publish junk under `<job>.<node>.<attempt>.completed`, `.failed`
           and `<job>.completed` of a running job (ids taken first if they were predictable).
           Harmless: the job completed and its `stage_completed` for the node and its `completed`
           event are in the events stream.
  gc       2-4 s after a fault healed, `gc --dry-run` then gc as user `gc`. Every object is inside
           its grace period, so a run that deletes an object or a job record did harm; a run that
           stops on a read error (having deleted nothing, as it says) is harmless.
An attack that could not be made (e.g. no running job to forge for) has tried 0 and says why.

Bytes lost: every completed job's input and outputs are fetched through the object store (a fresh
local root each time) right after the job completed (the no-fault jobs' before any attack), and
again at the end; each object whose later fetch fails or differs in any byte loses its size. Each
chaos job's objects are also compared with the no-fault job's of the same clip: byte for byte, and
for the containers (mp4, mkv) whose bytes differ, by their streams' packet hashes (ffmpeg
streamhash): the mux stage's mkv carries random Matroska UIDs and its muxing date, 76 bytes that
differ between any two runs over the same input; those are counted apart, not as lost.
The exit status is 0 when no job was lost or duplicated, no byte lost, every attack made and
none harmful, else 1.

Definitions used in the table:
  submitted      jobs whose `submitted` event the bus acknowledged (clips + the poison job)
  completed      jobs whose final state (KV) is `completed`
  failed w/ reason  final state `failed` or `cancelled` with a non-empty one-line error
  lost           submitted jobs not in a terminal state when the run gives up waiting (or whose
                 state is missing, or that failed without a reason)
  duplicate outputs  (job, node) pairs for which two *different* outputs were recorded or
                 delivered: two applied `stage_completed` events (ids in the job's `applied` list)
                 with different outputs, or a job with two `completed` events whose outputs differ.
                 A late or redelivered completion that the coordinator refused is not a duplicate
                 output (nothing recorded or delivered it); those are counted apart as
                 "redundant completions refused" (at-least-once delivery at work). A repeat of the
                 same attempt's completion carries the same Nats-Msg-Id (`<request key>.completed`),
                 so JetStream drops it inside its duplicate window before anyone sees it: this
                 count is of completions that reached the events stream and were not applied.
  requests redelivered  applied completions whose request had been delivered more than once
                 (the worker's `delivery` metric): the work the faults sent round again.
  unplanned exits  processes the schedule did not kill that exited anyway; the script's
                 supervisor restarts them (as systemd would) and the table lists each with the
                 last error in its log. Each is a finding.
  differing      completed clips whose SRT text differs from the no-fault pass's SRT of the same
                 clip (cue text and times, byte for byte after normalising line ends)
  recovery_s     per fault, from the injection until the faulted part (or its replacement) is back
                 in service: a worker kill -> the replacement's $SRV STATS says it is set up (not
                 `loading`: the supervisor's 1-3 s + interpreter start + model load); pause/cut ->
                 the worker answers $SRV STATS again after SIGCONT/heal (so at least the hold);
                 the coordinator -> the first `stage_requested` stored after the kill (only a
                 coordinator publishes them); a NATS node -> the first job event the cluster stored after the kill
                 (write availability through the re-election and the clients' reconnects).
                 Server timestamps of the events stream. "idle" when nothing came to measure
                 (e.g. no job needed a new request after a coordinator kill).

Measured here (2 shared cores under a load of ~10, December 2026, seed 9, 30 clips, every attack,
real netns cut; each run also repeats the no-fault pass, 130 s; chaos pass 204 s):

    jobs submitted 31, completed 30, failed with reason 1 (the poison: "truncated or corrupt"),
    lost 0, duplicate outputs 0, redundant completions refused 2, requests redelivered 3,
    unplanned exits 0, SRTs differing from the no-fault run 0 of 30

    fault            target                         at_s recovery_s  note
    cut              asr-1 (netns)                   0.0       30.5  link down 29.2 s
    kill-kv-leader   chaos-1 (leads KV_cb_jobs)     39.0        5.2  restarted after 2.9 s
    kill-coord       coordinator                    49.5        4.2  restarted after 2.5 s
    pause            asr-1                          56.9       10.3  SIGSTOP for 10 s
    kill-worker      asr-1                          75.7       49.4  restarted after 1.3 s
    kill-leader      chaos-3 (leads CB_REQUESTS)    90.2        2.9  restarted after 1.2 s
    kill-worker      asr-0                          98.2       54.6  restarted after 2.5 s
    kill-worker      mux-0                         109.1        5.2  restarted after 2.8 s
    kill-coord       coordinator                   117.0        4.3  restarted after 1.4 s

    attack    tried  refused/harmless  harmful
    rollup       40                40        0  (OBJ_cb_artifacts 536 -> 538 messages meanwhile;
                                                 the planted cache and webhook entries kept)
    tamper       40                40        0  (5 objects of a no-fault and of a chaos job, 4 roles)
    sniff        21                21        0  (6 roles, whole pass; 41 violations logged)
    forge         2                 2        0  (coordinator logged 2 refusals; the job completed)
    msg-id        3                 3        0  (3 ids taken first; the job completed, events whole)
    gc            2                 2        0  (2-4 s after the 29.2 s cut healed: dry and real
                                                 runs deleted 0 objects, 0 job records)
    bytes lost: 0 of 32,079,850 bytes in 300 objects (30 no-fault + 30 chaos jobs x input, srt,
    vtt, mp4, mkv); 30 mkv equal to the no-fault run's by their streams only (Matroska UIDs).

The quick run (3 clips, `tests/e2e/test_chaos.py`) on the same machine: 4 submitted, 3 completed,
1 failed with reason, 0 lost, 0 duplicated; rollup 40/40 (the entries planted in the stage cache
and the webhook KV kept), tamper 40/40, sniff 21/21, forge 2/2 (2 refusals logged), msg-id 3/3,
gc 2/2 (after the CB_REQUESTS leader's kill healed) refused or harmless, 0 harmful, 0 bytes lost
of 3,294,852 in 30 objects (3 mkv equal by their streams only).
The first full run with the attacks found that the harness's own reads (a stream's info, an object's
meta) time out for a few seconds after a NATS node is killed; the attacker now retries them as a
client would (the rollup slot right after the leader kill had made no attempt). A quick run whose
msg-id attack waited for a job other than the forged one held the schedule 45 s, and its later
faults met no job in flight; both attacks now take the first running job.
Earlier (24 clips, no roles, no attacks): recovery of NATS node kills 1.8-3.1 s, coordinator
3.3-3.4 s, mux worker 6.3 s, asr workers 57-63 s (model load on a loaded machine), pause 10.3 s
(its hold), a 29.2 s cut 30.0 s. Before
the fixes the same run found (each now has a regression test): a stage service starting while
a stream elected its leader crashed ("nats: timeout" in its stream check) and stayed down;
`submit` failed for 3-4 s after a leader's death; the coordinator died in provision() against a
fresh cluster; and after the 29.2 s cut healed, the worker's connection stayed silent another
~33 s (nats-py pings every 120 s), so its finished transcript's upload gave up and was redone.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captionbus.server import nats_server_binary
from captionbus.stack import ServiceProcess, _die_with_parent, service_env, stop_services, wait_ready
from captionbus.contracts import subjects
from captionbus.core.bus import connect, require_provisioned
from captionbus.core.logging import configure_logging
from captionbus.core.settings import Settings
from captionbus.core.settings import load as load_settings
from tests.natsroles import NATS_DEPLOY, free_ports, users_block
from tests.security.fleet import ROLES

ASR_REPLICAS = 2
OTHER_STAGES = ["demux", "vad", "chunk", "transcript_join", "subtitle_gen", "mux"]  # transcribe chunks by default
ACK_WAIT_S = 6
EVENT_ACK_WAIT_S = 10  # a job event's apply can take a few seconds while a leader is re-elected
MAX_DELIVER = 8
KV_STREAM = f"KV_{subjects.JOBS_BUCKET}"


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the cluster

@dataclass
class Node:
    index: int
    port: int
    conf: Path
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"chaos-{self.index}"

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen([nats_server_binary(), "-c", str(self.conf)], stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=_die_with_parent)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Cluster:
    """Three nats-server nodes with JetStream, routes on loopback. With `roles` (user -> permission
    block of deploy/nats/roles.conf, as tests.natsroles.users_block takes) clients log in as those
    users (password pw-<user>), each with exactly its role's permissions; without, no auth."""

    def __init__(self, root: Path, listen_host: str = "127.0.0.1", roles: dict[str, str] | None = None):
        numbers = free_ports(6)
        ports, cports = numbers[:3], numbers[3:]
        self.nodes: list[Node] = []
        routes = "\n".join(f"    nats-route://127.0.0.1:{p}" for p in cports)
        auth = ""
        if roles:
            shutil.copy(NATS_DEPLOY / "roles.conf", root / "roles.conf")
            auth = f"include ./roles.conf\nauthorization {{\n  users: [\n{users_block(roles)}\n  ]\n}}\n"
        for i in range(3):
            conf = root / f"node{i + 1}.conf"
            conf.write_text(
                f"server_name: chaos-{i + 1}\n"
                f"listen: {listen_host}:{ports[i]}\n"
                + auth +
                "jetstream {\n"
                f'  store_dir: "{root / f"js{i + 1}"}"\n'
                "  sync_interval: always\n"
                "}\n"
                "cluster {\n"
                "  name: captionbus-chaos\n"
                f"  listen: 127.0.0.1:{cports[i]}\n"
                "  no_advertise: true\n"  # clients use the URLs they were given (one is in a netns)
                f"  routes: [\n{routes}\n  ]\n"
                "}\n"
            )
            self.nodes.append(Node(i + 1, ports[i], conf, root / f"node{i + 1}.log"))

    def url(self, host: str = "127.0.0.1") -> str:
        return ",".join(f"nats://{host}:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            self.wait_listening(node, timeout)

    @staticmethod
    def wait_listening(node: Node, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not node.alive():
                raise RuntimeError(f"{node.name} exited: {node.log_path.read_text(errors='replace')[-1500:]}")
            try:
                socket.create_connection(("127.0.0.1", node.port), timeout=0.3).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name} never listened on {node.port}") from None
                time.sleep(0.1)

    def by_name(self, name: str | None) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()


# ----------------------------------------------------------------------------- a network namespace

class Netns:
    """One more 'host': a network namespace joined to this one by a veth pair. cut() takes the
    host side of the link down (packets dropped both ways, no RST: a real partition); heal() up."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.name = f"cbchaos{tag}"
        self.host_if, self.ns_if = f"cbc{tag}h", f"cbc{tag}n"
        net = 16 + tag % 200
        self.host_ip, self.ns_ip = f"10.231.{net}.1", f"10.231.{net}.2"
        self.up = False

    @staticmethod
    def available() -> bool:
        return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("ip") is not None

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)

    def create(self) -> None:
        self._ip("netns", "add", self.name)
        self.up = True
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("link", "set", self.ns_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip("netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
        self._ip("netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up")
        self._ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def cut(self) -> None:
        self._ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        self._ip("link", "set", self.host_if, "up")

    def destroy(self) -> None:
        if not self.up:
            return
        with contextlib.suppress(Exception):
            self._ip("link", "del", self.host_if)
        with contextlib.suppress(Exception):
            self._ip("netns", "del", self.name)
        self.up = False


# ----------------------------------------------------------------------------- the fleet

@dataclass
class Fleet:
    root: Path
    cluster: Cluster
    netns: Netns | None
    env: dict[str, str]
    coordinator: subprocess.Popen | None = None
    coordinators: list[subprocess.Popen] = field(default_factory=list)
    services: dict[str, ServiceProcess] = field(default_factory=dict)  # slot ("asr-0") -> process
    retired: list[ServiceProcess] = field(default_factory=list)
    starts: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.cluster.url()

    def settings(self, who: str, url: str | None = None, user: str = "client") -> Settings:
        return Settings(home=self.root / who, nats_url=url or self.url, artifacts_mode="object", host_id=who,
                        nats_user=user, nats_password=password(user))

    def start_coordinator(self) -> None:
        with open(self.root / "coordinator.log", "ab") as out:
            self.coordinator = subprocess.Popen(
                [sys.executable, "-m", "captionbus", "coordinator"],
                env={**self.env, **credentials("coordinator"), "NATS_URL": self.url,
                     "CAPTIONBUS_HOME": str(self.root / "coordinator")},
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            )
        self.coordinators.append(self.coordinator)

    def start_slot(self, slot: str) -> ServiceProcess:
        """(Re)start the worker of one slot: `asr-1` is the one in the network namespace."""
        from captionbus.envs import env_for_stage, interpreter_for_stage

        stage, replica = slot.rsplit("-", 1)
        n = self.starts.get(slot, 0)
        self.starts[slot] = n + 1
        in_ns = self.netns is not None and slot == "asr-1"
        url = self.cluster.url(self.netns.host_ip) if in_ns else self.url
        settings = self.settings(f"worker-{slot}", url)
        env = env_for_stage(stage)
        extra = {**self.env, **credentials("worker-asr" if stage == "asr" else "worker"), "NATS_URL": url}
        if in_ns:
            extra["CAPTIONBUS_INSECURE"] = "1"  # a private veth link of this benchmark
        logs = settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{stage}-{replica}.{n}.log"
        argv = [str(interpreter_for_stage(stage)), "-m", "captionbus.services", "serve", stage, "--replica-id", f"{replica}{n}"]
        if in_ns:
            argv = ["ip", "netns", "exec", self.netns.name, *argv]  # ip execs: the pid is the worker's
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=service_env(settings, env, url, extra), cwd=str(settings.home),
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        svc = ServiceProcess(stage, env, interpreter_for_stage(stage), log_path, process, extra)
        old = self.services.get(slot)
        if old is not None:
            self.retired.append(old)
        self.services[slot] = svc
        return svc

    def coordinator_log_lines(self) -> list[str]:
        path = self.root / "coordinator.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def all_services(self) -> list[ServiceProcess]:
        return [*self.services.values(), *self.retired]

    def stop(self) -> None:
        stop_services(self.all_services())
        for proc in self.coordinators:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def password(user: str) -> str:
    return f"pw-{user}"  # tests.natsroles.users_block's


def credentials(user: str) -> dict[str, str]:
    """The environment a process logs in with as `user` (its role in roles.conf)."""
    return {"CAPTIONBUS_NATS_USER": user, "CAPTIONBUS_NATS_PASSWORD": password(user)}


async def _bus(url: str, name: str, user: str = "client"):
    """A connection of this script as `user`: the client (submits, fetches, reads state, events and
    $SRV stats), gc, or an attacker holding one ordinary credential."""
    return await connect(url, name, Settings(nats_user=user, nats_password=password(user)))


async def wait_services(url: str, services: list[ServiceProcess], timeout: float = 300.0) -> None:
    nc = await _bus(url, "chaos-ready")
    try:
        await wait_ready(nc, services, timeout=timeout)
    finally:
        await nc.close()


async def wait_provisioned(url: str, coordinator: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> None:
    nc = await _bus(url, "chaos-provisioned")
    try:
        deadline = time.monotonic() + timeout
        while True:
            if coordinator.poll() is not None:
                raise RuntimeError(f"coordinator exited: {log_path.read_text(errors='replace')[-1500:]}")
            try:
                await require_provisioned(nc.jetstream())
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def stream_leader(js, stream: str) -> str | None:
    for _ in range(20):
        with contextlib.suppress(Exception):
            info = await js.stream_info(stream)
            if info.cluster and info.cluster.leader:
                return info.cluster.leader
        await asyncio.sleep(0.5)
    return None


# ----------------------------------------------------------------------------- jobs

def make_clips(media_dir: Path, count: int) -> list[Path]:
    """`count` different clips: ordered pairs of tests/media FILM_SENTENCES, spoken by espeak-ng."""
    from tests.media import FILM_SENTENCES, speech_video

    media_dir.mkdir(parents=True, exist_ok=True)
    pairs = [(a, b) for a in range(len(FILM_SENTENCES)) for b in range(len(FILM_SENTENCES)) if a != b]
    clips = []
    for i in range(count):
        a, b = pairs[(i * 11) % len(pairs)] if count <= len(pairs) else pairs[i % len(pairs)]
        path, _ = speech_video(media_dir / f"clip{i:02d}.mp4", f"{FILM_SENTENCES[a]} {FILM_SENTENCES[b]}")
        clips.append(path)
    return clips


def poison_clip(source: Path, path: Path) -> Path:
    from tests.media import truncated_copy

    return truncated_copy(source, path, keep_fraction=0.3)


async def submit_one(fleet: Fleet, js, store, media: Path, label: str) -> str:
    from captionbus.client import submit

    for attempt in range(40):  # a node just killed may leave the publish without an ack
        try:
            spec = await submit(js, store, media, source_language="en", job_id=None,
                                name=media.name)
            return spec.job_id
        except Exception as exc:  # retry through a failover (e.g. a re-upload), then give up
            if attempt == 39:
                raise
            log(f"submit of {label} retried: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def job_states(js, job_ids: list[str]) -> dict[str, object]:
    from captionbus.client import job_state

    states = {}
    for job_id in job_ids:
        with contextlib.suppress(Exception):
            states[job_id] = await job_state(js, job_id)
    return states


async def wait_terminal(js, job_ids: list[str], timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    states: dict[str, object] = {}
    while True:
        fresh = await job_states(js, job_ids)
        states.update({k: v for k, v in fresh.items() if v is not None})
        done = [j for j in job_ids if j in states and states[j].status.finished]
        if len(done) == len(job_ids) or time.monotonic() > deadline:
            return states
        await asyncio.sleep(1.0)


async def fetch_srt(store, state, out: Path) -> str | None:
    from captionbus.client import fetch_outputs

    ref = state.outputs.get("srt")
    if ref is None:
        return None
    files = await fetch_outputs(store, {"srt": ref}, out, state.job_id)
    return files["srt"].read_text(encoding="utf-8").replace("\r\n", "\n").strip()


async def replay_events(js) -> list[tuple[float, dict]]:
    """Every stored job event with the server's store time (seconds since the epoch)."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from captionbus.core.tenancy import named

    sub = await js.subscribe(subjects.EVENTS_WILDCARD, ordered_consumer=True,  # named: deploy/nats/roles.conf
                             config=named(ConsumerConfig(deliver_policy=DeliverPolicy.ALL)))
    out = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=5)
            except TimeoutError:  # nats' timeout is one
                break
            with contextlib.suppress(ValueError):
                out.append((msg.metadata.timestamp.timestamp(), json.loads(msg.data)))
            if msg.metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


# ----------------------------------------------------------------------------- faults

@dataclass
class Fault:
    kind: str
    target: str = ""
    hold_s: float = 0.0
    at: float = 0.0          # wall clock (time.time()) of the injection
    healed: float = 0.0      # wall clock of the restart / resume / heal
    pid: str = ""            # the worker pid whose work ends the recovery (replacement or resumed)
    note: str = ""
    recovered: float = 0.0   # wall clock when a worker (resumed or replacement) was back in service
    recovery_s: float | None = None


def schedule(rng: random.Random, quick: bool, cut_real: bool) -> list[Fault]:
    if quick:
        faults = [Fault("kill-worker", "asr"), Fault("kill-coord"), Fault("kill-leader")]
        rng.shuffle(faults)
        return faults
    other = rng.choice(OTHER_STAGES)
    faults = [
        Fault("kill-worker", "asr"), Fault("kill-worker", "asr"), Fault("kill-worker", other),
        Fault("kill-coord"), Fault("kill-coord"),
        Fault("kill-leader"), Fault("kill-kv-leader"),
        Fault("pause", "asr", hold_s=ACK_WAIT_S + 4),
        Fault("cut" if cut_real else "cut (simulated)", "asr-1", hold_s=round(rng.uniform(20, 35), 1)),
    ]
    rng.shuffle(faults)
    return faults


def fault_span(faults: list[Fault]) -> float:
    """About how long the schedule takes: the first wait, each fault's hold and restart, the gaps."""
    return 4.5 + sum(f.hold_s + 2.0 + 6.5 for f in faults)


class Chaos:
    def __init__(self, fleet: Fleet, rng: random.Random, nc):
        self.fleet, self.rng, self.nc, self.js = fleet, rng, nc, nc.jetstream()
        self.restarts: list[asyncio.Task] = []
        self.watches: list[asyncio.Task] = []
        self.held: set[str] = set()  # slots a fault has killed and will restart itself
        self.unplanned: list[str] = []

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart what exits on its own, as systemd's Restart=always would, and note it: a
        process that the schedule did not kill but that died anyway is a finding."""
        fleet = self.fleet
        while not stop.is_set():
            for slot, svc in list(fleet.services.items()):
                if slot not in self.held and not svc.alive():
                    self.unplanned.append(f"{slot} (pid {svc.process.pid}) exited {svc.process.returncode}: "
                                          f"{svc.last_error(200)}")
                    log(f"unplanned exit: {self.unplanned[-1]}; restarting")
                    fleet.start_slot(slot)
            coord = fleet.coordinator
            if "coordinator" not in self.held and coord is not None and coord.poll() is not None:
                self.unplanned.append(f"coordinator (pid {coord.pid}) exited {coord.returncode}")
                log(f"unplanned exit: {self.unplanned[-1]}; restarting")
                fleet.start_coordinator()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    def watch(self, fault: Fault, stage: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
        """Note when worker `fault.pid` (resumed or replacement) is back in service: its $SRV
        STATS answer says it is no longer `loading` (captionbus.stack.wait_ready's test). Give up
        if that process exits (the supervisor's restart is then an unplanned exit)."""
        from captionbus.client import workers

        async def go():
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(Exception):
                    for reply in await workers(self.nc, 0.3, stage):
                        if (str(reply["metadata"].get("pid")) == fault.pid
                                and reply["state"].get("state") != "loading"):
                            fault.recovered = time.time()
                            return
                await asyncio.sleep(0.2)

        self.watches.append(asyncio.create_task(go()))

    async def _restart_later(self, delay: float, what) -> None:
        await asyncio.sleep(delay)
        what()

    def _supervise(self, fault: Fault, restart) -> None:
        delay = round(self.rng.uniform(1.0, 3.0), 1)

        def go():
            restart()
            fault.healed = time.time()

        self.restarts.append(asyncio.create_task(self._restart_later(delay, go)))
        fault.note = f"restarted after {delay} s"

    async def inject(self, fault: Fault) -> None:
        fleet = self.fleet
        if fault.kind == "kill-worker":
            slots = [s for s in fleet.services if s.startswith(fault.target + "-")]
            slot = self.rng.choice(sorted(slots))
            svc = fleet.services[slot]
            fault.target = slot
            fault.at = time.time()
            self.held.add(slot)
            os.kill(svc.process.pid, signal.SIGKILL)
            svc.process.wait(10)

            def restart(slot=slot):
                svc = fleet.start_slot(slot)
                fault.pid = str(svc.process.pid)
                self.watch(fault, slot.rsplit("-", 1)[0], svc.process)
                self.held.discard(slot)

            self._supervise(fault, restart)
        elif fault.kind == "kill-coord":
            fault.target = f"coordinator (pid {fleet.coordinator.pid})"
            fault.at = time.time()
            self.held.add("coordinator")
            fleet.coordinator.send_signal(signal.SIGKILL)
            fleet.coordinator.wait(10)

            def restart():
                fleet.start_coordinator()
                self.held.discard("coordinator")

            self._supervise(fault, restart)
        elif fault.kind in ("kill-leader", "kill-kv-leader"):
            stream = subjects.REQUESTS_STREAM if fault.kind == "kill-leader" else KV_STREAM
            leader = await stream_leader(self.js, stream)
            node = fleet.cluster.by_name(leader) or self.rng.choice(fleet.cluster.nodes)
            fault.target = f"{node.name} (leads {stream})" if leader == node.name else f"{node.name} (no leader seen)"
            fault.at = time.time()
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(10)

            def restart(node=node):
                node.start()
                Cluster.wait_listening(node, 30)

            self._supervise(fault, restart)
        elif fault.kind in ("pause", "cut (simulated)") or (fault.kind == "cut" and fleet.netns is None):
            slot = fault.target if fault.target in fleet.services else self.rng.choice(
                sorted(s for s in fleet.services if s.startswith("asr-")))
            svc = fleet.services[slot]
            fault.target, fault.pid = slot, str(svc.process.pid)
            fault.at = time.time()
            os.kill(svc.process.pid, signal.SIGSTOP)
            await asyncio.sleep(fault.hold_s)
            os.kill(svc.process.pid, signal.SIGCONT)
            fault.healed = time.time()
            self.watch(fault, "asr", svc.process)
            fault.note = f"SIGSTOP for {fault.hold_s} s"
        elif fault.kind == "cut":
            svc = fleet.services["asr-1"]
            fault.target, fault.pid = "asr-1 (netns)", str(svc.process.pid)
            fault.at = time.time()
            fleet.netns.cut()
            await asyncio.sleep(fault.hold_s)
            fleet.netns.heal()
            fault.healed = time.time()
            self.watch(fault, "asr", svc.process)
            fault.note = f"link down {fault.hold_s} s"
        log(f"fault {fault.kind} {fault.target} {fault.note}")

    async def settle(self) -> None:
        if self.restarts:
            await asyncio.gather(*self.restarts)
        self.restarts.clear()

    async def finish(self) -> None:
        await self.settle()
        if self.watches:
            await asyncio.gather(*self.watches)


def recovery(fault: Fault, events: list[tuple[float, dict]]) -> float | None:
    if fault.kind == "kill-coord":
        match = [t for t, e in events if t >= fault.at and e.get("kind") == "stage_requested"]
        return round(min(match) - fault.at, 1) if match else None
    if fault.kind in ("kill-leader", "kill-kv-leader"):
        match = [t for t, e in events if t >= fault.at]
        return round(min(match) - fault.at, 1) if match else None
    return round(fault.recovered - fault.at, 1) if fault.recovered else None


# ----------------------------------------------------------------------------- attacks

ATTACK_S = 8.0  # about how long one attack takes (quick run: 4-13 s each; for spreading the submits)
ATTACK_KINDS = ("rollup", "tamper", "sniff", "forge", "msg-id", "gc")
SNIFFERS = ("coordinator", "worker", "worker-asr", "client", "gc", "gateway")


@dataclass
class Attack:
    """One kind of attack: how many attempts were made, how many the bus refused or left without
    effect, how many did harm (each harmful attempt is named in `notes`)."""
    kind: str
    tried: int = 0
    harmless: int = 0
    harmful: int = 0
    notes: list[str] = field(default_factory=list)


CONTAINERS = ("mp4", "mkv")  # outputs also compared by their streams (see stream_hashes)


def stream_hashes(path: Path) -> str:
    """sha256 of each stream's packets (ffmpeg's streamhash muxer): what a container holds, without
    the ids it writes. The mux stage's mkv differs between two runs over the same input in 76
    bytes (Matroska's random SegmentUID and TrackUIDs, the muxing date) while its streams are
    identical; measured on the quick run's three clips."""
    done = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0", "-c", "copy", "-f", "streamhash",
                           "-hash", "sha256", "-"], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg streamhash of {path.name}: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


class Outputs:
    """Every completed job's input and outputs as fetched through the object store (a fresh local
    root each time): sha256 and size per ref, first right after the job completed, then at the end.
    `bytes_lost` counts the bytes of every ref whose later fetch failed or differed."""

    def __init__(self, fleet: Fleet, js):
        self.fleet, self.js = fleet, js
        # job -> name -> (sha256, size, object key, stream hashes of a container output or "")
        self.first: dict[str, dict[str, tuple[str, int, str, str]]] = {}
        self.fetches = 0

    async def fetch(self, state, tries: int = 20) -> dict[str, tuple[str, int, str, str] | None]:
        """name -> (sha256, size, object key, stream hashes), None where the fetch failed (after
        retries through a failover: a read during a leader election is retried, as captionbus
        fetch does)."""
        import hashlib

        from captionbus.core.artifacts import ArtifactStore

        refs = {"job.input": state.spec.input, **state.outputs}
        out: dict[str, tuple[str, int, str, str] | None] = {}
        for name, ref in refs.items():
            out[name] = None
            for attempt in range(tries):
                self.fetches += 1
                store = ArtifactStore(self.fleet.settings(f"fetch/{self.fetches}"), self.js)
                try:
                    path = await store.get(ref)
                    data = path.read_bytes()
                    streams = stream_hashes(path) if name in CONTAINERS else ""
                    out[name] = (hashlib.sha256(data).hexdigest(), len(data), ref.key, streams)
                    break
                except Exception as exc:  # noqa: BLE001 - any failed read is retried, the last one reported
                    if attempt == tries - 1:
                        log(f"fetch of {state.job_id} {name} failed: {type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.5)
                finally:
                    shutil.rmtree(self.fleet.root / "fetch" / str(self.fetches), ignore_errors=True)
        return out

    async def completed(self, state) -> None:
        if state.job_id not in self.first:
            self.first[state.job_id] = {k: v for k, v in (await self.fetch(state)).items() if v is not None}


async def retried(call, tries: int = 40, delay: float = 0.5):
    """`await call()`, retried through a leader election (a read that times out while a stream
    elects its leader): the harness's own reads must not make an attack incomplete."""
    for attempt in range(tries):
        try:
            return await call()
        except Exception:  # the last failure is raised
            if attempt == tries - 1:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class Attacker:
    """Every attack of issue 18 with the ordinary credentials, one slot at a time between the
    faults (tests/security/attacks.py holds the blocks, tests/security/ tests each alone)."""

    def __init__(self, fleet: Fleet, rng: random.Random, outputs: Outputs, references: dict[str, object]):
        self.fleet, self.rng, self.outputs = fleet, rng, outputs
        self.references = references  # job id -> final state of the no-fault pass
        self.results = {kind: Attack(kind) for kind in ATTACK_KINDS}
        self.nc: dict[str, object] = {}
        self.sniffed: dict[tuple[str, str], int] = {}
        self.sniffs: list = []
        self.goods: dict[str, object] = {}  # object key -> its nats-py ObjectInfo before any attack
        self.targets: dict[str, tuple[str, str, int, list[str]]] = {}  # kind -> (job, node, attempt, event ids)
        self.jobs: list[str] = []  # chaos-pass job ids (the submitter fills it)

    async def start(self, roles=("worker", "worker-asr", "client", "gateway", "gc")) -> None:
        for role in roles:
            self.nc[role] = await _bus(self.fleet.url, f"attacker-{role}", role)
        obj = await self.nc["client"].jetstream().object_store(subjects.ARTIFACTS_BUCKET)
        for state in self.references.values():
            for ref in (state.spec.input, *state.outputs.values()):
                if ref.key not in self.goods:
                    self.goods[ref.key] = await retried(lambda key=ref.key: obj.get_info(key))
        await self.sniff_start()

    async def close(self) -> None:
        for nc in [*self.nc.values(), *self.sniffs]:
            with contextlib.suppress(Exception):
                await nc.close()

    def plan(self, faults: list[Fault]) -> list[list[str]]:
        """The attacks after each fault (the sniffers listen the whole pass): forge and msg-id
        first, while jobs run; rollup and tamper spread over the rest; gc first thing after the
        first network cut or NATS node kill to heal (the moment gc once read a listing error as
        "nothing referenced"), else after the middle fault."""
        order = ["forge", "msg-id", "rollup", "tamper"]
        plan: list[list[str]] = [[] for _ in range(max(1, len(faults)))]
        for i, kind in enumerate(order):
            plan[min(i * len(plan) // len(order), len(plan) - 1)].append(kind)
        heals = [i for i, f in enumerate(faults) if f.kind.startswith("cut") or f.kind.endswith("leader")]
        plan[heals[0] if heals else len(plan) // 2].insert(0, "gc")
        return plan

    async def run(self, kind: str) -> None:
        log(f"attack {kind}")
        try:
            await getattr(self, "attack_" + kind.replace("-", "_"))(self.results[kind])
        except Exception as exc:  # noqa: BLE001 - an attack that could not be made is a finding of the harness, not harm
            self.results[kind].notes.append(f"attack not completed: {type(exc).__name__}: {exc}")
            log(f"attack {kind} not completed: {type(exc).__name__}: {exc}")

    # ---- sniffing: every role subscribes to the shared inbox and to the other roles' prefixes

    async def sniff_start(self) -> None:
        from tests.security.attacks import SNIFFED

        for role in SNIFFERS:
            nc = await _bus(self.fleet.url, f"sniffer-{role}", role)
            self.sniffs.append(nc)
            for subject in SNIFFED:
                if subject == f"_INBOX_{role}.>":
                    continue
                self.sniffed[(role, subject)] = 0

                async def count(msg, key=(role, subject)):
                    self.sniffed[key] += 1

                await nc.subscribe(subject, cb=count)
            with contextlib.suppress(Exception):
                await nc.flush(2)

    def sniff_finish(self) -> None:
        a = self.results["sniff"]
        for (role, subject), n in self.sniffed.items():
            a.tried += 1
            if n:
                a.harmful += 1
                a.notes.append(f"{role} read {n} replies on {subject}")
            else:
                a.harmless += 1
        logged = sum(log_path.read_text(errors="replace").count("Subscription Violation")
                     for log_path in (n.log_path for n in self.fleet.cluster.nodes) if log_path.exists())
        a.notes.append(f"{len(SNIFFERS)} roles on _INBOX.> and the others' prefixes for the whole pass; "
                       f"the servers logged {logged} subscription violations")

    # ---- a running job's node, for the forged result and the predictable ids

    async def running_node(self, timeout: float = 30.0) -> tuple[object, str] | None:
        from captionbus.client import job_state

        js = self.nc["client"].jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for job_id in reversed(self.jobs):
                with contextlib.suppress(Exception):
                    state = await job_state(js, job_id)
                    if state is None or state.status.finished:
                        continue
                    # a node still waiting for its result (the later the better: most work pending)
                    for node in ("subtitle_gen", "mux", "asr", "vad", "demux"):
                        ns = state.nodes.get(node)
                        if ns is not None and ns.status.value in ("requested", "waiting"):
                            return state, node
            await asyncio.sleep(0.5)
        return None

    async def attack_forge(self, a: Attack) -> None:
        """worker-asr forges a result for a node of a running job, with another job's outputs of
        that node, claimed as {"host": "attacker"}: no token, then a guessed one."""
        from captionbus.core.bus import publish_event
        from tests.security.attacks import forged_results

        found = await self.running_node()
        if found is None:
            a.notes.append("no running job to forge a result for")
            return
        state, node = found
        # another clip's no-fault job: its outputs of this node are not the ones the job would get
        other = next((r for r in self.references.values() if r.spec.input.key != state.spec.input.key),
                     next(iter(self.references.values())))
        outputs = other.nodes[node].outputs if node in other.nodes else other.outputs
        attempt = max(1, state.nodes[node].attempt)
        ids = []
        for forged in forged_results(state.job_id, node, attempt, outputs):
            await retried(lambda forged=forged: publish_event(self.nc["worker-asr"].jetstream(), forged), 10)
            ids.append(forged.event_id)
            a.tried += 1
        self.targets["forge"] = (state.job_id, node, attempt, ids)

    def forge_finish(self, states: dict[str, object]) -> None:
        a = self.results["forge"]
        if "forge" not in self.targets:
            return
        job_id, node, _, ids = self.targets["forge"]
        state = states.get(job_id)
        applied = set(state.applied) if state is not None else set()
        bad = [i for i in ids if i in applied]
        attacker_ran = state is not None and node in state.nodes and state.nodes[node].worker.get("host") == "attacker"
        a.harmful = len(bad) or (len(ids) if attacker_ran else 0)
        a.harmless = a.tried - a.harmful
        logged = sum(1 for line in self.fleet.coordinator_log_lines()
                     if "forged result refused" in line and job_id in line)
        a.notes.append(f"{job_id} {node}: coordinator logged {logged} refusals; job ended "
                       f"{state.status.value if state else 'missing'}")
        if bad or attacker_ran:
            a.notes.append(f"FORGED RESULT APPLIED to {job_id} {node}")

    async def attack_msg_id(self, a: Attack) -> None:
        """worker-asr and client publish junk under the ids a running job's next result, failure
        and `completed` event would have had, were they predictable."""
        from tests.security.attacks import predictable_ids

        # The forged job will do (its forged events have ids of their own): waiting for another
        # job to run once held the schedule 45 s, and the later faults met no job in flight.
        found = await self.running_node()
        if found is None:
            a.notes.append("no running job to take ids from")
            return
        state, node = found
        attempt = max(1, state.nodes[node].attempt)
        taken = 0
        for role, subject, msg_id in predictable_ids(state.job_id, node, attempt):
            with contextlib.suppress(Exception):
                ack = await self.nc[role].jetstream().publish(subject, b"{}", headers={"Nats-Msg-Id": msg_id})
                taken += not ack.duplicate
            a.tried += 1
        self.targets["msg-id"] = (state.job_id, node, attempt, [])
        a.notes.append(f"{state.job_id} {node} attempt {attempt}: {taken} ids taken first")

    def msg_id_finish(self, states: dict[str, object], events: list[tuple[float, dict]]) -> None:
        a = self.results["msg-id"]
        if "msg-id" not in self.targets:
            return
        job_id, node, _, _ = self.targets["msg-id"]
        state = states.get(job_id)
        kinds = {(e.get("kind"), e.get("node")) for _, e in events if e.get("job_id") == job_id}
        ok = (state is not None and state.status.value == "completed" and ("completed", None) in kinds
              and ("stage_completed", node) in kinds)
        a.harmless, a.harmful = (a.tried, 0) if ok else (0, a.tried)
        if not ok:
            a.notes.append(f"{job_id}: not completed with its events after its ids were taken")

    # ---- storage

    async def attack_rollup(self, a: Attack) -> None:
        """Nats-Rollup all/sub by every writer on object metadata (made-up and a real key), object
        chunks, the stage cache and the webhook KV; the three streams must keep every message."""
        from nats.js.errors import KeyNotFoundError

        from tests.security.attacks import WRITERS, try_rollups

        streams = (f"OBJ_{subjects.ARTIFACTS_BUCKET}", f"KV_{subjects.STAGE_CACHE_BUCKET}",
                   f"KV_{subjects.WEBHOOKS_BUCKET}")
        gc = self.nc["gc"].jetstream()  # may read every stream's info
        # An entry in each KV a rollup could empty, written by the role that writes there (the
        # stage cache is off in this run, so it would otherwise hold nothing to lose).
        planted = {}
        for role, bucket in (("worker", subjects.STAGE_CACHE_BUCKET), ("gateway", subjects.WEBHOOKS_BUCKET)):
            kv = await retried(lambda role=role, bucket=bucket: self.nc[role].jetstream().key_value(bucket))
            key, value = f"chaos.planted{secrets.token_hex(4)}", secrets.token_bytes(32)
            await retried(lambda kv=kv, key=key, value=value: kv.put(key, value))
            planted[bucket] = (kv, key, value)
        before = {s: (await retried(lambda s=s: gc.stream_info(s))).state.messages for s in streams}
        key = self.rng.choice(sorted(self.goods))
        for role in WRITERS:
            for subject, rollup, said_no in await try_rollups(self.nc[role].jetstream(), role, key):
                a.tried += 1
                if said_no:
                    a.harmless += 1
                else:
                    a.harmful += 1
                    a.notes.append(f"ROLLUP {rollup} ACCEPTED from {role} on {subject}")
        after = {s: (await retried(lambda s=s: gc.stream_info(s))).state.messages for s in streams}
        for stream in streams:
            if after[stream] < before[stream]:
                a.notes.append(f"{stream} went from {before[stream]} to {after[stream]} messages")
                a.harmful = max(a.harmful, 1)
        for bucket, (kv, key, value) in planted.items():
            try:
                entry = await retried(lambda kv=kv, key=key: kv.get(key), 5)
            except KeyNotFoundError:  # deleted or purged (KeyDeletedError is one)
                entry = None
            if entry is None or entry.value != value:
                a.notes.append(f"the entry planted in {bucket} is gone")
                a.harmful = max(a.harmful, 1)
        if a.harmful == 0:
            a.notes.append(f"{len(WRITERS)} writers x {a.tried // len(WRITERS) // 2} subjects x all/sub; "
                           + ", ".join(f"{s} {before[s]}->{after[s]} msgs" for s in streams))

    async def attack_tamper(self, a: Attack) -> None:
        """Every writer publishes tombstones, bogus metadata, junk and appended chunks on a completed
        job's objects (a no-fault job's, and a chaos job's when one completed); each job's refs
        must then fetch as they did right after it completed."""
        from captionbus.client import job_state
        from tests.security.attacks import WRITERS, tamper

        js = self.nc["client"].jetstream()
        obj = await retried(lambda: js.object_store(subjects.ARTIFACTS_BUCKET))
        victims = [self.rng.choice(sorted(self.references))]
        done = [j for j in self.jobs if j in self.outputs.first]
        if done:
            victims.append(self.rng.choice(done))
        for job_id in victims:
            state = await retried(lambda job_id=job_id: job_state(js, job_id))
            refs = [state.spec.input, *state.outputs.values()]
            for ref in refs:
                if ref.key not in self.goods:
                    self.goods[ref.key] = await retried(lambda key=ref.key: obj.get_info(key))
                for role in WRITERS:
                    await retried(lambda role=role, good=self.goods[ref.key]: tamper(self.nc[role].jetstream(), role, good), 10)
                    a.tried += 1
            now = await self.outputs.fetch(state)
            first = self.outputs.first.get(job_id, {})
            changed = [n for n, v in now.items() if v is None or (n in first and first[n][0] != v[0])]
            if changed:
                a.harmful += len(WRITERS) * len(refs)
                a.notes.append(f"{job_id}: {', '.join(changed)} no longer fetch as before the tampering")
            else:
                a.harmless += len(WRITERS) * len(refs)
                a.notes.append(f"{job_id}: {len(refs)} objects tampered by {len(WRITERS)} roles, fetch unchanged")

    async def attack_gc(self, a: Attack) -> None:
        """gc, 2-4 s after a fault healed: a dry run, then the real one. Every object is inside its
        grace period, so a run that deletes any object (or job record) did harm; a run that
        stops on a read error deleted nothing (it says so) and is harmless."""
        from captionbus.core.gc import GcError, collect

        await asyncio.sleep(self.rng.uniform(2, 4))
        settings = self.fleet.settings("gc", user="gc")
        js = self.nc["gc"].jetstream()
        for dry in (True, False):
            a.tried += 1
            try:
                report = await collect(settings, js, dry_run=dry, local=False)
            except GcError as exc:
                a.harmless += not exc.report.deletions
                a.harmful += bool(exc.report.deletions)
                a.notes.append(f"{'dry' if dry else 'real'} run stopped: {exc}")
                continue
            deleted = report.object_store.count + report.job_records
            a.notes.append(f"{'dry' if dry else 'real'} run: {report.object_store.count} objects, "
                           f"{report.torn_uploads.count} torn uploads, {report.job_records} job records")
            if deleted:
                a.harmful += 1
            else:
                a.harmless += 1


# ----------------------------------------------------------------------------- the report

@dataclass
class Report:
    submitted: int = 0
    completed: int = 0
    failed_with_reason: int = 0
    lost: int = 0
    duplicate_outputs: int = 0
    redundant_refused: int = 0
    redelivered: int = 0
    unplanned_exits: list[str] = field(default_factory=list)
    differing: int = 0
    compared: int = 0
    poison: str = ""
    faults: list[Fault] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    reference_wall_s: float = 0.0
    attacks: list[Attack] = field(default_factory=list)
    refs_compared: int = 0  # objects (inputs and outputs of completed jobs) fetched again at the end
    bytes_compared: int = 0
    bytes_lost: int = 0
    container_ids_only: int = 0  # outputs whose bytes differ from the no-fault run's in container ids only

    @property
    def harmful_attacks(self) -> int:
        return sum(a.harmful for a in self.attacks)

    def ok(self) -> bool:
        return (self.lost == 0 and self.duplicate_outputs == 0 and self.bytes_lost == 0 and self.harmful_attacks == 0
                and all(a.tried for a in self.attacks))

    def table(self) -> str:
        rows = [
            ("jobs submitted", self.submitted),
            ("completed", self.completed),
            ("failed with reason", self.failed_with_reason),
            ("lost", self.lost),
            ("duplicate outputs", self.duplicate_outputs),
            ("redundant completions refused", self.redundant_refused),
            ("requests redelivered", self.redelivered),
            ("unplanned exits (restarted)", len(self.unplanned_exits)),
            (f"outputs differing from no-fault run (of {self.compared})", self.differing),
            ("no-fault pass wall s", f"{self.reference_wall_s:.0f}"),
            ("chaos pass wall s", f"{self.wall_s:.0f}"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        if self.poison:
            lines.append(f"poison job: {self.poison}")
        lines.append("")
        lines.append(f"{'fault':<16} {'target':<28} {'at_s':>6} {'recovery_s':>10}  note")
        t0 = min((f.at for f in self.faults if f.at), default=0.0)
        for f in self.faults:
            rec = "idle" if f.recovery_s is None else f"{f.recovery_s:.1f}"
            lines.append(f"{f.kind:<16} {f.target:<28} {f.at - t0:>6.1f} {rec:>10}  {f.note}")
        if self.attacks:
            lines.append("")
            lines.append(f"{'attack':<8} {'tried':>6} {'refused/harmless':>17} {'harmful':>8}  note")
            for a in self.attacks:
                lines.append(f"{a.kind:<8} {a.tried:>6} {a.harmless:>17} {a.harmful:>8}  {'; '.join(a.notes)}")
        lines.append(f"bytes lost: {self.bytes_lost} (of {self.bytes_compared} bytes in {self.refs_compared} "
                     "objects of completed jobs fetched again at the end)")
        if self.container_ids_only:
            lines.append(f"container outputs equal to the no-fault run's by their streams only: {self.container_ids_only} "
                         "(mkv: random Matroska UIDs per mux run)")
        lines.extend(self.details)
        lines.extend(f"UNPLANNED EXIT {line}" for line in self.unplanned_exits)
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "submitted": self.submitted, "completed": self.completed,
            "failed_with_reason": self.failed_with_reason, "lost": self.lost,
            "duplicate_outputs": self.duplicate_outputs, "redundant_refused": self.redundant_refused,
            "redelivered": self.redelivered, "unplanned_exits": self.unplanned_exits,
            "differing": self.differing, "compared": self.compared, "poison": self.poison,
            "faults": [{"kind": f.kind, "target": f.target, "recovery_s": f.recovery_s, "note": f.note}
                       for f in self.faults],
            "details": self.details,
            "attacks": [{"kind": a.kind, "tried": a.tried, "harmless": a.harmless, "harmful": a.harmful,
                         "notes": a.notes} for a in self.attacks],
            "refs_compared": self.refs_compared, "bytes_compared": self.bytes_compared, "bytes_lost": self.bytes_lost,
            "container_ids_only": self.container_ids_only,
        }


async def check_bytes(report: Report, outputs: Outputs, states: dict[str, object], labels: dict[str, str],
                      reference_jobs: dict[str, str]) -> None:
    """Every completed job (both passes) fetched once more at the end, each ref compared with its
    fetch right after the job completed; each chaos job's refs also with the no-fault job's of the
    same clip. A ref that fails to fetch or differs loses its bytes (the size first fetched)."""
    for job_id, first in outputs.first.items():
        state = states.get(job_id)
        if state is None:
            continue
        now = await outputs.fetch(state)
        ref_first = outputs.first.get(reference_jobs.get(labels.get(job_id, ""), ""), {})
        for name, (digest, size, _, streams) in first.items():
            report.refs_compared += 1
            report.bytes_compared += size
            got = now.get(name)
            if got is None or got[0] != digest:
                report.bytes_lost += size
                report.details.append(f"BYTES LOST {job_id} {name}: " + ("unfetchable" if got is None else "changed"))
            elif name in ref_first and ref_first[name][0] != digest:
                if streams and ref_first[name][3] == streams:
                    report.container_ids_only += 1  # same streams; the container's own ids differ
                else:
                    report.bytes_lost += size
                    report.details.append(f"BYTES DIFFER {job_id} {name} from the no-fault job of {labels[job_id]}")


def count_duplicates(events: list[tuple[float, dict]], states: dict[str, object], job_ids: set[str]) -> tuple[int, int, list[str]]:
    """(duplicate outputs, redundant completions refused, details) per the module docstring."""
    completions: dict[tuple[str, str], list[dict]] = {}
    finals: dict[str, list[dict]] = {}
    for _, e in events:
        job = e.get("job_id")
        if job not in job_ids:
            continue
        if e.get("kind") == "stage_completed":
            completions.setdefault((job, e["node"]), []).append(e)
        elif e.get("kind") == "completed":
            finals.setdefault(job, []).append(e)
    duplicates, refused, details = 0, 0, []
    for (job, node), evs in completions.items():
        state = states.get(job)
        applied = set(state.applied) if state is not None else set()
        used = [e for e in evs if e["event_id"] in applied]
        refused += len(evs) - len(used)
        distinct = {json.dumps(e.get("outputs"), sort_keys=True) for e in used}
        if len(distinct) > 1:
            duplicates += 1
            details.append(f"DUPLICATE {job} {node}: {len(distinct)} different outputs applied")
    for job, evs in finals.items():
        distinct = {json.dumps(e.get("outputs"), sort_keys=True) for e in evs}
        if len(distinct) > 1:
            duplicates += 1
            details.append(f"DUPLICATE {job}: delivered {len(distinct)} different outputs")
    return duplicates, refused, details


def redeliveries(events: list[tuple[float, dict]], states: dict[str, object], job_ids: set[str]) -> int:
    """Applied stage completions whose request had been delivered more than once (the worker
    reports its delivery count in the completion's metrics): requests the faults made come back."""
    applied = {e for state in states.values() if state is not None for e in state.applied}
    return sum(1 for _, e in events if e.get("job_id") in job_ids and e.get("kind") == "stage_completed"
               and e.get("event_id") in applied and (e.get("metrics") or {}).get("delivery", 1) > 1)


# ----------------------------------------------------------------------------- the run

async def run_pass(fleet: Fleet, clips: list[Path], timeout: float, chaos: Chaos | None = None,
                   faults: list[Fault] | None = None, poison: Path | None = None, rng: random.Random | None = None,
                   gap_s: float = 0.0, attacker: Attacker | None = None,
                   outputs: Outputs | None = None) -> tuple[dict[str, str], dict[str, object], dict[str, Path], float]:
    """Submit every clip (and the poison), run the faults (and after each, the attacker's slot of
    attacks) alongside, fetch each job's bytes as soon as it completed (`outputs`), wait until all
    are terminal. Returns job id -> label, final states, label -> clip, and wall seconds."""
    from captionbus.core.artifacts import ArtifactStore

    nc = await _bus(fleet.url, "chaos-client")
    js = nc.jetstream()
    store = ArtifactStore(fleet.settings("client"), js)
    started = time.monotonic()
    labels: dict[str, str] = {}
    media = {clip.stem: clip for clip in clips}
    items = list(media.items())
    if poison is not None:
        at = rng.randrange(1, len(items)) if rng and len(items) > 1 else 0
        items.insert(at, ("poison", poison))
        media["poison"] = poison

    async def submitter():
        for label, path in items:
            job_id = await submit_one(fleet, js, store, path, label)
            labels[job_id] = label
            if attacker is not None:
                attacker.jobs.append(job_id)
            if gap_s:
                await asyncio.sleep(gap_s)

    async def faulter():
        plan = attacker.plan(faults) if attacker is not None else [[] for _ in faults]
        await asyncio.sleep(rng.uniform(3, 6))
        for fault, attacks in zip(faults, plan, strict=True):
            await chaos.inject(fault)
            await chaos.settle()
            for kind in attacks:
                await attacker.run(kind)
            await asyncio.sleep(rng.uniform(4, 9))

    async def watcher():
        """Each job's bytes right after it completed (what the user got), to compare at the end."""
        while not stop.is_set():
            for state in (await job_states(js, list(labels))).values():
                if state is not None and state.status.value == "completed":
                    await outputs.completed(state)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    stop = asyncio.Event()
    supervisor = asyncio.create_task(chaos.supervise(stop)) if chaos is not None else None
    watching = asyncio.create_task(watcher()) if outputs is not None else None
    tasks = [asyncio.create_task(submitter())]
    if chaos is not None and faults:
        tasks.append(asyncio.create_task(faulter()))
    await asyncio.gather(*tasks)
    states = await wait_terminal(js, list(labels), timeout)
    if chaos is not None:
        await chaos.finish()
    stop.set()
    for task in (supervisor, watching):
        if task is not None:
            await task
    if outputs is not None:
        for state in states.values():
            if state.status.value == "completed":
                await outputs.completed(state)
    await nc.close()
    return labels, states, media, time.monotonic() - started


async def main_async(args) -> Report:
    rng = random.Random(args.seed)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="captionbus-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    netns = Netns() if (not args.no_netns and not args.quick and Netns.available()) else None
    report = Report()
    fleet = None
    here = load_settings()
    from captionbus.models import ensure_silero_vad, ensure_whisper_base

    ensure_silero_vad()
    ensure_whisper_base()
    try:
        if netns is not None:
            try:
                netns.create()
            except subprocess.CalledProcessError as exc:
                log(f"no network namespace ({exc.stderr.decode(errors='replace').strip()}): the cut is simulated")
                netns.destroy()
                netns = None
        cluster = Cluster(root, listen_host="0.0.0.0" if netns else "127.0.0.1", roles=ROLES)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CAPTIONBUS_NATS_")},
            # Every process has its own data dir, but shares this host's venvs and models.
            "CAPTIONBUS_ENVS": str(here.envs_dir),
            "CAPTIONBUS_MODELS": str(here.models_dir),
            "CAPTIONBUS_REPLICAS": "3",
            "CAPTIONBUS_ACK_WAIT": str(ACK_WAIT_S),
            # an event the killed coordinator held goes to its successor after this, not 30 s
            "CAPTIONBUS_EVENT_ACK_WAIT": str(EVENT_ACK_WAIT_S),
            "CAPTIONBUS_MAX_DELIVER": str(MAX_DELIVER),
            "CAPTIONBUS_STAGE_CACHE": "off",
            "CAPTIONBUS_ASR_THREADS": "1",
            "CAPTIONBUS_RECONNECT_ATTEMPTS": "240",  # a cut longer than the default 30 s per server
        }
        fleet = Fleet(root, cluster, netns, env)
        log(f"making {args.jobs} clips under {root}")
        clips = make_clips(root / "media", args.jobs)
        poison = poison_clip(clips[0], root / "media" / "poison.mp4")
        log(f"cluster {cluster.url()}" + (f"; netns {netns.name} at {netns.ns_ip}" if netns else ""))
        cluster.start()
        fleet.start_coordinator()
        await wait_provisioned(fleet.url, fleet.coordinator, root / "coordinator.log")
        slots = [f"asr-{i}" for i in range(ASR_REPLICAS)] + [f"{s}-0" for s in OTHER_STAGES]
        await wait_services(fleet.url, [fleet.start_slot(s) for s in slots])
        log("fleet ready; no-fault pass")

        per_job = args.job_timeout
        labels, states, _, ref_wall = await run_pass(fleet, clips, timeout=per_job * len(clips) + 120)
        report.reference_wall_s = ref_wall
        nc = await _bus(fleet.url, "chaos-fetch")
        from captionbus.core.artifacts import ArtifactStore

        store = ArtifactStore(fleet.settings("client"), nc.jetstream())
        reference: dict[str, str] = {}
        reference_jobs: dict[str, str] = {}  # label -> no-fault job id
        for job_id, label in labels.items():
            state = states.get(job_id)
            if state is None or state.status.value != "completed":
                raise RuntimeError(f"no-fault pass: {label} ended {getattr(state, 'status', None)}: "
                                   f"{getattr(state, 'error', '')}")
            reference[label] = await fetch_srt(store, state, root / "reference")
            reference_jobs[label] = job_id
        reference_states = dict(states)
        await nc.close()
        log(f"no-fault pass done in {ref_wall:.0f} s; chaos pass")

        nc = await _bus(fleet.url, "chaos-admin")
        js = nc.jetstream()
        outputs = Outputs(fleet, js)
        for state in reference_states.values():  # the no-fault jobs' bytes, before any attack
            await outputs.completed(state)
        attacker = None
        if args.attacks:
            # Its own generator: the fault schedule is the same with and without the attacks.
            attacker = Attacker(fleet, random.Random(args.seed + 1), outputs, reference_states)
            await attacker.start()
        chaos = Chaos(fleet, rng, nc)
        faults = schedule(rng, args.quick, netns is not None)
        # Submissions spread over the schedule, so every fault meets jobs in flight.
        span = fault_span(faults) + (ATTACK_S * len(ATTACK_KINDS) if attacker else 0.0)
        gap = args.gap if args.gap is not None else max(1.0, span / (len(clips) + 1))
        labels, states, _, wall = await run_pass(
            fleet, clips, timeout=per_job * len(clips) + 300, chaos=chaos, faults=faults,
            poison=poison, rng=rng, gap_s=gap, attacker=attacker, outputs=outputs)
        report.wall_s = wall
        report.faults = faults

        store = ArtifactStore(fleet.settings("client"), js)
        report.submitted = len(labels)
        for job_id, label in labels.items():
            state = states.get(job_id)
            status = state.status.value if state is not None else "missing"
            if status == "completed":
                report.completed += 1
                srt = await fetch_srt(store, state, root / "chaos")
                if label in reference:
                    report.compared += 1
                    if srt != reference[label]:
                        report.differing += 1
                        report.details.append(f"DIFFERS {label} ({job_id})")
            elif status in ("failed", "cancelled") and state.error and "\n" not in state.error:
                report.failed_with_reason += 1
                report.details.append(f"failed {label} ({job_id}): {state.error}")
            else:
                report.lost += 1
                report.details.append(f"LOST {label} ({job_id}): {status} {getattr(state, 'error', '')}")
            if label == "poison":
                report.poison = f"{status}: {getattr(state, 'error', '')}"
        events = await replay_events(js)
        dup, refused, details = count_duplicates(events, states, set(labels))
        report.duplicate_outputs, report.redundant_refused = dup, refused
        report.redelivered = redeliveries(events, states, set(labels))
        report.unplanned_exits = list(chaos.unplanned)
        report.details.extend(details)
        for fault in faults:
            fault.recovery_s = recovery(fault, events)
        await check_bytes(report, outputs, {**reference_states, **states}, labels, reference_jobs)
        if attacker is not None:
            attacker.sniff_finish()
            attacker.forge_finish(states)
            attacker.msg_id_finish(states, events)
            await attacker.close()
            report.attacks = list(attacker.results.values())
        await nc.close()
        return report
    finally:
        if fleet is not None:
            fleet.stop()
            fleet.cluster.stop()
        if netns is not None:
            netns.destroy()
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
        else:
            log(f"kept {root}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=9, help="seeds the fault schedule, targets, gaps and hold times")
    p.add_argument("--jobs", type=int, default=None, help="clips (jobs per pass; the chaos pass adds the poison job)")
    p.add_argument("--quick", action="store_true", help="3 jobs, 3 faults, no network namespace (the CI version)")
    p.add_argument("--gap", type=float, default=None, help="seconds between submits in the chaos pass (default: spread over the fault schedule)")
    p.add_argument("--job-timeout", type=float, default=60.0, help="seconds allowed per job before a job counts as lost")
    p.add_argument("--attacks", action=argparse.BooleanOptionalAction, default=True,
                   help="make every attack of issue 18 between the faults (default on; --no-attacks: faults only)")
    p.add_argument("--no-netns", action="store_true", help="simulate the cut with SIGSTOP even as root")
    p.add_argument("--workdir", help="keep everything (logs, node stores, SRTs) here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--json", action="store_true", help="print the report as JSON after the table")
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = 3 if args.quick else 30
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging("WARNING", json=False)
    report = asyncio.run(main_async(args))
    print(report.table())
    if args.json:
        print(json.dumps(report.as_dict()))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
