"""What every route of a gateway shares: its config, its bus link, per-key limits, job lookups
that respect ownership, submission, and the wait for a job's end. One `Gateway` per app
(`app.state.gateway`); routes get it, and what they need from it, through `deps.py`."""
from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog

from captionbus import client
from captionbus.client import SubmitError
from captionbus.gateway.dispatch import DispatchConfig, Dispatcher, Subscriber
from captionbus.gateway.ends import JobEnds
from captionbus.gateway import shown
from captionbus.gateway.forms import Form
from captionbus.gateway.keys import Caller, KeyRing
from captionbus.gateway.metrics import GatewayMetrics
from captionbus.runner import names_subtitles, validate_job
from captionbus.web.buslink import BusLink
from captionbus.web.errors import ApiError
from captionbus.contracts import JobSpec, JobState
from captionbus.contracts.events import TERMINAL_KINDS
from captionbus.contracts.ids import tenant_of, validate_token
from captionbus.contracts.declarations.diarization import MAX_REFERENCES
from captionbus.core import speaker_refs
from captionbus.core.artifacts import ArtifactError, ArtifactMissing, ArtifactStore
from captionbus.core.settings import Settings

log = structlog.get_logger("captionbus.gateway")

BUS_TIMEOUT_S = 10.0
MODELS_TTL_S = 5.0
RECORDED_WITHIN_S = 5.0


async def known_speakers(form: Form, folder: Path, limit: int) -> dict[str, Path]:
    """OpenAI's known speakers: `known_speaker_names[]` and `known_speaker_references[]` (data
    URLs of 2-10 s of audio, any format `file` takes; openai-python sends both as repeated form
    fields), paired in order -> name -> the clip as 16 kHz mono WAV in `folder`. 400 (one line)
    for anything that cannot be used: unpaired lists, more than `limit`, a name the labels
    refuse, a URL that is not base64 audio, a clip that does not decode or is not 2-10 s."""
    names = form.many("known_speaker_names[]", "known_speaker_names")
    urls = form.many("known_speaker_references[]", "known_speaker_references")
    if not names and not urls:
        return {}
    try:
        if len(names) != len(urls):
            raise speaker_refs.ReferenceError(
                f"{len(names)} known_speaker_names[] and {len(urls)} known_speaker_references[]: give one "
                "reference per name, in the same order")
        names = [speaker_refs.check_name(name.strip()) for name in names]
        speaker_refs.check_count(names, limit)
        out = {}
        for n, (name, url) in enumerate(zip(names, urls)):
            what = f"known_speaker_references[{n}] ({name})"
            raw = speaker_refs.from_data_url(url, folder / f"reference-{n}.raw", what)
            out[name] = await asyncio.to_thread(speaker_refs.convert, raw, folder / f"reference-{n}.wav", what)
        return out
    except speaker_refs.ReferenceError as e:
        raise ApiError(400, str(e), "invalid_request_error") from None


def known_speaker_options(options: dict, names: list[str], subtitles: bool) -> dict:
    """The job's options with known speakers: diarization on (speakers auto unless given), and,
    where the workflow writes `subtitles`, the names as SDH names (under the options' own)."""
    group = options.get("diarization")
    options = {**options, "diarization": {"speakers": "auto", **(group if isinstance(group, dict) else {})}}
    if not subtitles:
        return options
    given = options.get("subtitle_gen")
    given = given if isinstance(given, dict) else {}
    try:
        named = speaker_refs.sdh_names(names, given.get("speaker_names"))
    except speaker_refs.ReferenceError as e:
        raise ApiError(400, str(e)) from None
    return {**options, "subtitle_gen": {**given, "speaker_names": named}}


@dataclass
class GatewayConfig:
    settings: Settings
    nats_url: str
    keys: KeyRing | None = None  # None: no auth (loopback only; the CLI refuses otherwise)
    max_upload_bytes: int = 4 * 1024**3
    concurrency_per_key: int = 8
    inputs_dir: Path | None = None  # jobs may name files under it instead of uploading
    webhook_allow: list[str] = field(default_factory=list)
    key_webhook_allow: dict[str, list[str]] = field(default_factory=dict)  # a key's own callback_url prefixes
    webhook_secret: bytes | None = None
    job_timeout_s: float = 3600.0  # the OpenAI endpoints answer when the job ends, or give up
    webhook_subscribers: list[Subscriber] = field(default_factory=list)  # every job's events go to these
    webhook_lease_s: float = 30.0  # a dead gateway's deliveries are resumed by another after this
    webhook_catchup_s: float = 3600.0  # subscribers get jobs submitted this long before the gateway started
    # who reads /openapi.json, /docs, /redoc (routes/docs.py): "open", "key" (the document with a key,
    # no pages) or "off"; None: "open" without keys (loopback only), else "key". The CLI: open on loopback.
    docs: str | None = None


@contextlib.asynccontextmanager
async def on_bus():
    """Bus calls that hang (a server gone mid-call) become 503, not a stuck request."""
    try:
        async with asyncio.timeout(BUS_TIMEOUT_S):
            yield
    except TimeoutError:
        raise ApiError(503, f"bus unavailable: no answer within {BUS_TIMEOUT_S:.0f} s") from None


class Timing:
    """Where a request's time went, as a `Server-Timing` header (form;dur=…, submit;dur=…, job;dur=…,
    answer;dur=… in ms): the benchmark reads it to split gateway overhead from the job itself."""

    def __init__(self):
        self.last = time.perf_counter()
        self.phases: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases.append((name, (now - self.last) * 1000))
        self.last = now

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.1f}" for name, ms in self.phases)


class Limiter:
    """Requests in flight per key; one over the limit is refused (429), never queued.

    Touched only on the event loop (deps.slot is an `async def` dependency): the check and the
    count are one step between two awaits, so no lock is needed. It was a sync generator
    dependency, which FastAPI runs in its thread pool, entry and exit alike, so two threads could
    pass the check together and a lost `+= 1` or `-= 1` left a key's count drifting for the
    gateway's life (too high: the key refused for ever; too low: past its limit)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: dict[str, int] = {}

    def acquire(self, who: str) -> None:
        held = self.in_flight.get(who, 0)
        if held >= self.limit:
            raise ApiError(429, f"key {who!r} has {self.limit} requests in flight (its limit); retry later")
        self.in_flight[who] = held + 1

    def release(self, who: str) -> None:
        held = self.in_flight[who] - 1
        if held:
            self.in_flight[who] = held
        else:
            del self.in_flight[who]  # a key with nothing in flight has no entry: the map stays small

    def total(self) -> int:
        return sum(self.in_flight.values())


def model_name(described: str) -> str:
    """The name a client sends back for a model an asr worker describes as `SOURCE (int8, cpu)`:
    the source's last path part (`whisper-base-ct2`), which the asr stage accepts as `model`
    (captionbus/services/asr: AsrModel.names), and never a path of the server's disk."""
    source = re.sub(r"\s*\([^()]*\)\s*$", "", described.strip())
    return Path(source).name or source


class Gateway:
    def __init__(self, config: GatewayConfig, job_events):
        self.config = config
        self.job_events = job_events
        self.ends = JobEnds()
        self.metrics = GatewayMetrics()
        self.webhook_client = httpx.AsyncClient(timeout=10.0, follow_redirects=False)
        self.dispatcher = None
        if (config.webhook_allow or config.key_webhook_allow) and config.webhook_secret is not None:
            self.dispatcher = Dispatcher(
                DispatchConfig(secret=config.webhook_secret, allow=config.webhook_allow,
                               key_allow=config.key_webhook_allow,
                               subscribers=config.webhook_subscribers, lease_s=config.webhook_lease_s,
                               catchup_s=config.webhook_catchup_s),
                self.webhook_client, job_events, observe=self.metrics.delivery, prove=self.proven_owner)
        hooks = [self.ends.attach] + ([lambda nc: self.dispatcher.start(nc.jetstream())] if self.dispatcher else [])
        self.link = BusLink(config.nats_url, "captionbus-gateway", hooks)
        self.limiter = Limiter(config.concurrency_per_key)
        self.metrics.in_flight.set_function(self.limiter.total)
        self.upload_dir = Path(config.settings.home) / "gateway" / "uploads"
        self._models: tuple[float, list[str], set[str]] = (-MODELS_TTL_S, [], set())
        self._unproven: set[str] = set()  # job ids whose unproven owner was logged

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect in the background (not on the first request), so a restarted gateway resumes
        webhook deliveries and follows new jobs for subscribers even if no request comes."""
        self.link.start()

    async def stop(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        await self.webhook_client.aclose()
        await self.link.close()

    # -- the bus -----------------------------------------------------------------------------
    def js(self):
        if not self.link.ready:
            raise ApiError(503, f"bus unavailable: {self.link.not_ready_reason()}")
        return self.link.nc.jetstream()

    def store(self, js) -> ArtifactStore:
        return ArtifactStore(self.config.settings, js)

    async def output(self, js, job_id: str, name: str, ref) -> Path:
        """The file of a job's output, or a one-line answer that says what happened and names no
        host: missing is a 404 (gone: retention or gc), unreadable or corrupt a 502. Before, both
        were "500 internal error (ArtifactMissing)". The store's own words name the artifact
        root's path, the host that made it and the bucket: they go to the log, not to a key."""
        try:  # not under on_bus(): a 1 GB output takes ~10 s to fetch from the object store
            return await self.store(js).scoped(tenant_of(job_id)).get(ref)  # its tenant's namespace
        except ArtifactMissing as e:
            log.warning("job output missing", job_id=job_id, output=name, error=str(e))
            raise ApiError(404, f"job {job_id}'s output {name!r} is no longer stored (removed by retention or gc); "
                                "the gateway's log has the details") from None
        except ArtifactError as e:
            log.warning("job output unreadable", job_id=job_id, output=name, error=f"{type(e).__name__}: {e}")
            raise ApiError(502, f"job {job_id}'s output {name!r} could not be read ({type(e).__name__}); "
                                "the gateway's log has the details", "bad_gateway") from None

    # -- callers and their jobs --------------------------------------------------------------
    def known(self, key: str | None) -> Caller | None:
        """Who `key` is, or None for a missing or unknown key: the one lookup of every route
        (`caller`) and of /readyz, which answers without a key but tells the reason only to one."""
        if self.config.keys is None:
            return Caller("anonymous", admin=True)  # no keys: loopback only, one trusted user
        return self.config.keys.caller(key)

    def caller(self, key: str | None) -> Caller:
        caller = self.known(key)
        if caller is None:
            raise ApiError(401, "missing or unknown API key: send `Authorization: Bearer <key>` "
                                "(make one with `captionbus gateway add-key NAME --keys FILE`)",
                           headers={"WWW-Authenticate": "Bearer"})
        return caller

    def owner_of(self, caller: Caller) -> str | None:
        return None if self.config.keys is None else caller.name

    def proof_for(self, caller: Caller):
        """What makes the owner proof of a job `caller` submits (None without keys: no owner)."""
        keys = self.config.keys
        return None if keys is None else (lambda spec: keys.proof(caller.name, spec))

    async def job(self, js, job_id: str, caller: Caller) -> JobState:
        """The job if `caller` may see it; another key's job is 404 like an unknown id (its
        existence is not told)."""
        try:
            validate_token(job_id, "job id")
        except ValueError:
            raise ApiError(404, f"no job {job_id!r}") from None
        async with on_bus():
            state = await client.job_state(js, job_id)
        if state is None:
            raise ApiError(404, f"no job {job_id!r}")
        state = self.proven(state)
        if not caller.may_see(state.spec.owner):
            raise ApiError(404, f"no job {job_id!r}")
        return state

    async def jobs(self, js, caller: Caller) -> list[JobState]:
        """The jobs `caller` may see, oldest first, as heads (client.job_head): whole them
        (`whole`) for what is shown of their nodes."""
        async with on_bus():
            states = await client.list_jobs(js, whole=False)
        return [s for s in map(self.proven, states) if caller.may_see(s.spec.owner)]

    @staticmethod
    async def whole(js, states: list[JobState]) -> list[JobState]:
        """`states` with their completed nodes read in (client.whole_record: a job's parts at once,
        one job after another). A job collected (gc) since it was listed is left out, as
        client.list_jobs leaves out one collected before its head was read: a part that is gone
        while the job's head is gone too is no error (client.job_state's rule); while the head
        is still there, it is (RecordPartMissing)."""
        wholes = []
        async with on_bus():
            for state in states:
                try:
                    wholes.append(await client.whole_record(js, state))
                except client.RecordPartMissing:
                    if await client.job_head(js, state.job_id) is not None:
                        raise
        return wholes

    def proven_owner(self, spec: JobSpec) -> str | None:
        """The key a job belongs to: its `owner` only with a valid proof (gateway.keys' docstring:
        any bus client may write the name); an unproven one is logged and belongs to no key."""
        job_id, owner = spec.job_id, spec.owner
        proven = None if self.config.keys is None else self.config.keys.owner(spec)
        if owner is not None and proven is None and job_id not in self._unproven:
            if len(self._unproven) > 10_000:  # once per job (a listing reads each job on every call)
                self._unproven.clear()
            self._unproven.add(job_id)
            log.warning("job owner unproven: the job belongs to no key", job_id=job_id, claimed_owner=owner)
        return proven

    def proven(self, state: JobState) -> JobState:
        """`state` with `spec.owner` as proven_owner says (unchanged when proven)."""
        owner = self.proven_owner(state.spec)
        if owner == state.spec.owner:
            return state
        return state.model_copy(update={"spec": state.spec.model_copy(update={"owner": owner})})

    # -- submission ----------------------------------------------------------------------------
    def input_file(self, form: Form) -> tuple[Path, str, bool]:
        """(file, name, owned): the upload, or a file under --inputs named by `path`."""
        if form.upload is not None:
            if form.upload.size == 0:
                raise ApiError(400, f"the uploaded file {form.upload.filename!r} is empty (0 bytes)")
            return form.upload.path, form.upload.filename, True
        named = form.one("path") or form.one("url")
        if not named:
            raise ApiError(400, "no input: send a `file` part, or `path` of a file under the gateway's inputs dir")
        if named.startswith("file://"):
            named = named[len("file://"):]
        elif "://" in named:
            raise ApiError(400, f"{named!r}: this gateway reads no URLs, only files under its inputs dir")
        if self.config.inputs_dir is None:
            raise ApiError(400, "this gateway takes uploads only (start it with --inputs DIR to allow `path`)")
        root = self.config.inputs_dir.resolve()
        path = (root / named).resolve()
        if not path.is_relative_to(root):
            raise ApiError(400, f"{named!r} is outside the gateway's inputs dir")
        if not path.is_file():
            raise ApiError(404, f"{named!r}: no such file in the gateway's inputs dir")
        if path.stat().st_size == 0:
            raise ApiError(400, f"{named!r} is empty (0 bytes)")
        return path, path.name, False

    async def submit(self, js, form: Form, caller: Caller, *, workflow: str, source: str | None,
                     targets: list[str], options: dict, job_id: str | None = None,
                     max_references: int = MAX_REFERENCES) -> str:
        """Validate and submit; the form's known_speaker_names[] / known_speaker_references[]
        (data URLs) become the diarization stage's reference clips (at most `max_references`)."""
        # Artifacts are named by the door that stored them, never by a caller (another job's key).
        # Every option group counts: the coordinator merges groups named by stage, node name or node
        # id (coordinator.graph), so a workflow's diarization node may go by another name.
        named = sorted(key for key, group in options.items() if isinstance(group, dict) and "references" in group)
        if named:
            raise ApiError(400, f"options.{named[0]}.references is set by the gateway: send "
                                "known_speaker_names[] and known_speaker_references[] (data URLs)")
        def validate(options: dict) -> None:
            try:
                validate_job(workflow, source, targets, local_stack=False, options=options)
            except (SubmitError, ValueError) as e:
                raise ApiError(422, str(e)) from None

        validate(options)
        path, name, owned = self.input_file(form)
        self.upload_dir.mkdir(parents=True, exist_ok=True)  # (a url-encoded form made no upload)
        with tempfile.TemporaryDirectory(dir=self.upload_dir, prefix="refs-") as folder:
            refs = await known_speakers(form, Path(folder), max_references)
            if refs:  # speakers on, the names in the subtitles: checked again
                options = known_speaker_options(options, list(refs), names_subtitles(workflow))
                validate(options)
            async with on_bus():
                spec = await client.submit(js, self.store(js), path, workflow=workflow, source_language=source,
                                           target_languages=targets, options=options, name=name, copy=not owned,
                                           job_id=job_id, owner=self.owner_of(caller), speaker_refs=refs,
                                           owner_proof=self.proof_for(caller))
        return spec.job_id

    async def recorded(self, js, job_id: str, within_s: float = RECORDED_WITHIN_S) -> bool:
        """Wait (bounded) until the coordinator has recorded a job just submitted, so that the
        201's URL answers at once: GET /v1/jobs/ID right after a 201 used to say "no job" for
        the few ms before the coordinator wrote its record. False when no coordinator did within
        `within_s` (the job is queued; it is read once one runs)."""
        deadline = asyncio.get_running_loop().time() + within_s
        delay = 0.005
        while True:
            async with on_bus():
                if await client.job_head(js, job_id) is not None:
                    return True
            if asyncio.get_running_loop().time() + delay > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    # -- models --------------------------------------------------------------------------------
    async def served_models(self) -> list[str]:
        """Names (model_name) of the ASR models live asr workers serve, from their `$SRV.STATS`,
        cached for MODELS_TTL_S."""
        return (await self._served())[0]

    async def serves(self, stage: str) -> bool:
        """Whether a live worker serves `stage` (the same cached `$SRV.STATS` replies)."""
        return stage in (await self._served())[1]

    async def _served(self) -> tuple[list[str], set[str]]:
        at, names, stages = self._models
        now = asyncio.get_running_loop().time()
        if now - at > MODELS_TTL_S:
            self.js()
            replies = await client.workers(self.link.nc, timeout=0.5)
            names = sorted({model_name(str(r["metadata"]["model"])) for r in replies
                            if r.get("metadata", {}).get("stage") == "asr" and r.get("metadata", {}).get("model")})
            stages = {str(r.get("metadata", {}).get("stage")) for r in replies}
            self._models = (now, names, stages)
        return names, stages

    # -- waiting for a job ---------------------------------------------------------------------
    async def wait_for_end(self, js, job_id: str, ended: asyncio.Future):
        async def is_terminal() -> bool:
            async with on_bus():
                state = await client.job_head(js, job_id)
            return state is not None and state.status.value in TERMINAL_KINDS

        async def replay():
            # The reader ends at the job's real end; a cancelled-then-retried job has `cancelled`
            # in the middle of its history, so the end is the *last* terminal event, not the first.
            last = None
            async for _, event in self.job_events(js, job_id, 0):
                if event.kind in TERMINAL_KINDS:
                    last = event
            if last is None:
                raise ApiError(503, f"lost the event stream of job {job_id}")
            return last

        try:
            async with asyncio.timeout(self.config.job_timeout_s):
                return shown.event(await self.ends.wait(ended, is_terminal, replay))  # paths cut: gateway.shown
        except TimeoutError:
            raise ApiError(504, f"job {job_id} did not end within {self.config.job_timeout_s:.0f} s; "
                                f"it goes on: GET /v1/jobs/{job_id}") from None
