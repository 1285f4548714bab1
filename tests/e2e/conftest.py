"""End to end on real parts: a real nats-server, the stage services in their own venvs (whisperx
with torch 2.8 for asr, common for the rest), the real Whisper base model, real ffmpeg.

The environments and the model are built on first use (minutes; CI does it once per run)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from captionbus.server import EmbeddedServer
from captionbus.stack import UP_LAUNCHER, ServiceProcess, start_service, stop_services, wait_ready
from captionbus.contracts.events import TERMINAL_KINDS
from captionbus.core.bus import connect, provision
from captionbus.core.settings import Settings
from tests.conftest import SUBTITLE_ENVS, TRANSCRIBE_STAGES
from tests.envtools import built_env, test_models_root


def run_async(coro):
    return asyncio.run(coro)


@dataclass
class Stack:
    """A fleet in miniature: one bus, a coordinator process, stage service processes whose data
    dir is not the client's (so every artifact crosses the bus, as between hosts)."""

    root: Path
    server: EmbeddedServer
    env: dict[str, str]
    services: list[ServiceProcess] = field(default_factory=list)
    coordinator: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def settings(self, who: str) -> Settings:
        return Settings(home=self.root / who, nats_url=self.url, artifacts_mode="object", host_id=who)

    def run_env(self) -> dict[str, str]:
        """The environment of a `captionbus run` that joins this stack when it serves every stage
        of the job (captionbus.stack.up_serving), as a user's `run` joins the `up` on their host,
        instead of starting a server, a coordinator and services of its own: a data dir whose
        nats/url names this stack's server, as `up` leaves its own, and artifacts through the
        object store (this stack's workers are hosts apart, unlike an `up`'s, which share its
        data dir)."""
        home = self.root / "run-home"
        url_file = Settings(home=home).embedded_url_file
        url_file.parent.mkdir(parents=True, exist_ok=True)
        url_file.write_text(self.url)
        env = {**os.environ, "CAPTIONBUS_HOME": str(home), "CAPTIONBUS_ARTIFACTS": "object"}
        env.pop("NATS_URL", None)
        return env

    def start_coordinator(self) -> None:
        log = open(self.root / "coordinator.log", "ab")
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "captionbus", "-v", "coordinator"],
            env={**self.env, "CAPTIONBUS_HOME": str(self.root / "coordinator")},
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def stop_coordinator(self, sig=signal.SIGTERM) -> None:
        if self.coordinator and self.coordinator.poll() is None:
            self.coordinator.send_signal(sig)
            self.coordinator.wait(20)

    def start_stage(self, stage: str, replica: int = 0, extra_env: dict[str, str] | None = None) -> ServiceProcess:
        """One service of `stage` with the stack's environment, and `extra_env` over it."""
        from captionbus.envs import env_for_stage, interpreter_for_stage

        # Its workers say they are an `up`'s (CAPTIONBUS_LAUNCHER), as a user's `up` starts them:
        # a `run` joins only those (captionbus.stack.up_serving; run_env).
        svc = start_service(
            stage, env_for_stage(stage), interpreter_for_stage(stage), self.url,
            self.settings(f"worker-{stage}-{replica}"), replica=replica,
            extra_env={**self.env, "CAPTIONBUS_LAUNCHER": UP_LAUNCHER, **(extra_env or {})},
        )
        self.services.append(svc)
        return svc

    def wait_ready(self, services: list[ServiceProcess]) -> None:
        async def go():
            nc = await connect(self.url, "test-ready")
            try:
                await wait_ready(nc, services)
            finally:
                await nc.close()

        run_async(go())

    def submit(self, media: Path, **kwargs) -> str:
        from captionbus.client import submit
        from captionbus.core.artifacts import ArtifactStore

        async def go():
            nc = await connect(self.url, "test-submit")
            try:
                js = nc.jetstream()
                spec = await submit(js, ArtifactStore(self.settings("client"), js), media, **kwargs)
                return spec.job_id
            finally:
                await nc.close()

        return run_async(go())

    def wait_for(self, job_id: str, predicate, timeout: float = 240.0) -> list:
        """Job events until `predicate(event)` is true; fails the test at timeout."""
        from captionbus.client import follow

        async def go():
            nc = await connect(self.url, "test-follow")
            seen = []
            try:
                async with asyncio.timeout(timeout):
                    async for event in follow(nc.jetstream(), job_id, stop_at_end=False):
                        seen.append(event)
                        if predicate(event):
                            return seen
            except TimeoutError:
                kinds = [f"{e.kind}:{getattr(e, 'node', '')}" for e in seen]
                pytest.fail(f"job {job_id} timed out after {timeout}s; events: {kinds}")
            finally:
                await nc.close()

        return run_async(go())

    def wait_end(self, job_id: str, timeout: float = 240.0) -> list:
        return self.wait_for(job_id, lambda e: e.kind in TERMINAL_KINDS, timeout)

    def fetch(self, outputs: dict, out_dir: Path) -> dict[str, Path]:
        from captionbus.client import fetch_outputs
        from captionbus.core.artifacts import ArtifactStore

        async def go():
            nc = await connect(self.url, "test-fetch")
            try:
                js = nc.jetstream()
                return await fetch_outputs(ArtifactStore(self.settings("client"), js), outputs, out_dir, "clip")
            finally:
                await nc.close()

        return run_async(go())

    def job_state(self, job_id: str):
        from captionbus.client import job_state

        async def go():
            nc = await connect(self.url, "test-state")
            try:
                return await job_state(nc.jetstream(), job_id)
            finally:
                await nc.close()

        return run_async(go())

    def close(self) -> None:
        stop_services(self.services)
        self.stop_coordinator()
        self.server.stop()


def start_stack(root: Path, stages: list[str], extra_env: dict[str, str] | None = None,
                replica_env: dict[tuple[str, int], dict[str, str]] | None = None) -> Stack:
    """A provisioned bus, a coordinator and one service per entry of `stages` (a stage named twice
    gets a second replica; `replica_env`: (stage, replica) -> more environment for that one), all
    ready. A killed worker's request, and an event a killed coordinator held, come back within
    seconds (CAPTIONBUS_ACK_WAIT, CAPTIONBUS_EVENT_ACK_WAIT 6). The caller closes it."""
    server = EmbeddedServer(root / "nats")
    server.start()
    env = {
        **os.environ,
        "NATS_URL": server.url,
        "CAPTIONBUS_ACK_WAIT": "6",  # a killed worker's request comes back within seconds
        "CAPTIONBUS_EVENT_ACK_WAIT": "6",  # so does an event a killed coordinator held (default 30 s)
        "CAPTIONBUS_MAX_DELIVER": "4",
        **(extra_env or {}),
    }
    s = Stack(root=root, server=server, env=env)

    async def prepare():
        nc = await connect(server.url, "test-provision")
        await provision(nc.jetstream())
        await nc.close()

    try:
        run_async(prepare())
        s.start_coordinator()
        replicas = [(stage, stages[:n].count(stage)) for n, stage in enumerate(stages)]
        s.wait_ready([s.start_stage(stage, replica, (replica_env or {}).get((stage, replica)))
                      for stage, replica in replicas])
    except BaseException:
        s.close()
        raise
    return s


@pytest.fixture(scope="session")
def stack(tmp_path_factory, stage_envs, whisper_model) -> Stack:
    """The transcribe workflow's fleet that every e2e test submitting ordinary jobs shares (faults
    restart what they kill). Closed after the last test that uses it (_early_close)."""
    s = start_stack(tmp_path_factory.mktemp("stack"), TRANSCRIBE_STAGES)
    _early_close["stack"] = s
    try:
        yield s
    finally:
        _early_close.pop("stack", None)
        s.close()


CHUNKED_STAGES = ["demux", "vad", "chunk", "asr", "transcript_join", "subtitle_gen", "mux"]
# The chunked fleet's second asr process: decoders sharing its one model load (`workers`).
FLEET_DECODERS = 2


@pytest.fixture(scope="session")
def chunked_fleet(tmp_path_factory, stage_envs, whisper_model) -> Stack:
    """The fleet every chunked job of tests/e2e/test_chunked.py and test_chunked_aligned.py runs
    on: the `chunked` workflow's stages with two asr processes, the second of them two decoders
    sharing one model load (CAPTIONBUS_ASR_WORKERS 2, what `run --replicas 2` / `serve asr
    --replicas 2` start on a CPU host: captionbus.stack.replica_processes), every decoder of one
    thread, and the alignment stage on the tiny random wav2vec2 English model
    (tests/model_factory/wav2vec2.py) for `chunked_aligned`. The stage cache is off, so every job decodes. Its chunk worker cuts a
    job that sets no chunk size above 20 s (CAPTIONBUS_CHUNK_ABOVE_S; every chunked job here sets
    one): test_default_chunking.py's plain `run FILM` joins this fleet.

    Those jobs were one `captionbus run` each (three films in test_chunked, two in
    test_chunked_aligned), and each run started and stopped its own server, coordinator and seven
    services, asr importing torch every time. `run`'s own path, `-w chunked --chunk-s`, is still
    a `run` in test_chunked_aligned.py's pyannote test.

    Why the decoders live here: their end-to-end check (two chunks of a film decoding at once in
    one process after one model load, the same words, the coordinator counting the process's
    slots: test_chunked.py) was a stack of its own, the chunked stages again with one asr process
    of two decoders: 2-3 minutes of the suite for a torch import, a model load and jobs this
    fleet runs anyway. The second asr process being the decoders' keeps both checks: separate
    processes decoding side by side (and one killed mid-film) and decoders of one process."""
    from captionbus.models import ensure_silero_vad
    from tests.model_factory.wav2vec2 import ensure_wav2vec2

    ensure_silero_vad()
    env = {"CAPTIONBUS_ASR_THREADS": "1", "CAPTIONBUS_STAGE_CACHE": "off", "CAPTIONBUS_CHUNK_ABOVE_S": "20",
           "CAPTIONBUS_ALIGN_MODEL_EN": str(ensure_wav2vec2(test_models_root(), "en")),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    s = start_stack(tmp_path_factory.mktemp("fleet"), [*CHUNKED_STAGES, "asr", "alignment"], env,
                    replica_env={("asr", 1): {"CAPTIONBUS_ASR_WORKERS": str(FLEET_DECODERS)}})
    _early_close["chunked_fleet"] = s
    try:
        yield s
    finally:
        _early_close.pop("chunked_fleet", None)
        s.close()


@dataclass
class UpStack:
    """A `captionbus up` process on its embedded bus, in its own data dir `home`: commands run
    with `env` find it there (no NATS_URL), as a user's do on the host where `up` runs."""

    home: Path
    env: dict[str, str]
    log: Path
    process: subprocess.Popen
    exit_code: int | None = None

    def workers(self) -> list[dict]:
        """What `captionbus workers --json` lists (nothing while the bus is not up yet)."""
        done = subprocess.run([sys.executable, "-m", "captionbus", "workers", "--json"], env=self.env,
                              capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout or "[]") if done.returncode == 0 else []

    def served(self) -> set[str]:
        return {w["metadata"]["stage"] for w in self.workers()}

    def worker_pids(self) -> set[str]:
        return {str(w["metadata"]["pid"]) for w in self.workers()}

    def close(self) -> None:
        """Ctrl-C, as a user stops it: README's exit code 130, checked (closing twice is harmless)."""
        if self.exit_code is None:
            self.process.send_signal(signal.SIGINT)
            self.exit_code = self.process.wait(90)
        assert self.exit_code == 130, self.log.read_text()[-3000:]


# What TRANSLATE_UP serves: the subtitle and translate workflows' stages (chunking included) and
# both optional stages of translate.
TRANSLATE_UP = ["up", "-w", "subtitle", "-w", "translate", "--with", "source_separation", "--with", "vad_pyannote",
                "--no-dashboard"]
TRANSLATE_UP_STAGES = {"demux", "source_separation", "vad", "vad_pyannote", "chunk", "asr", "alignment",
                       "transcript_join", "translation_indictrans2", "translation_nllb", "subtitle_gen", "mux"}


@pytest.fixture(scope="session")
def translate_up(tmp_path_factory, model_env) -> UpStack:
    """One `captionbus up` serving every stage of the subtitle and translate workflows with the
    locally built models, for test_translate_subtitle.py's `run`s (which join it: `run` submits to
    an `up` on its host that serves the job's stages) and test_translate_up.py's `submit`.

    They were three stacks: two `run`s of one subtitle job, each starting and stopping a server,
    a coordinator and ten services (two whisperx, indictrans2 and nllb importing torch), and an
    `up` of translate's. Returned once every stage is served (up reads the models' paths from
    `env` at start). Closed after the last test that uses it (_early_close), by Ctrl-C."""
    from captionbus.models import ensure_pyannote_segmentation
    from tests.model_factory.demucs import demucs_service_env, ensure_demucs

    for env_name in ("demucs", "pyannote"):
        built_env(env_name)
    ensure_pyannote_segmentation()
    root = tmp_path_factory.mktemp("translate-up")
    home = root / "home"
    env = {**os.environ, **model_env, **demucs_service_env(ensure_demucs(test_models_root())),
           "CAPTIONBUS_HOME": str(home)}
    env.pop("NATS_URL", None)
    log = root / "up.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "captionbus", *TRANSLATE_UP], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    up = UpStack(home=home, env=env, log=log, process=process)
    _early_close["translate_up"] = up
    try:
        wait_until((home / "nats" / "url").exists, 60, "the embedded server's url file")
        wait_until(lambda: process.poll() is not None or TRANSLATE_UP_STAGES <= up.served(), 300,
                   f"stages {sorted(TRANSLATE_UP_STAGES)}", CLI_POLL_S)
        assert process.poll() is None, log.read_text()[-3000:]
        yield up
    finally:
        _early_close.pop("translate_up", None)
        up.close()


# Session stacks closed as soon as no later test of the run asks for them (closing twice is
# harmless): the chunked fleet's idle workers hold ~4 GB (three whisperx processes) that the
# tests after test_chunked*.py would otherwise run beside, as they did when it was per module;
# the transcribe stack's asr ~1.9 GB, beside the integration tests after the e2e ones.
_early_close: dict[str, Stack | UpStack] = {}


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if not _early_close:
        return
    later = item.session.items[item.session.items.index(item) + 1:]
    for name in list(_early_close):
        if not any(name in other.fixturenames for other in later):
            _early_close.pop(name).close()


def chunked_job(fleet: Stack, film: Path, out: Path, workflow: str, target_s: float, source_language: str | None = "en",
                options: dict | None = None) -> tuple[dict, dict, dict[str, Path]]:
    """One English film through `workflow` on `fleet` with chunks of about `target_s` seconds (0:
    one chunk), as `captionbus run FILM -w WORKFLOW -s en --chunk-s TARGET_S` submits it (None:
    no -s, the language detected; `options`: more `-o`): its transcript, its job record (the
    JobState `run` writes as FILM.job.json) and its output files."""
    return chunked_result(fleet, submit_chunked(fleet, film, workflow, target_s, source_language, options), out)


def submit_chunked(fleet: Stack, film: Path, workflow: str, target_s: float, source_language: str | None = "en",
                   options: dict | None = None) -> str:
    """chunked_job's submission alone: the job's id, for chunked_result."""
    return fleet.submit(film, workflow=workflow, source_language=source_language,
                        options={"chunk": {"target_s": target_s}, **(options or {})})


def chunked_result(fleet: Stack, job_id: str, out: Path) -> tuple[dict, dict, dict[str, Path]]:
    """What chunked_job returns, for a job submit_chunked submitted: waits for it to complete."""
    final = fleet.wait_end(job_id, timeout=900)[-1]
    assert final.kind == "completed", getattr(final, "reason", "")
    files = fleet.fetch(final.outputs, out)
    record = json.loads(fleet.job_state(job_id).model_dump_json())
    return json.loads(files["transcript"].read_text()), record, files


def chunked_jobs(fleet: Stack, film: Path, jobs: list[tuple[Path, str, float]]) -> list[tuple[dict, dict, dict[str, Path]]]:
    """chunked_job for each (out, workflow, target_s) of `jobs` on `film`, all submitted before
    the first is waited for: the fleet's two asr workers decode one job's chunks beside
    another's instead of one of them idling while a job's single request (target_s 0) or its
    last chunk is decoded. Each job's outputs are its own (tests/e2e/test_faults.py: concurrent
    jobs never mix outputs), so what a test compares is what the same jobs one by one gave."""
    submitted = [(submit_chunked(fleet, film, workflow, target_s), out) for out, workflow, target_s in jobs]
    return [chunked_result(fleet, job_id, out) for job_id, out in submitted]


# Between two calls of a predicate that runs a `captionbus` command: each is a Python process
# importing the CLI (~0.9 s of CPU), which every 0.2 s while a stack loads its models took about
# half a core of the two from the services the test waits for.
CLI_POLL_S = 2.0


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def model_env(whisper_model) -> dict[str, str]:
    """Env vars pointing the services at locally built models; builds the envs they need."""
    from captionbus.models import ensure_silero_vad
    from tests.model_factory.indictrans2 import ensure_indictrans2
    from tests.model_factory.nllb import ensure_nllb
    from tests.model_factory.wav2vec2 import ensure_wav2vec2

    for env in SUBTITLE_ENVS:
        built_env(env)
    root = test_models_root()
    ensure_silero_vad()
    indictrans2 = ensure_indictrans2(root)
    return {
        "CAPTIONBUS_INDICTRANS2_EN_INDIC_MODEL": str(indictrans2["en-indic"]),
        "CAPTIONBUS_INDICTRANS2_INDIC_EN_MODEL": str(indictrans2["indic-en"]),
        "CAPTIONBUS_INDICTRANS2_INDIC_INDIC_MODEL": str(indictrans2["indic-indic"]),
        "CAPTIONBUS_NLLB_MODEL": str(ensure_nllb(root)),
        "CAPTIONBUS_ALIGN_MODEL_HI": str(ensure_wav2vec2(root, "hi")),
        "CAPTIONBUS_ALIGN_MODEL_EN": str(ensure_wav2vec2(root, "en")),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
