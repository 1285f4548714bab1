"""Webhook delivery whose state lives in the bus, so any gateway reports it and a restarted one resumes it.

Each (job, subscriber) pair is one record in the KV bucket `cb_webhooks` (key `<job_id>.<subscriber>`;
the subscriber is `callback` for the job's own `callback_url`, else the name of a gateway-wide
subscriber from the gateway config file). The record holds the target URL, the event filter, a
cursor (the stream sequence of the last event settled: delivered, failed for good, or filtered
out), the outcome of every delivery (status, attempts, HTTP status, error), and a lease: the
gateway delivering it (`owner`) and until when (`lease_until`).

One writer at a time: every write is `kv.update(..., last=revision)`, so a gateway whose lease
was taken over fails its next write and stops. The owner renews the lease every `lease_s / 3`;
a gateway that dies leaves it to expire, and every gateway's sweep (every `lease_s / 2`) takes
over expired, unfinished records and resumes after the cursor. A gateway that stops cleanly
hands its leases back (lease_until = 0), so a restart resumes at once.

At-least-once: the cursor is written after the receiver answered 2xx, so a gateway that dies in
between makes its successor POST that event again. Each POST carries `X-Captionbus-Delivery:
<job_id>.<subscriber>.<sequence>`, the same on every attempt and after any takeover: receivers
dedupe on it. Events of one job reach one subscriber in stream order, one at a time.

Gateway-wide subscribers get every job's events (filtered by kind): every gateway follows the
`submitted` events (from `catchup_s` before it started, so jobs submitted while no gateway ran
are not missed) and creates the job's records with `kv.create`, which only one gateway wins.
The URL is checked against the allow-list again before each delivery: every gateway (the
`gateway` user, deploy/nats/roles.conf HTTP_GATEWAY) may write this bucket, and a record naming
another URL is not delivered.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, get_args

import httpx
import structlog
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from captionbus.gateway.webhooks import Delivery, check_target, deliver
from captionbus.contracts import JobSpec, subjects
from captionbus.contracts.events import TERMINAL_KINDS
from captionbus.contracts.ids import validate_token
from captionbus.core.bus import live_keys
from captionbus.core.tasks import cancel_and_wait
from captionbus.core.tenancy import named

log = structlog.get_logger("captionbus.gateway.webhooks")

CALLBACK = "callback"  # the subscriber name of a job's own callback_url
STOP_WAIT_S = 10.0  # stop(): how long the delivery tasks may take to end before leases go back
KEPT_DELIVERIES = 500  # per record; older ones are summed in `dropped` (a long film has many progress events)


class Subscriber(BaseModel):
    """A gateway-wide webhook subscriber (gateway config file, `[[subscribers]]`)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="names the subscriber in delivery records and X-Captionbus-Delivery")
    url: str = Field(description="POST target; must be under a --webhook-allow prefix")
    events: list[str] | None = Field(None, description="event kinds to send (default: every event)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        validate_token(value, "subscriber name")
        if value == CALLBACK:
            raise ValueError(f"{CALLBACK!r} is the name of jobs' own callback URLs; pick another")
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        known = set(event_kinds())
        unknown = [kind for kind in value if kind not in known]
        if unknown:
            raise ValueError(f"unknown event kinds {unknown}; use some of {', '.join(sorted(known))}")
        return value


def event_kinds() -> list[str]:
    from captionbus.contracts.events import JobEvent

    return [cls.model_fields["kind"].default for cls in get_args(get_args(JobEvent)[0])]


class Record(BaseModel):
    """The KV value of one (job, subscriber)."""

    job_id: str
    subscriber: str
    url: str
    events: list[str] | None = None
    cursor: int = 0
    done: bool = False
    owner: str | None = None  # the gateway delivering it (its lease)
    job_owner: str | None = None  # the API key's name the job belongs to (JobSpec.owner); None: no key
    lease_until: float = 0.0
    deliveries: list[dict[str, Any]] = Field(default_factory=list)
    dropped: int = 0

    def view(self) -> dict:
        return {"subscriber": self.subscriber, "url": self.url, "events": self.events, "cursor": self.cursor,
                "done": self.done, "deliveries": self.deliveries, "older_deliveries_not_kept": self.dropped}


def event_body(event, job_owner: str | None) -> bytes:
    """What a subscriber is POSTed: the event's JSON, plus `owner`, the name of the API key whose
    job it is (never the key itself), where the job has one. In the body, so the signature covers
    it: every key may point its callback_url at any allowed URL, another key's receiver too, and
    that receiver tells its own key's jobs from the rest by `owner` (a job submitted without a key,
    from the CLI or a keyless gateway, has none). Events have no field of that name; a receiver
    that parses the event with the contracts' models ignores it."""
    payload = event.model_dump(mode="json")
    if job_owner is not None:
        payload["owner"] = job_owner
    return json.dumps(payload, separators=(",", ":")).encode()


def record_key(job_id: str, subscriber: str) -> str:
    return f"{validate_token(job_id, 'job id')}.{validate_token(subscriber, 'subscriber name')}"


class GatewayFile(BaseModel):
    """The gateway config file (`captionbus gateway --config FILE`, TOML):

        webhook_allow = ["https://hooks.example/"]     # added to --webhook-allow
        webhook_lease_s = 30                            # a dead gateway's deliveries resume after this
        webhook_catchup_s = 3600                        # subscribers get jobs submitted this long before start

        [key_webhook_allow]                             # a key's own prefixes, for its callback_url only
        alice = ["https://alice.example/hooks"]        # (with webhook_allow; no other key may use them)

        [[subscribers]]
        name = "audit"
        url = "https://hooks.example/captionbus"
        events = ["submitted", "completed", "failed", "cancelled"]   # omit: every event
    """

    model_config = ConfigDict(extra="forbid")
    webhook_allow: list[str] = Field(default_factory=list)
    webhook_lease_s: float = Field(30.0, ge=1.0, le=3600.0)
    webhook_catchup_s: float = Field(3600.0, ge=0.0)
    key_webhook_allow: dict[str, list[str]] = Field(default_factory=dict)
    subscribers: list[Subscriber] = Field(default_factory=list)

    @field_validator("key_webhook_allow")
    @classmethod
    def _key_names(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name in value:
            validate_token(name, "key name")
        return value

    @field_validator("subscribers")
    @classmethod
    def _unique(cls, value: list[Subscriber]) -> list[Subscriber]:
        names = [s.name for s in value]
        if len(set(names)) != len(names):
            raise ValueError(f"subscriber names must be unique: {names}")
        return value


@dataclass
class DispatchConfig:
    secret: bytes
    allow: list[str]
    subscribers: list[Subscriber]
    lease_s: float = 30.0
    catchup_s: float = 3600.0
    key_allow: dict[str, list[str]] = field(default_factory=dict)

    def allow_for(self, job_owner: str | None) -> list[str]:
        """The prefixes a job's callback_url may start with: everyone's (`allow`) and its key's own
        (`key_allow`, the config file's key_webhook_allow). One secret signs every key's events, so
        a prefix on one key's list alone is a receiver no other key can aim its job's events at."""
        return [*self.allow, *self.key_allow.get(job_owner or "", [])]


class LostLease(Exception):
    """Another gateway took the record over (our lease expired): stop delivering it."""


class Lease:
    """A record this gateway owns: writes go through `save`, checked against the revision."""

    def __init__(self, kv, key: str, record: Record, revision: int, lease_s: float):
        self.kv, self.key, self.record, self.revision, self.lease_s = kv, key, record, revision, lease_s
        self._lock = asyncio.Lock()

    async def save(self, *, release: bool = False) -> None:
        async with self._lock:
            self.record.lease_until = 0.0 if release else time.time() + self.lease_s
            try:
                self.revision = await self.kv.update(self.key, self.record.model_dump_json().encode(),
                                                     last=self.revision)
            except KeyWrongLastSequenceError:
                raise LostLease(self.key) from None


class Dispatcher:
    """Runs the deliveries this gateway owns; sweeps for ones nobody owns."""

    def __init__(self, config: DispatchConfig, http: httpx.AsyncClient, job_events, observe=None, prove=None):
        self.observe = observe  # called with each settled Delivery (the gateway's /metrics)
        # JobSpec -> its owner if proven, else None (Gateway.proven_owner): a subscriber's
        # deliveries name only a proven owner; without `prove`, none.
        self.prove = prove or (lambda spec: None)
        self.config = config
        self.http = http
        self.job_events = job_events  # ends.job_events(js, job_id, after): until the job's real end
        self.me = f"gw-{uuid.uuid4().hex[:12]}"
        self.running: dict[str, asyncio.Task] = {}
        self.leases: dict[str, Lease] = {}
        self.started = time.time()
        self._background: list[asyncio.Task] = []
        self._js = None

    async def kv(self, js):
        try:
            return await js.key_value(subjects.WEBHOOKS_BUCKET)
        except NotFoundError:
            raise RuntimeError(f"KV bucket {subjects.WEBHOOKS_BUCKET} missing: start a coordinator of this "
                               "version once (it creates the bus's buckets)") from None

    async def start(self, js) -> None:
        """Background work on `js`: the sweep, and following submitted jobs for subscribers."""
        if self._js is js:
            return
        for task in self._background:  # those of a previous connection
            task.cancel()
        self._background.clear()
        self._js = js
        try:
            await self.kv(js)
        except RuntimeError as e:  # the rest of the API works; webhook requests answer 503 with this
            log.error("webhooks off", reason=str(e))
            return
        self._background.append(asyncio.create_task(self._sweep_forever(js)))
        self._background.append(asyncio.create_task(self._follow_retries(js)))
        if self.config.subscribers:
            self._background.append(asyncio.create_task(self._follow_submitted(js)))

    async def stop(self) -> None:
        """Hand leases back so another (or the restarted) gateway resumes at once."""
        leases = list(self.leases.values())  # the tasks' done callbacks forget them
        # cancel_and_wait: a cancellation nats-py's wait_for loses is sent again (core.tasks)
        await cancel_and_wait([*self._background, *self.running.values()], within_s=STOP_WAIT_S)
        for lease in leases:
            with contextlib.suppress(Exception):
                lease.record.owner = None
                await asyncio.wait_for(lease.save(release=True), 2)

    async def add(self, js, job_id: str, subscriber: str, url: str, events: list[str] | None = None,
                  job_owner: str | None = None) -> bool:
        """Create the (job, subscriber) record owned by this gateway and start delivering; False
        when it exists (another gateway made it). `job_owner`: the API key's name the job belongs
        to, which every delivery names (webhooks.OWNER_HEADER and the body's `owner`)."""
        kv = await self.kv(js)
        key = record_key(job_id, subscriber)
        record = Record(job_id=job_id, subscriber=subscriber, url=url, events=events, owner=self.me,
                        job_owner=job_owner, lease_until=time.time() + self.config.lease_s)
        try:
            revision = await kv.create(key, record.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        self._run(js, Lease(kv, key, record, revision, self.config.lease_s))
        return True

    def _run(self, js, lease: Lease) -> None:
        self.leases[lease.key] = lease
        task = asyncio.create_task(self._deliver_all(js, lease))
        self.running[lease.key] = task

        def done(task, key=lease.key):
            if self.running.get(key) is task:  # not a successor (a record reopened by a retry)
                self.running.pop(key, None)
                self.leases.pop(key, None)

        task.add_done_callback(done)

    async def _deliver_all(self, js, lease: Lease) -> None:
        record = lease.record
        renew = asyncio.create_task(self._renew(lease))
        try:
            # Until the job's real end, not its first terminal event: a cancelled job that is
            # retried goes on to retry_requested, started ... completed (issue 19).
            async for seq, event in self.job_events(js, record.job_id, record.cursor):
                if record.events is None or event.kind in record.events:
                    await self._deliver_one(lease, seq, event)
                record.cursor = seq
                if record.events is None or event.kind in record.events or event.kind in TERMINAL_KINDS:
                    await lease.save()
            record.done, record.owner = True, None
            await lease.save(release=True)
        except LostLease:
            log.info("webhook record taken over by another gateway", key=lease.key)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001  a background task: say why it stopped; the sweep retries
            log.error("webhooks stopped", key=lease.key, error=f"{type(e).__name__}: {e}")
        finally:
            renew.cancel()

    async def _deliver_one(self, lease: Lease, seq: int, event) -> None:
        record = lease.record
        delivery_id = f"{record.job_id}.{record.subscriber}.{seq}"
        delivery = Delivery(event_id=event.event_id, kind=event.kind, sequence=seq)
        try:
            check_target(record.url, self.config.allow_for(record.job_owner if record.subscriber == CALLBACK else None))
        except ValueError as e:
            delivery.status, delivery.error = "failed", str(e)
        else:
            async def on_attempt(d: Delivery) -> None:  # "attempts: 3, pending" is visible to every gateway
                self._store(record, d, delivery_id, final=False)
                await lease.save()

            await deliver(self.http, record.url, self.config.secret, record.job_id, seq,
                          event_body(event, record.job_owner), delivery, delivery_id=delivery_id,
                          on_failed_attempt=on_attempt, job_owner=record.job_owner)
        self._store(record, delivery, delivery_id, final=True)
        if self.observe is not None:
            self.observe(delivery)
        log.info("webhook", job_id=record.job_id, subscriber=record.subscriber, kind=event.kind,
                 status=delivery.status, attempts=delivery.attempts)

    @staticmethod
    def _store(record: Record, delivery: Delivery, delivery_id: str, final: bool) -> None:
        entry = {"delivery_id": delivery_id, **vars(delivery)}
        if record.deliveries and record.deliveries[-1]["delivery_id"] == delivery_id:
            record.deliveries[-1] = entry
        else:
            record.deliveries.append(entry)
        if len(record.deliveries) > KEPT_DELIVERIES:
            record.dropped += len(record.deliveries) - KEPT_DELIVERIES
            del record.deliveries[:-KEPT_DELIVERIES]

    async def _renew(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(self.config.lease_s / 3)
            try:
                await lease.save()
            except LostLease:
                task = self.running.get(lease.key)
                if task is not None:
                    task.cancel()
                return
            except Exception as e:  # noqa: BLE001  the bus is away: the next renewal tries again
                log.warning("webhook lease not renewed", key=lease.key, error=str(e))

    async def sweep(self, js) -> int:
        """Take over unfinished records whose lease expired; how many were taken."""
        kv = await self.kv(js)
        keys = await live_keys(js, subjects.WEBHOOKS_BUCKET)  # kv.keys() can answer none under load
        taken = 0
        for key in keys:
            if key in self.running:
                continue
            try:
                entry = await kv.get(key)
                record = Record.model_validate_json(entry.value)
            except Exception as e:  # noqa: BLE001  deleted meanwhile, or a value that is not a record
                log.warning("webhook record unreadable; skipped", key=key, error=f"{type(e).__name__}: {e}")
                continue
            if record.done or record.lease_until > time.time():
                continue
            record.owner = self.me
            lease = Lease(kv, key, record, entry.revision, self.config.lease_s)
            try:
                await lease.save()
            except LostLease:
                continue  # another gateway took it first
            log.info("webhook deliveries resumed", key=key, after_sequence=record.cursor)
            self._run(js, lease)
            taken += 1
        return taken

    async def _sweep_forever(self, js) -> None:
        while True:
            try:
                await self.sweep(js)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001  the bus is away: sweep again later
                log.warning("webhook sweep failed", error=f"{type(e).__name__}: {e}")
            await asyncio.sleep(self.config.lease_s / 2)

    async def _follow_submitted(self, js) -> None:
        """Every job submitted since `catchup_s` before this gateway started: records for the subscribers."""
        since = datetime.fromtimestamp(self.started - self.config.catchup_s, UTC)
        start = since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        kinds = subjects.job_kind_all_jobs("submitted")
        sub = await js.subscribe(kinds[0], ordered_consumer=True,  # named: deploy/nats/roles.conf
                                 config=named(ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                                             opt_start_time=start, filter_subjects=kinds)))
        try:
            async for msg in sub.messages:
                try:
                    submitted = json.loads(msg.data)
                    job_id = validate_token(submitted["job_id"], "job id")
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                # Every job's events go to the subscribers; only a proven owner is named (a
                # spec that does not parse, or names an owner it cannot prove, names none).
                try:
                    job_owner = self.prove(JobSpec.model_validate(submitted["spec"]))
                except (ValueError, KeyError, TypeError):
                    job_owner = None
                for subscriber in self.config.subscribers:
                    try:
                        await self.add(js, job_id, subscriber.name, subscriber.url, subscriber.events, job_owner)
                    except Exception as e:  # noqa: BLE001  one job's record; the others go on
                        log.warning("webhook record not created", job_id=job_id, subscriber=subscriber.name,
                                    error=f"{type(e).__name__}: {e}")
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _follow_retries(self, js) -> None:
        """Reopen a finished job's records when it is retried (from `catchup_s` before this
        gateway started, like `_follow_submitted`): a record is done at the job's end, and a
        retry gives the job a new end. Every gateway follows; `kv.update` lets one reopen it."""
        since = datetime.fromtimestamp(self.started - self.config.catchup_s, UTC)
        kinds = subjects.job_kind_all_jobs("retry_requested")
        sub = await js.subscribe(kinds[0], ordered_consumer=True,  # named: deploy/nats/roles.conf
                                 config=named(ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                                             opt_start_time=since.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                                                             filter_subjects=kinds)))
        reopening: set[asyncio.Task] = set()
        try:
            async for msg in sub.messages:
                try:
                    job_id = validate_token(json.loads(msg.data)["job_id"], "job id")
                except (ValueError, KeyError, TypeError):
                    continue
                task = asyncio.create_task(self.reopen(js, job_id, msg.metadata.sequence.stream))
                reopening.add(task)
                task.add_done_callback(reopening.discard)
        finally:
            for task in reopening:
                task.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def reopen(self, js, job_id: str, sequence: int, poll_s: float = 1.0) -> int:
        """Deliver again each of the job's records whose cursor is before `sequence` (its
        retry_requested); how many this gateway reopened. A record still being delivered either
        reads on past `sequence` (the job had not ended yet) or is marked done just before it:
        it is watched until one of the two, so a retry racing the end is not lost."""
        reopened = 0
        waiting = {r.subscriber for r in await self.records(js, job_id) if r.cursor < sequence}
        kv = await self.kv(js)
        while waiting:
            for subscriber in sorted(waiting):
                key = record_key(job_id, subscriber)
                try:
                    entry = await kv.get(key)
                    record = Record.model_validate_json(entry.value)
                except Exception as e:  # noqa: BLE001  deleted meanwhile, or not a record
                    log.warning("webhook record unreadable; not reopened", key=key, error=f"{type(e).__name__}: {e}")
                    waiting.discard(subscriber)
                    continue
                if record.cursor >= sequence:
                    waiting.discard(subscriber)
                elif record.done:
                    record.done, record.owner = False, self.me
                    lease = Lease(kv, key, record, entry.revision, self.config.lease_s)
                    try:
                        await lease.save()
                    except LostLease:
                        continue  # another gateway reopened it (or its owner wrote): look again
                    log.info("webhook deliveries reopened by a retry", key=key, after_sequence=record.cursor)
                    self._run(js, lease)
                    reopened += 1
                    waiting.discard(subscriber)
            if waiting:
                await asyncio.sleep(poll_s)
        return reopened

    async def records(self, js, job_id: str) -> list[Record]:
        """The job's records, read from the bus (a watch on `<job_id>.*`: nats-py 2.16's
        `kv.keys(filters=...)` answers NoKeysError for a filter that matches)."""
        kv = await self.kv(js)
        watcher = await kv.watch(f"{validate_token(job_id, 'job id')}.*", ignore_deletes=True)
        found = []
        try:
            while (entry := await watcher.updates(timeout=5)) is not None:
                try:
                    found.append(Record.model_validate_json(entry.value))
                except ValueError as e:
                    log.warning("webhook record unreadable; skipped", key=entry.key, error=str(e))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return sorted(found, key=lambda r: r.subscriber)
