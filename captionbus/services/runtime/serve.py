"""One loop for every stage service: fetch a request, run the handler in a thread with
heartbeats, store outputs, publish the outcome, then ack / nak / term.

Delivery rules (JetStream work queue, one durable pull consumer per stage, replicas compete):
- success: outputs stored, StageCompleted published (Nats-Msg-Id = key.completed bound to the token: captionbus.core.bus.event_msg_id), then ack;
- BadInput or an unreadable request: StageFailed(retryable=False), then term (never redelivered);
- Retryable or any other exception: nak with backoff, until delivery max_deliver, which publishes
  StageFailed "failed on all N attempts" and terms: the runtime never loops forever.
A request whose job is already finished (cancelled, failed) is acked and dropped unrun; one
whose job is cancelled or fails while it runs is acked within a poll (CANCEL_POLL_S) of the
job's `cancelled`/`failed` event (JobEndWatch), and its handler stops at its next progress report.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import mimetypes
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import nats.errors
import nats.micro
import structlog
from nats.js.errors import FetchTimeoutError, KeyNotFoundError
from pydantic import ValidationError

from captionbus import core
from captionbus.contracts import (
    JobStatus,
    StageCompleted,
    StageFailed,
    StageProgress,
    StageRequest,
    StageWarning,
    WorkerInfo,
    subjects,
    worker_identity,
)
from captionbus.contracts.events import LOADING_MODEL
from captionbus.contracts.ids import NO_TENANT, tenant_of
from captionbus.core.artifacts import ArtifactStore, ArtifactStoreFull
from captionbus.core.bus import (
    StagePolicy,
    connect,
    effective_policy,
    ensure_stage_consumer_info,
    publish_event,
    require_provisioned,
    through_failover,
)
from captionbus.core.discovery import serving, stage_workers
from captionbus.core.retry import RetryPolicy
from captionbus.core.service_options import load_options
from captionbus.core.settings import PROJECT_ROOT, Settings, config_dirs
from captionbus.core.text import one_line, without_paths
from captionbus.core.tasks import cancel_and_wait
from captionbus.services.runtime.cache import (
    ITEMS_PREFIX,
    StageCache,
    cache_enabled_for,
    cache_key,
    worker_fingerprint,
)
from captionbus.services.runtime.context import EVENT_ID_FIELDS, RequestContext, event_ids, result_ids
from captionbus.services.runtime.definition import SetupContext, StageDefinition
from captionbus.services.runtime.errors import BadInput, Cancelled, Retryable
from captionbus.services.runtime.info import describe, flat_metadata, worker_info, worker_summary
from captionbus.services.runtime.setup_turn import SetupTurn
from captionbus.services.runtime.state import WorkerStatus

FETCH_TIMEOUT_S = 1.0  # how long an idle fetch waits; also bounds how fast a stop is noticed
MAX_RETRY_DELAY_S = 60.0
# Storing a finished attempt's outputs and publishing its completion: 5 tries, 1, 2, 4, 8 s apart
# (heartbeats go on meanwhile), before the attempt is given up and redelivered.
RESULT_RETRY = RetryPolicy(initial_s=1.0, multiplier=2.0, max_s=15.0, max_attempts=5)
# A replica whose setup failed leaves a request to a healthy replica this long at a time.
UNSERVABLE_NAK_S = 2.0
_FINISHED = {s.value for s in JobStatus if s.finished}
LOADING_MESSAGE = LOADING_MODEL  # the StageProgress message of a request waiting for setup()


class _Unservable(Exception):
    """This replica's setup failed; the request goes to _unservable."""


def error_line(error: BaseException) -> str:
    """`Type: message` on one line, for events a person reads; tracebacks stay in the log."""
    if isinstance(error, ValidationError):
        text = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()[:3]
        )
        text = f"invalid stage request: {text}"
    elif isinstance(error, (BadInput, Retryable)):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    return one_line(text)


def setup_policy(attempts: int, initial_s: float = 2.0) -> RetryPolicy:
    """Retries of a stage's setup (model loading): `attempts` in all (CAPTIONBUS_SETUP_ATTEMPTS),
    2, 4, 8 ... s apart, at most 30 s. Bounded in the process itself: a model that is not on this
    host does not appear by restarting, and the old endless restart loop left jobs `running`."""
    return RetryPolicy(initial_s=initial_s, multiplier=2.0, max_s=30.0, max_attempts=attempts)


async def _set_up(definition: StageDefinition, ctx: SetupContext, policy: RetryPolicy, stop: asyncio.Event,
                  log: Any) -> tuple[Any, str | None]:
    """(resources, None) once setup() succeeds; (None, its one-line reason) when it failed
    `policy.max_attempts` times."""
    attempt = 0
    while True:
        attempt += 1
        started = time.perf_counter()
        try:
            resources = await asyncio.to_thread(definition.setup, ctx)
        except Exception as e:
            reason = error_line(e)
            if policy.exhausted(attempt) or stop.is_set():
                log.error("stage setup failed; this replica answers its requests with the reason",
                          error=reason, attempts=attempt, exc_info=e)
                return None, reason
            delay = policy.delay(attempt)
            log.warning("stage setup failed; retrying", error=reason, attempt=attempt, retry_in_s=delay)
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            continue
        log.info("stage setup done", seconds=round(time.perf_counter() - started, 3), attempts=attempt)
        return resources, None


def retry_policy(retry_delay_s: float) -> RetryPolicy:
    """Nak delays of a failed request: retry_delay_s, doubling per delivery, at most a minute.
    How many deliveries there are is the consumer's max_deliver (StagePolicy), kept by the server."""
    return RetryPolicy(initial_s=retry_delay_s, multiplier=2.0, max_s=MAX_RETRY_DELAY_S)


# Job events that end a job's running work. A worker holds one core subscription per kind for
# every job (JobEndWatch); its heartbeat's job-state read stays the backstop.
ENDING_KINDS = ("cancelled", "failed")
# How often a worker waiting on its handler looks at the request's cancel flag.
CANCEL_POLL_S = 0.05


class JobEndWatch:
    """Tells running requests at once that their job was cancelled or failed.

    Why a subscription: the heartbeat read the job's state every ack_wait/3 (10 s by default),
    so asr went on for seconds after a cancel (2 more progress reports, its attempt finished
    2.6 s later, issue 19). One plain subscription per worker process on
    `captionbus.job.*.cancelled` and `.failed` (no consumer, no KV watch per request: a chunked
    film has thousands of short requests) sets the flag of each running request of that job
    within milliseconds; the handler stops at its next progress report and the runtime, which
    no longer waits for it, acks the request. Core NATS is at-most-once: an event published
    while the worker reconnects is missed, and the heartbeat's job-state read still catches it.
    Only events that arrive while a request runs count, so the `cancelled` of an earlier attempt
    never stops a retry's request."""

    def __init__(self) -> None:
        self.running: dict[str, set[threading.Event]] = {}
        self._subs: list[Any] = []

    async def attach(self, nc: Any, log: Any) -> None:
        for subject in [s for kind in ENDING_KINDS for s in subjects.job_kind_all_jobs(kind)]:
            try:
                self._subs.append(await nc.subscribe(subject, cb=self._on_event))
            except Exception as e:  # a role without the subscription: the heartbeat's read still stops work
                log.warning("cannot watch job ends; a cancel is noticed at the next heartbeat", error=error_line(e))

    async def _on_event(self, msg: Any) -> None:
        # captionbus.job.[<tenant>.]<job_id>.<kind>
        for flag in self.running.get(subjects.event_job_id(msg.subject), ()):
            flag.set()

    @contextmanager
    def watching(self, job_id: str, flag: threading.Event):
        self.running.setdefault(job_id, set()).add(flag)
        try:
            yield flag
        finally:
            flags = self.running.get(job_id)
            if flags is not None:
                flags.discard(flag)
                if not flags:
                    del self.running[job_id]


class _Abandoned(Cancelled):
    """The job ended while the handler ran; the handler's thread still runs (`future`)."""

    def __init__(self, message: str, future: asyncio.Future):
        super().__init__(message)
        self.future = future


class StageWorker:
    """The consume loop of one stage service process (a replica)."""

    def __init__(
        self,
        definition: StageDefinition,
        settings: Settings,
        js: Any,
        store: Any,
        *,
        info: WorkerInfo,
        policy: StagePolicy,
        resources: Any,
        log: Any,
        retry_delay_s: float = 1.0,
        grace_s: float = 30.0,
        cache_fingerprint: str = "",
        setup_error: str | None = None,
        nc: Any = None,
        loading: bool = False,
        declared_model: str | None = None,
    ):
        self.definition = definition
        self.setup_error = setup_error
        # While `loading` (setup() runs in the background) requests are taken: a cache hit is
        # answered at once when the stage declares its model before loading it
        # (StageDefinition.declare_model); anything else says "loading model" and waits.
        self.status = WorkerStatus(loading=loading, model=info.model)
        if setup_error is not None:
            self.status.set_up(info.model, setup_error)
        self._loaded = asyncio.Event()
        if not loading:
            self._loaded.set()
        self.declared_model = declared_model
        self.nc = nc
        self.cache_fingerprint = cache_fingerprint
        self.settings = settings
        self.js = js
        self.store = store
        self.info = info
        self.policy = policy
        self.resources = resources
        self.log = log
        self.retry = retry_policy(retry_delay_s)
        self.grace_s = grace_s
        self.summary = worker_summary(info)
        self._jobs_kv = None
        self.cache = None
        if definition.cacheable and settings.stage_cache:  # CAPTIONBUS_STAGE_CACHE
            local = None if getattr(store, "use_object_store", True) else settings.home / "stage-cache"
            self.cache = StageCache(js, store, log, local_dir=local)
        self.force = asyncio.Event()  # set: stop waiting for running requests (second Ctrl-C)
        self._running: set[asyncio.Task] = set()
        # A slot is held while a handler runs, not while its outputs upload and the completion
        # is published: the next fetch overlaps that tail, which keeps hops short. How many:
        # info.slots (process_slots: the stage's slots, or its slots option's value).
        self._slots = asyncio.Semaphore(info.slots)
        self.ends = JobEndWatch()
        self.service_id: str | None = None  # its $SRV instance id, once registered
        # Our own pool, not asyncio's default one: asyncio.run() joins the default pool at
        # exit, which would wait for a handler we gave up on at the end of the grace period.
        self._executor = ThreadPoolExecutor(info.slots, thread_name_prefix=f"stage-{definition.name}")

    def set_up(self, resources: Any, setup_error: str | None, model: str | None) -> None:
        """setup() has finished (or failed for good): requests waiting for it go on."""
        self.resources, self.setup_error = resources, setup_error
        self.info.model, self.info.setup_error = model, setup_error
        self.status.set_up(model, setup_error)
        self._loaded.set()

    @property
    def cache_model(self) -> str | None:
        """The model part of the cache key: the stage's declaration when it makes one (known
        before loading), else the loaded model's description (known after setup())."""
        return f"declared:{self.declared_model}" if self.declared_model is not None else self.info.model

    async def _wait_for_model(self, request: StageRequest, log: Any, cancelled: threading.Event) -> None:
        if self._loaded.is_set():
            return
        log.info("waiting for the stage's model to load")
        with suppress(Exception):  # progress is for people; a lost one is no failure
            await self._publish(StageProgress(**event_ids(request), fraction=0.0, message=LOADING_MESSAGE))
        while not self._loaded.is_set():
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._loaded.wait(), 0.5)
            if cancelled.is_set():
                raise Cancelled("job ended while the model loaded")

    async def run(self, sub: Any, stop: asyncio.Event) -> None:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while await self._take_slot(stopping):
                slot = _Slot(self._slots)
                msg = await self._fetch(sub)
                if msg is None:
                    slot.release()
                    continue
                if stop.is_set():  # arrived while we were stopping: let another replica have it now
                    slot.release()
                    await msg.nak()
                    break
                task = asyncio.create_task(self._process(msg, slot))
                self._running.add(task)
                task.add_done_callback(self._done)
        finally:
            stopping.cancel()
            await self._finish_running()
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _take_slot(self, stopping: asyncio.Future) -> bool:
        if stopping.done():
            return False
        take = asyncio.ensure_future(self._slots.acquire())
        await asyncio.wait({take, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done():
            if not take.cancel():  # acquired in the same instant: give it back
                self._slots.release()
            return False
        return True

    def _done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Only bus failures get here (ack/term lost); JetStream redelivers after ack_wait.
            self.log.error("request handling failed", exc_info=task.exception())

    async def _fetch(self, sub: Any) -> Any | None:
        try:
            return (await sub.fetch(1, timeout=FETCH_TIMEOUT_S))[0]
        except (nats.errors.TimeoutError, asyncio.TimeoutError, FetchTimeoutError):
            return None
        except Exception as e:  # reconnecting, server restart: keep going, slowly
            self.log.warning("fetch failed", error=error_line(e))
            await asyncio.sleep(0.5)
            return None

    async def _finish_running(self) -> None:
        if not self._running:
            return
        self.log.info("waiting for running requests", count=len(self._running), grace_s=self.grace_s)
        forced = asyncio.ensure_future(self.force.wait())
        deadline = time.monotonic() + self.grace_s
        while self._running and not forced.done() and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait({*self._running, forced}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        pending = set(self._running)
        for task in pending:
            task.cancel()  # _process naks it, so another replica starts at once
        await asyncio.gather(*pending, return_exceptions=True)

    # -- one message ----------------------------------------------------------------------------
    async def _process(self, msg: Any, slot: "_Slot") -> None:
        try:
            await self._process_one(msg, slot)
        finally:
            slot.release()

    async def _process_one(self, msg: Any, slot: "_Slot") -> None:
        delivery = msg.metadata.num_delivered
        try:
            request = StageRequest.model_validate_json(msg.data)
            if request.stage != self.definition.name:
                raise BadInput(f"request for stage {request.stage!r} reached {self.definition.name!r}")
        except (ValidationError, ValueError, BadInput) as e:
            await self._reject(msg, e, delivery)
            return

        log = self.log.bind(job_id=request.job_id, node=request.node, attempt=request.attempt, delivery=delivery)
        if await self._job_finished(request.job_id, log, request.node, request.attempt):
            await msg.ack()
            return
        if self._loaded.is_set() and self.setup_error is not None:
            await self._unservable(msg, request, delivery, log)
            return
        self.status.started(request)
        try:
            await self._handle(msg, request, delivery, log, slot)
        finally:
            self.status.finished(request)

    async def _handle(self, msg: Any, request: StageRequest, delivery: int, log: Any, slot: "_Slot") -> None:
        log.info("stage request started")
        cancelled = threading.Event()
        heartbeat = asyncio.create_task(self._heartbeat(msg, request, cancelled, log))
        work_dir = None
        try:
            work_dir = self._make_work_dir(request)
            with self.ends.watching(request.job_id, cancelled):
                await self._run(msg, request, work_dir, delivery, log, slot, cancelled)
        except _Abandoned as e:
            log.info("job ended while its stage ran; request dropped, the handler stops at its next check")
            await msg.ack()
            # Its thread still runs: the work dir goes when the handler returns.
            e.future.add_done_callback(functools.partial(_remove_work_dir, work_dir))
            work_dir = None
        except asyncio.CancelledError:
            # Shutdown grace ran out: release the request now instead of after ack_wait.
            log.warning("stage request abandoned at shutdown; released for another replica")
            with suppress(Exception):
                await msg.nak()
            raise
        except Cancelled:
            log.info("job ended while its stage ran; request dropped")
            await msg.ack()
        except _Unservable:
            await self._unservable(msg, request, delivery, log)
        except BadInput as e:
            log.warning("bad input; request terminated", error=error_line(e))
            await self._fail(request, error_line(e), "bad_input")
            await msg.term()
        except ArtifactStoreFull as e:
            # Redelivering would meet the same full store (and recompute the stage each time):
            # the job fails now with the line that says what to free; this service stays up.
            log.error("artifact store full; request failed", error=str(e))
            await self._fail(request, f"{request.stage}: {e}", "store_full")
            await msg.term()
        except Exception as e:
            await self._retry_or_fail(msg, request, e, delivery, log)
        finally:
            heartbeat.cancel()
            if work_dir is not None:
                _remove_work_dir(work_dir)

    def _make_work_dir(self, request: StageRequest) -> Path:
        job_dir = self.settings.work_dir / request.job_id
        for _ in range(5):  # another request of the job may remove job_dir between the two calls
            job_dir.mkdir(parents=True, exist_ok=True)
            with suppress(FileNotFoundError):
                # Unique per delivery: a redelivery on this host never sees a half-written dir.
                return Path(tempfile.mkdtemp(prefix=f"{request.node}-{request.attempt}-", dir=job_dir))
        raise OSError(f"cannot create a work dir under {job_dir}")

    async def _run(self, msg: Any, request: StageRequest, work_dir: Path, delivery: int, log: Any,
                   slot: "_Slot", cancelled: threading.Event) -> None:
        params = self.definition.parse_params(request.params)  # BadInput: the job fails at once
        # a tenant's job reads and writes its tenant's namespace of the object store (its client reads only there)
        store = self.store.scoped(tenant_of(request.job_id))
        ctx = RequestContext(
            request, params=params, work_dir=work_dir, resources=self.resources, log=log, delivery=delivery,
            loop=asyncio.get_running_loop(), fetch=store.get, emit=self._publish_told, cancelled=cancelled,
        )
        key = None
        if self.cache is not None and cache_enabled_for(request):
            if self.declared_model is None:  # the key names the loaded model: wait for it
                await self._wait_for_model(request, log, cancelled)
            key = cache_key(request, cache_version=self.definition.cache_version, info=self.info,
                            fingerprint=self.cache_fingerprint, ignores=self.definition.cache_ignores,
                            inputs=await self._cache_inputs(request, ctx, log), model=self.cache_model)
            hit = await self.cache.lookup(key, store)
            if hit is not None:
                await self._complete_from_cache(msg, request, hit, delivery, log)
                return
        await self._wait_for_model(request, log, cancelled)
        if self.setup_error is not None:
            raise _Unservable()
        ctx.resources = self.resources
        started, started_wall = time.perf_counter(), time.time()
        call = functools.partial(contextvars.copy_context().run, self.definition.handle, request, ctx)
        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        while not future.done():
            await asyncio.wait({future}, timeout=CANCEL_POLL_S)
            if cancelled.is_set() and not future.done():
                # Not waiting for a handler that reports progress rarely: the request is acked
                # now, and the slot stays taken until the thread returns (no overcommit).
                slot.release_when_done(future)
                future.add_done_callback(_quiet)
                raise _Abandoned(f"job {request.job_id} ended while {request.stage} ran", future)
        outputs = future.result()
        if cancelled.is_set():  # ended as the handler returned: no result after the job's end
            raise Cancelled(f"job {request.job_id} ended while {request.stage} ran")
        handled, handled_wall = time.perf_counter(), time.time()
        slot.release()
        checked = _check_outputs(outputs, self.definition)
        refs: dict[str, Any] = {}
        failures = 0
        while True:
            # The work is done: an upload or publish that fails (a 503 during a network cut) is
            # retried here, RESULT_RETRY, instead of nak'ing and computing it all again.
            try:
                for name, path in checked.items():
                    if name not in refs:
                        media_type = mimetypes.guess_type(path.name)[0]
                        refs[name] = await store.put(path, name=path.name, media_type=media_type)
                # started_at / handled_at (Unix seconds): when the handler ran, so a job's record
                # shows whether its chunks ran at the same time on different workers.
                metrics = {**ctx.metrics, "handle_s": handled - started, "started_at": started_wall,
                           "handled_at": handled_wall,
                           "store_s": time.perf_counter() - handled, "delivery": float(delivery),
                           "result_retries": float(failures)}
                await self._publish(
                    StageCompleted(**result_ids(request), outputs=refs, metrics=metrics, worker=self.summary,
                                   items=ctx.items, speaker_turns=ctx.speaker_turns),
                    msg_id=f"{request.key}.completed",
                )
                break
            except Exception as e:
                failures += 1
                if isinstance(e, ArtifactStoreFull) or RESULT_RETRY.exhausted(failures) or self.force.is_set():
                    raise
                delay = RESULT_RETRY.delay(failures)
                log.warning("storing the result failed; retrying (the work is kept)", error=error_line(e),
                            retry=failures, retry_in_s=delay)
                await asyncio.sleep(delay)
        # Ack only after the completion is on the bus: a crash in between means a redelivery
        # and a duplicate completion, which Nats-Msg-Id and the coordinator absorb.
        await msg.ack_sync()
        self.status.done()
        log.info("stage request completed", seconds=round(handled - started, 3), outputs=sorted(refs))
        if key is not None and not ctx.cache_blockers:
            # item counts ride in the cached metrics (ITEMS_PREFIX): a hit must fan out alike
            await self.cache.record(key, refs, {**metrics, **{ITEMS_PREFIX + k: float(v) for k, v in ctx.items.items()}},
                                    ctx.warnings, ctx.speaker_turns)

    async def _cache_inputs(self, request: StageRequest, ctx: Any, log: Any) -> dict[str, str] | None:
        """The stage's digests of what this request reads (it may read its inputs for them), or
        None: the default key. A failure here is the default key, never a failed request."""
        if self.definition.cache_inputs is None:
            return None
        call = functools.partial(contextvars.copy_context().run, self.definition.cache_inputs, request, ctx)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except Exception as error:  # the handler will meet (and report) the same problem
            log.info("stage cache inputs unavailable; using the whole inputs", error=str(error))
            return None

    async def _complete_from_cache(self, msg: Any, request: StageRequest, hit: tuple, delivery: int, log: Any) -> None:
        outputs, cached_metrics, warnings, speaker_turns = hit
        items = {k[len(ITEMS_PREFIX):]: int(v) for k, v in cached_metrics.items() if k.startswith(ITEMS_PREFIX)}
        metrics = {k: v for k, v in cached_metrics.items()
                   if k not in ("delivery", "cache_hit", "started_at", "handled_at") and not k.startswith(ITEMS_PREFIX)}
        metrics.update(cache_hit=1.0, delivery=float(delivery))
        for message in warnings:  # what the first run said still holds for these outputs
            log.warning("stage warning (from the stage cache)", message=message)  # the whole line, on this host
            await self._publish_told(StageWarning(**event_ids(request), message=message))
        await self._publish(
            StageCompleted(**result_ids(request), outputs=outputs, metrics=metrics, items=items,
                           speaker_turns=speaker_turns, worker={**self.summary, "cache": "hit"}),
            msg_id=f"{request.key}.completed",
        )
        await msg.ack_sync()
        self.status.done()
        log.info("stage request completed from the stage cache", outputs=sorted(outputs))

    async def _retry_or_fail(self, msg: Any, request: StageRequest, error: Exception, delivery: int, log: Any) -> None:
        reason = error_line(error)
        self.status.failed(reason)
        if not isinstance(error, Retryable):
            log.error("stage handler raised", exc_info=error)
        if delivery >= self.policy.max_deliver:
            log.error("stage request failed on every delivery; terminated", deliveries=delivery, error=reason)
            await self._fail(request, f"{request.stage} failed on all {delivery} attempts: {reason}", "exhausted")
            await msg.term()
            return
        delay = self.retry.delay(delivery)
        log.warning("stage request will be retried", error=reason, retry_in_s=delay)
        await msg.nak(delay=delay)

    async def _unservable(self, msg: Any, request: StageRequest, delivery: int, log: Any) -> None:
        """This replica's setup failed. A healthy replica elsewhere gets the request (nak with a
        short delay) while deliveries last; with none, the node fails now with setup's reason,
        not retryable: the job ends with the line that says what to fix."""
        reason = f"{self.definition.name} cannot be served on host {self.info.host}: {self.setup_error}"
        if delivery < self.policy.max_deliver - 1 and await self._healthy_replicas() > 0:
            log.warning("stage unservable here; leaving the request to a healthy replica", error=self.setup_error)
            await msg.nak(delay=UNSERVABLE_NAK_S)
            # Holding the slot, fetch nothing until the redelivery has gone to someone else.
            await asyncio.sleep(UNSERVABLE_NAK_S * 1.5)
            return
        log.error("stage unservable; request failed", error=reason)
        await self._fail(request, reason, "setup_failed")
        await msg.term()

    async def _healthy_replicas(self, timeout: float = 0.5) -> int:
        """Replicas of this stage whose $SRV STATS state is not setup_failed (this one excluded;
        one still loading counts: it will most likely serve), read as every reader of workers
        reads them (core.discovery)."""
        if self.nc is None:
            return 0
        try:
            replicas = await stage_workers(self.nc, self.definition.name, timeout)
        except Exception as e:
            self.log.debug("replica discovery failed", error=error_line(e))
            return 0
        return sum(1 for w in replicas if w.get("id") != self.service_id and serving(w))

    async def _reject(self, msg: Any, error: Exception, delivery: int) -> None:
        """A request we cannot read never gets better: fail it if we can tell whose it is, term it."""
        reason = error_line(error)
        self.log.error("unreadable stage request; terminated", error=reason, subject=msg.subject,
                       size=len(msg.data), delivery=delivery)
        ids = _salvage_ids(msg.data)
        if ids is not None:
            with suppress(Exception):
                await self._publish(StageFailed(**ids, reason=self._for_the_job(ids["job_id"], reason),
                                                error_type="bad_request", worker=self.summary))
        await msg.term()

    async def _fail(self, request: StageRequest, reason: str, error_type: str) -> None:
        if error_type != "exhausted":  # _retry_or_fail counted it
            self.status.failed(reason)  # $SRV STATS: the operators' (tenants are granted no $SRV)
        await self._publish(
            StageFailed(**result_ids(request), reason=self._for_the_job(request.job_id, reason), error_type=error_type,
                        retryable=False, worker=self.summary),
            msg_id=f"{request.key}.failed",
        )

    def _for_the_job(self, job_id: str, reason: str) -> str:
        """A failure reason as the job's record and events carry it. A bus tenant's job (its id
        names the tenant) is read by that tenant: this host's filesystem paths are cut to their
        last part (core.text.without_paths), with where to find them; every caller has logged
        the whole line. A job of no tenant keeps it: it is the operator's own (a local `run`,
        whose one error line names the model folder to fix, the trusted CLI), or a gateway's,
        which cuts the paths from what it shows its API keys (gateway.shown)."""
        if tenant_of(job_id) == NO_TENANT:
            return reason
        shown, cut = without_paths(reason)
        if not cut:
            return reason
        return one_line(f"{shown} (paths in the {self.definition.name} worker's log on host {self.info.host})")

    async def _publish(self, event: Any, msg_id: str | None = None) -> None:
        await publish_event(self.js, event, msg_id)

    async def _publish_told(self, event: Any) -> None:
        """A handler's warnings and progress, cut as failures are (_for_the_job): a tenant reads
        its job's events. A warning's whole line is in this worker's log (ctx.warn, the cache
        replay); a progress message is not logged, so its paths are only cut."""
        if isinstance(event, StageWarning):
            event = event.model_copy(update={"message": self._for_the_job(event.job_id, event.message)})
        elif isinstance(event, StageProgress) and tenant_of(event.job_id) != NO_TENANT:
            event = event.model_copy(update={"message": without_paths(event.message)[0]})
        await self._publish(event)

    async def _heartbeat(self, msg: Any, request: StageRequest, cancelled: threading.Event, log: Any) -> None:
        # Each in_progress() restarts the ack_wait clock: a slow handler is not a dead one.
        # The same beat reads the job's state: the backstop of JobEndWatch (a job-end event
        # missed while reconnecting still stops the work within ack_wait/3).
        interval = max(self.policy.ack_wait / 3, 0.1)
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception as e:
                log.warning("heartbeat failed", error=error_line(e))
            if not cancelled.is_set() and await self._job_finished(request.job_id, log, request.node, request.attempt):
                cancelled.set()

    async def _job_finished(self, job_id: str, log: Any, node: str | None = None, attempt: int = 0) -> bool:
        """One KV read per request and per heartbeat; a missing or unreadable state means run it.

        A finished state whose `node` is at an attempt below the request's predates the request:
        the coordinator publishes a retry's requests at the same time as it writes the job back
        to running, so a worker reading before that write landed saw `cancelled` and dropped the
        retried request, and the retried job hung until its node's deadline. Such a request runs."""
        try:
            if self._jobs_kv is None:
                self._jobs_kv = await self.js.key_value(subjects.JOBS_BUCKET)
            entry = await self._jobs_kv.get(subjects.job_key(job_id))
            state = json.loads(entry.value)
            status = state.get("status")
            known = (state.get("nodes") or {}).get(node) if node else None
            known_attempt = int(known.get("attempt", 0)) if isinstance(known, dict) else None
        except KeyNotFoundError:
            return False
        except Exception as e:
            log.debug("job state unreadable; running the request", error=error_line(e))
            return False
        if status in _FINISHED:
            if known_attempt is not None and known_attempt < attempt:
                log.info("job state predates this attempt (a retry); running it", job_status=status,
                         state_attempt=known_attempt)
                return False
            log.info("job already finished; request dropped", job_status=status)
            return True
        return False


class _Slot:
    """One unit of the worker's concurrency, released exactly once."""

    def __init__(self, semaphore: asyncio.Semaphore):
        self._semaphore: asyncio.Semaphore | None = semaphore

    def release(self) -> None:
        if self._semaphore is not None:
            self._semaphore.release()
            self._semaphore = None

    def release_when_done(self, future: asyncio.Future) -> None:
        semaphore, self._semaphore = self._semaphore, None
        if semaphore is not None:
            future.add_done_callback(lambda _f: semaphore.release())


def _quiet(future: asyncio.Future) -> None:
    """Retrieve an abandoned handler's outcome (its Cancelled, or its result), which nobody reads."""
    if not future.cancelled():
        future.exception()


def _remove_work_dir(work_dir: Path, _future: Any = None) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
    with suppress(OSError):
        work_dir.parent.rmdir()  # only if no other request of this job uses it


def _salvage_ids(data: bytes) -> dict[str, Any] | None:
    """The event ids of a request that failed validation, when its envelope is intact."""
    try:
        body = json.loads(data)
        ids = {k: body[k] for k in EVENT_ID_FIELDS}
        if isinstance(body.get("token"), str):
            ids["token"] = body["token"]
        StageFailed(**ids, reason="-")  # validates the ids
        return ids
    except Exception:
        return None


def _check_outputs(outputs: Any, definition: StageDefinition) -> dict[str, Path]:
    if outputs is None:
        return {}
    if not isinstance(outputs, dict):
        raise TypeError(f"handler returned {type(outputs).__name__}, expected dict of output name -> file")
    undeclared = sorted(str(name) for name in outputs if definition.outputs and name not in definition.outputs)
    if undeclared:
        raise TypeError(f"handler returned output(s) {', '.join(undeclared)} that stage {definition.name} does not "
                        f"declare (its outputs: {', '.join(definition.outputs)})")
    checked = {}
    for name, path in outputs.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"handler output {name!r} is not a file: {path}")
        checked[str(name)] = path
    return checked


def declared_model(definition: StageDefinition, ctx: SetupContext, log: Any) -> str | None:
    """The stage's model identity before loading it (StageDefinition.declare_model), or None:
    cache lookups then wait for setup(). A declaration that fails is no declaration."""
    if definition.declare_model is None:
        return None
    try:
        return definition.declare_model(ctx)
    except Exception as e:
        log.info("stage model not declared before loading; cache lookups wait for setup", error=error_line(e))
        return None


def stage_sources(definition: StageDefinition) -> list[Path]:
    """The .py files of the package that holds the stage's handler (captionbus/services/<stage>/)."""
    module = sys.modules.get(getattr(definition.handle, "__module__", "") or "")
    file = getattr(module, "__file__", None)
    if not file or Path(file).resolve().parent.parent != PROJECT_ROOT.resolve() / "captionbus" / "services":
        return []
    return sorted(Path(file).resolve().parent.glob("*.py"))


def process_slots(definition: StageDefinition, options: Any) -> int:
    """Requests this process works on at once: the stage's `slots`, or the value of its
    `slots_option` (asr: `workers`, decoders sharing one model load, which `run`/`serve asr
    --replicas N` set on a CPU host: captionbus.stack.replica_processes)."""
    if definition.slots_option is None:
        return max(1, definition.slots)
    return max(1, int(getattr(options, definition.slots_option)))


def _make_store(settings: Settings, js: Any) -> Any:
    return ArtifactStore(settings, js)


async def serve(
    definition: StageDefinition,
    settings: Settings,
    nats_url: str,
    *,
    env_name: str = "unknown",
    policy: StagePolicy | None = None,
    stop: asyncio.Event | None = None,
    options: dict[str, Any] | None = None,
    replica_id: str | None = None,
    grace_s: float = 30.0,
    retry_delay_s: float = 1.0,
    store: Any = None,
    ready: asyncio.Event | None = None,
    setup_retry: RetryPolicy | None = None,
) -> None:
    """Run one replica of a stage service until `stop` is set (or SIGTERM/SIGINT when stop is None).

    setup() runs once, before the first request (retried per `setup_retry`, default
    CAPTIONBUS_SETUP_ATTEMPTS); requests then run `process_slots` at a time. A replica whose
    setup never succeeded stays up and fails the requests no healthy replica takes, with setup's
    reason, so every job ends with a line that says what to fix.
    The service consumes from the start: while setup() runs, requests wait for it (their
    progress says "loading model") unless the stage cache answers them first.
    `ready` is set once setup() has finished (tests and launchers wait on it).
    """
    policy = policy or StagePolicy.from_env()
    log = structlog.get_logger("captionbus.stage").bind(stage=definition.name, env=env_name)
    log.info("stage service starting", interpreter=sys.executable, replica_id=replica_id,
             ack_wait=policy.ack_wait, max_deliver=policy.max_deliver)

    signals = stop is None
    stop = stop or asyncio.Event()
    # The worker's one identity (contracts.worker_identity): host, stage, replica, process.
    replica = replica_id or "0"
    identity = worker_identity(settings.host_id, definition.name, replica, os.getpid())

    nc = await connect(nats_url, f"stage {identity}", settings)
    service = None
    try:
        js = nc.jetstream()
        # Before setup, so a worker started ahead of the coordinator fails in a second, not after
        # loading its model. Workers never create streams: that is the coordinator's / `up`'s job.
        await through_failover(lambda: require_provisioned(js), "check streams")

        setup_ctx = None
        declared = None
        loaded_options = None
        if definition.setup is not None or definition.slots_option is not None:
            loaded_options = load_options(definition.options, options or {}, os.environ)
        slots = process_slots(definition, loaded_options)
        log.info("stage service slots", slots=slots)
        if definition.setup is not None:
            setup_ctx = SetupContext(stage=definition.name, env=env_name, models_dir=settings.models_dir,
                                     log=log, options=loaded_options)
            declared = await asyncio.to_thread(declared_model, definition, setup_ctx, log)

        # The worker registers and consumes before its model loads: it is discoverable as
        # `loading` ($SRV STATS), a request's progress says "loading model", and a cache hit is
        # answered at once when the stage declares its model (StageDefinition.declare_model).
        info = await asyncio.to_thread(
            worker_info, definition.name, env_name, replica=replica, host=settings.host_id,
            packages=definition.report_packages, launcher=settings.launcher,
            model=describe(definition, None) if definition.setup is None else None, slots=slots,
        )
        log = log.bind(worker_id=info.worker_id)
        consumer = await through_failover(lambda: ensure_stage_consumer_info(js, definition.name, policy),
                                          "stage consumer")
        durable = consumer.name
        # The consumer decides redelivery, whoever created it: heartbeat at its ack_wait and
        # count exhaustion by its max_deliver, not by this process's own settings.
        policy = effective_policy(consumer)
        sub = await through_failover(lambda: js.pull_subscribe_bind(durable, stream=subjects.REQUESTS_STREAM),
                                     "bind consumer")
        # Before setup() imports anything: what the key covers is what is known before loading
        # (the stage's own package sources are added, so a module setup() imports later counts).
        fingerprint = await asyncio.to_thread(worker_fingerprint, dict(options or {}), config_dirs(), PROJECT_ROOT,
                                              stage_sources(definition))
        worker = StageWorker(
            definition, settings, js, store if store is not None else _make_store(settings, js),
            info=info, policy=policy, resources=None, log=log,
            retry_delay_s=retry_delay_s, grace_s=grace_s, cache_fingerprint=fingerprint,
            nc=nc, loading=definition.setup is not None, declared_model=declared,
        )
        service = await _register(nc, worker)
        await worker.ends.attach(nc, log)
        # Replicas of a stage on this host load a few at a time (half the cores, at least one), and
        # one that waits for a load slot takes no request until it has loaded (captionbus/services/runtime/setup_turn.py).
        turn = SetupTurn(settings.home, definition.name) if setup_ctx is not None else None
        running = asyncio.create_task(worker.run(sub, stop)) if turn is None or turn.try_take() else None
        try:
            if setup_ctx is not None and running is None:
                log.info("every load slot of this host is taken by other replicas of this stage; loading "
                         "after one, taking requests once loaded")
                await turn.take(stop)
            if setup_ctx is not None and not stop.is_set():
                setup_task = asyncio.create_task(_set_up(definition, setup_ctx, setup_retry or setup_policy(
                    settings.setup_attempts), stop, log))
                await asyncio.wait({setup_task} | ({running} if running else set()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if not setup_task.done():  # the worker stopped (or failed) while the model loaded
                    await cancel_and_wait([setup_task])
                else:
                    resources, setup_error = setup_task.result()
                    worker.set_up(resources, setup_error, None if setup_error else describe(definition, resources))
        finally:
            if turn is not None:
                turn.release()
        if running is None:
            running = asyncio.create_task(worker.run(sub, stop))
        if signals:
            _stop_on_signals(stop, worker.force, log)
        log.info("stage service ready", consumer=durable, service=subjects.micro_service_name(definition.name),
                 ack_wait=policy.ack_wait, max_deliver=policy.max_deliver)
        if ready is not None:
            ready.set()
        await running
        log.info("stage service stopping")
        # Before drain: drain would wait forever on the pull inbox's unconsumed status messages.
        with suppress(Exception):
            await sub.unsubscribe()
    finally:
        if service is not None:
            with suppress(Exception):
                await service.stop()
        with suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5)
        if not nc.is_closed:
            with suppress(Exception):
                await nc.close()
    log.info("stage service stopped")


def info_subject(stage: str) -> str:
    """Request/reply endpoint answering with this stage's WorkerInfo JSON (one replica answers).

    Under $SRV, which deploy/nats/roles.conf lets workers serve and readers ask."""
    return f"$SRV.WORKER.{subjects.micro_service_name(stage)}"


async def _register(nc: Any, worker: StageWorker) -> Any:
    """The $SRV micro service: fixed facts in its metadata (WorkerInfo, flat), what changes
    (contracts.WorkerState: state, current requests, the model once loaded) in its STATS data."""
    info = worker.info
    service = await nats.micro.add_service(
        nc, name=subjects.micro_service_name(info.stage), version=core.__version__,
        description=f"captionbus stage service: {info.stage}", metadata=flat_metadata(info),
        stats_handler=lambda _endpoint: worker.status.snapshot().model_dump(mode="json"),
    )

    async def on_info(request: Any) -> None:
        await request.respond(worker.info.model_dump_json().encode())

    worker.service_id = service.id  # its own $SRV replies, told apart from any other replica's
    await service.add_endpoint(name="info", subject=info_subject(info.stage), handler=on_info)
    await nc.flush()  # "ready" must mean the server routes $SRV requests to us
    return service


def _stop_on_signals(stop: asyncio.Event, force: asyncio.Event, log: Any) -> None:
    """First SIGTERM/SIGINT: stop fetching, finish running requests. Second: release them now."""
    loop = asyncio.get_running_loop()

    def _on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second signal; releasing running requests", signal=name)
            force.set()
            return
        log.info("signal received; finishing running requests", signal=name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread / Windows
            loop.add_signal_handler(signum, _on_signal, signum)
