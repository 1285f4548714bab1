"""A chaos run anyone can repeat (issue 9 part 6): a 3-node JetStream cluster on this machine,
a coordinator and stage workers as real processes, N `transcribe` jobs, and a seeded schedule of
faults while they run. It prints one table: what happened to the jobs, and one line per fault.

    python benchmarks/chaos.py                    # 24 jobs, every fault kind, seed 9
    python benchmarks/chaos.py --seed 3 --jobs 30
    python benchmarks/chaos.py --quick            # 3 jobs, 3 faults (what tests/e2e/test_chaos.py runs)

What runs: three `nats-server` nodes (JetStream, `sync_interval: always` as in deploy/, separate
client and route ports on loopback), streams and the job KV at R3 (`CAPTIONBUS_REPLICAS=3`, the
coordinator creates them), `captionbus coordinator` as its own process, and one stage service
process per stage of `transcribe` (demux, vad, subtitle_gen, mux) plus two `asr` workers (the
stage whose work dominates), each in its own environment's interpreter, each with its own data
dir, artifacts through the object store (every byte crosses the bus, as between hosts). The stage
cache is off, so every job is work. `CAPTIONBUS_ACK_WAIT` is 6 s, so a dead or paused worker's
request comes back within seconds; `CAPTIONBUS_MAX_DELIVER` is 8 so the schedule's faults cannot
exhaust a request's deliveries by themselves. Clips are espeak-ng sentence pairs (tests/media),
each job a different clip; Whisper base (CTranslate2) as in the e2e tests.

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
                joins with CAPTIONBUS_INSECURE=1: no auth on every interface for the length
                of the run, so use --no-netns on a shared network); the cut takes the host side of the link down for
                20-35 s, the heal brings it up. Without root/netns the cut is simulated by a
                SIGSTOP of that worker for the same time (the bus sees the same silence; only the
                TCP connection's fate differs), and the table says "cut (simulated)".
  poison        one extra job whose input is a truncated copy of a clip (an interrupted
                download): it must fail with a reason, not loop.
`--quick` keeps kill-worker (asr), kill-coord and kill-leader, and the poison job.
The exit status is 0 when nothing was lost or duplicated, else 1.

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

Measured here (2 shared cores, December 2026, seed 9, 24 clips; each run also repeats the no-fault
pass): 25 submitted, 24 completed, 1 failed with reason (the poison: "truncated or corrupt"),
0 lost, 0 duplicate outputs, 0 of 24 SRTs differing, 3 requests redelivered, 0 unplanned exits.
Recovery: NATS node kills 1.8-3.1 s, coordinator 3.3-3.4 s, mux worker 6.3 s, asr workers
57-63 s (model load on a loaded machine), pause 10.3 s (its hold), a 29.2 s cut 30.0 s. Before
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
from contracts import subjects
from core.bus import connect, require_provisioned
from core.logging import configure_logging
from core.settings import Settings
from core.settings import load as load_settings
from tests.natsroles import free_ports

ASR_REPLICAS = 2
OTHER_STAGES = ["demux", "vad", "subtitle_gen", "mux"]
ACK_WAIT_S = 6
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
    """Three nats-server nodes with JetStream, routes on loopback."""

    def __init__(self, root: Path, listen_host: str = "127.0.0.1"):
        numbers = free_ports(6)
        ports, cports = numbers[:3], numbers[3:]
        self.nodes: list[Node] = []
        routes = "\n".join(f"    nats-route://127.0.0.1:{p}" for p in cports)
        for i in range(3):
            conf = root / f"node{i + 1}.conf"
            conf.write_text(
                f"server_name: chaos-{i + 1}\n"
                f"listen: {listen_host}:{ports[i]}\n"
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

    def settings(self, who: str, url: str | None = None) -> Settings:
        return Settings(home=self.root / who, nats_url=url or self.url, artifacts_mode="object", host_id=who)

    def start_coordinator(self) -> None:
        with open(self.root / "coordinator.log", "ab") as out:
            self.coordinator = subprocess.Popen(
                [sys.executable, "-m", "captionbus", "coordinator"],
                env={**self.env, "NATS_URL": self.url, "CAPTIONBUS_HOME": str(self.root / "coordinator")},
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
        extra = {**self.env, "NATS_URL": url}
        if in_ns:
            extra["CAPTIONBUS_INSECURE"] = "1"  # a private veth link of this benchmark
        logs = settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{stage}-{replica}.{n}.log"
        argv = [str(interpreter_for_stage(stage)), "-m", "services", "serve", stage, "--replica-id", f"{replica}{n}"]
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


async def _bus(url: str, name: str):
    return await connect(url, name)


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

    sub = await js.subscribe(subjects.EVENTS_WILDCARD, ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
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
        }


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
                   gap_s: float = 0.0) -> tuple[dict[str, str], dict[str, object], dict[str, Path], float]:
    """Submit every clip (and the poison), run the faults alongside, wait until all are terminal.
    Returns job id -> label, final states, label -> clip, and wall seconds."""
    from core.artifacts import ArtifactStore

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
            labels[await submit_one(fleet, js, store, path, label)] = label
            if gap_s:
                await asyncio.sleep(gap_s)

    async def faulter():
        await asyncio.sleep(rng.uniform(3, 6))
        for fault in faults:
            await chaos.inject(fault)
            await chaos.settle()
            await asyncio.sleep(rng.uniform(4, 9))

    stop = asyncio.Event()
    supervisor = asyncio.create_task(chaos.supervise(stop)) if chaos is not None else None
    tasks = [asyncio.create_task(submitter())]
    if chaos is not None and faults:
        tasks.append(asyncio.create_task(faulter()))
    await asyncio.gather(*tasks)
    states = await wait_terminal(js, list(labels), timeout)
    if chaos is not None:
        await chaos.finish()
        stop.set()
        await supervisor
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
        cluster = Cluster(root, listen_host="0.0.0.0" if netns else "127.0.0.1")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CAPTIONBUS_NATS_")},
            # Every process has its own data dir, but shares this host's venvs and models.
            "CAPTIONBUS_ENVS": str(here.envs_dir),
            "CAPTIONBUS_MODELS": str(here.models_dir),
            "CAPTIONBUS_REPLICAS": "3",
            "CAPTIONBUS_ACK_WAIT": str(ACK_WAIT_S),
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
        from core.artifacts import ArtifactStore

        store = ArtifactStore(fleet.settings("client"), nc.jetstream())
        reference: dict[str, str] = {}
        for job_id, label in labels.items():
            state = states.get(job_id)
            if state is None or state.status.value != "completed":
                raise RuntimeError(f"no-fault pass: {label} ended {getattr(state, 'status', None)}: "
                                   f"{getattr(state, 'error', '')}")
            reference[label] = await fetch_srt(store, state, root / "reference")
        await nc.close()
        log(f"no-fault pass done in {ref_wall:.0f} s; chaos pass")

        nc = await _bus(fleet.url, "chaos-admin")
        js = nc.jetstream()
        chaos = Chaos(fleet, rng, nc)
        faults = schedule(rng, args.quick, netns is not None)
        # Submissions spread over the schedule, so every fault meets jobs in flight.
        gap = args.gap if args.gap is not None else max(1.0, fault_span(faults) / (len(clips) + 1))
        labels, states, _, wall = await run_pass(
            fleet, clips, timeout=per_job * len(clips) + 300, chaos=chaos, faults=faults,
            poison=poison, rng=rng, gap_s=gap)
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
    p.add_argument("--no-netns", action="store_true", help="simulate the cut with SIGSTOP even as root")
    p.add_argument("--workdir", help="keep everything (logs, node stores, SRTs) here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--json", action="store_true", help="print the report as JSON after the table")
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = 3 if args.quick else 24
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging("WARNING", json=False)
    report = asyncio.run(main_async(args))
    print(report.table())
    if args.json:
        print(json.dumps(report.as_dict()))
    ok = report.lost == 0 and report.duplicate_outputs == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
