"""`captionbus auth-callout`: per-connection identity for a secured fleet (NATS auth callout).

Why. With static NATS users (deploy/nats/accounts.conf) the server knows a connection only by
its user: every process that logs in as `worker` gets the same permissions, so the same reply
prefix `_INBOX_worker`. Replies carry what a process must keep to itself — above all the stage
requests a worker pulls, with the token a result must echo — and ten GPU boxes sharing the
`worker` credential could each subscribe to `_INBOX_worker.>` and read their peers' deliveries:
one compromised box could then answer, with a forged result, a request delivered to another.

What. nats-server (2.10+) can hand each new connection to a trusted service instead of its user
table (`authorization { auth_callout { ... } }`): the server sends a signed authorization request
on `$SYS.REQ.USER.AUTH` with the client's CONNECT options, and accepts the connection with the
permissions of the user JWT this service signs back. A captionbus process in this mode
(`CAPTIONBUS_NATS_AUTH_CALLOUT=1`, captionbus.core.bus.callout_login) makes a random key for each
connection and sends it with its role's user and password as its token. This service checks the
password against the same users and bcrypt hashes as `accounts.conf` (and so the same
`roles.conf` blocks), and grants that role's permissions with one change: the reply prefix the
role may subscribe to is `_INBOX_<user>_<id>`, where id is a hash of the connection's key. So:

- a connection's replies (a pulled request and its token included) reach that connection only:
  a peer with the same user and password has another key, so another prefix, and the server
  refuses its subscription to anyone else's (`Permissions Violation`);
- the prefix is the same on every reconnect (nats-py resends the same token), so a reconnect
  keeps its reply subscriptions;
- knowing a prefix (reply subjects are visible to whoever answers a request) gives nothing: the
  prefix is a hash, and only the key's holder can log in as it.

A request token then reaches only the connection JetStream delivered the request to, and the
coordinator's token check (captionbus/coordinator: a result applies only with its request's
token) becomes "only from the worker the request was delivered to".
tests/security/test_delivery_binding.py runs two connections with one worker credential, one of
them delivered the request, the other sniffing all it may and forging a result.

The server never calls out for the users in `auth_users` (this service's own login). Where it
runs, and what happens when it does not: deploy/README.md ("Per-connection identity").
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from captionbus.contracts import subjects
from captionbus.contracts.ids import is_tenant
from captionbus.core.bus import CALLOUT_KEY_MIN, callout_inbox_prefix

log = structlog.get_logger("captionbus.authcallout")

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
QUEUE = "captionbus-auth-callout"
# nats-server's default for `allow_responses: true` (one reply, within two minutes)
RESPONSE_TTL_NS = 120 * 10**9
JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
GRANTED_KEPT = 1000


# --- the subset of the NATS configuration format that accounts.conf / roles.conf use ----------------

_TOKEN = re.compile(r'''\s+|\#[^\n]*|//[^\n]*|"((?:[^"\\]|\\.)*)"|'([^']*)'|([{}\[\],:=])|([^\s{}\[\],:="'#]+)''')


class ConfError(ValueError):
    pass


def _tokens(text: str, source: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ConfError(f"{source}: cannot read {text[pos:pos + 20]!r}")
        pos = m.end()
        if m.group(1) is not None or m.group(2) is not None:
            out.append(("str", m.group(1) if m.group(1) is not None else m.group(2)))
        elif m.group(3):
            out.append(("punct", m.group(3)))
        elif m.group(4):
            out.append(("word", m.group(4)))
    return out


class _Parser:
    """NATS server configuration as accounts.conf and roles.conf write it: `key: value`,
    `key = value`, `key { ... }`, lists, quoted and bare strings, `$VARIABLE` references to
    top-level keys, `include <file>`. Not a general parser: what it cannot read is an error."""

    def __init__(self, path: Path, variables: dict | None = None):
        self.path = path
        self.tokens = _tokens(path.read_text(), str(path))
        self.pos = 0
        self.variables = variables if variables is not None else {}

    def _peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def _take(self):
        token = self._peek()
        if token[0] is None:
            raise ConfError(f"{self.path}: unexpected end")
        self.pos += 1
        return token

    def body(self, top: bool, end: str | None) -> dict:
        out: dict = {}
        while True:
            kind, text = self._peek()
            if kind is None and end is None:
                return out
            if (kind, text) == ("punct", end):
                self.pos += 1
                return out
            if (kind, text) == ("punct", ","):
                self.pos += 1
                continue
            kind, key = self._take()
            if kind not in ("word", "str"):
                raise ConfError(f"{self.path}: expected a key, got {key!r}")
            if kind == "word" and key == "include":
                _, name = self._take()
                included = _Parser(self.path.parent / name, self.variables if top else {})
                out.update(included.body(top, None))
                continue
            if self._peek() in (("punct", ":"), ("punct", "=")):
                self.pos += 1
            out[key] = self.value()
            if top:
                self.variables[key] = out[key]

    def value(self):
        kind, text = self._take()
        if (kind, text) == ("punct", "{"):
            return self.body(False, "}")
        if (kind, text) == ("punct", "["):
            items = []
            while self._peek() != ("punct", "]"):
                if self._peek() == ("punct", ","):
                    self.pos += 1
                    continue
                items.append(self.value())
            self.pos += 1
            return items
        if kind == "word" and text.startswith("$"):
            if text[1:] not in self.variables:
                raise ConfError(f"{self.path}: {text} is not defined (include the file that defines it first)")
            return self.variables[text[1:]]
        if kind == "word" and text in ("true", "false"):
            return text == "true"
        if kind == "punct":
            raise ConfError(f"{self.path}: unexpected {text!r}")
        return text


def read_conf(path: Path) -> dict:
    return _Parser(Path(path)).body(True, None)


# The role block whose users act for a tenant of their own (their user name): roles.conf's CLIENT.
TENANT_ROLE = "CLIENT"


@dataclass(frozen=True)
class Account:
    user: str
    password: str  # a bcrypt hash (`nats server passwd`) or, in tests, the password itself
    permissions: dict
    tenant: str | None = None  # a user of the CLIENT block: the tenant it acts for (its name)


def read_users(path: Path) -> dict[str, Account]:
    """The users of an accounts.conf-style file: `authorization { users: [{user, password,
    permissions: $ROLE}] }`, with the permission blocks it includes (roles.conf). A user of the
    CLIENT block is a tenant of its own name (tenant_permissions)."""
    conf = read_conf(path)
    tenant_block = conf.get(TENANT_ROLE)
    users = (conf.get("authorization") or {}).get("users")
    if not isinstance(users, list) or not users:
        raise ConfError(f"{path}: no `authorization {{ users: [...] }}`")
    out = {}
    for entry in users:
        if not isinstance(entry, dict) or not {"user", "password"} <= entry.keys():
            raise ConfError(f"{path}: a user entry without user and password: {entry!r}")
        tenant = None
        if tenant_block is not None and entry.get("permissions") is tenant_block:
            if not is_tenant(entry["user"]):
                raise ConfError(f"{path}: user {entry['user']!r} of ${TENANT_ROLE} names its tenant: "
                                "use 1-32 characters from a-z 0-9 - (not starting with -)")
            tenant = entry["user"]
        out[entry["user"]] = Account(entry["user"], entry["password"], entry.get("permissions") or {}, tenant)
    return out


# --- permissions: a role block as a user JWT's, with this connection's reply prefix ------------------

def _allow_deny(value) -> dict:
    if isinstance(value, list):  # `publish: [..]` is the allow list
        return {"allow": list(value)}
    return {k: list(v) for k, v in (value or {}).items() if k in ("allow", "deny")}


def connection_permissions(block: dict, prefix: str) -> dict:
    """The JWT `pub` / `sub` / `resp` of a role block (roles.conf), with every reply prefix the
    block lets it subscribe to (`_INBOX_<user>.>`) replaced by this connection's own."""
    pub = _allow_deny(block.get("publish"))
    sub = _allow_deny(block.get("subscribe"))
    for subject in sub.get("allow", []) + pub.get("allow", []):
        if subject == ">" or subject.startswith(("_INBOX.", "_INBOX_*", "_INBOX_>")):
            raise ConfError(f"a role may not be granted {subject!r}: it reads every connection's replies")
    sub["allow"] = [f"{prefix}.>" if s.startswith("_INBOX") else s for s in sub.get("allow", [])]
    if f"{prefix}.>" not in sub["allow"]:
        sub["allow"].append(f"{prefix}.>")
    out = {"pub": pub, "sub": sub}
    responses = block.get("allow_responses")
    if responses:
        limits = responses if isinstance(responses, dict) else {}
        out["resp"] = {"max": int(limits.get("max", 1)), "ttl": RESPONSE_TTL_NS}
    return out


def tenant_permissions(tenant: str, prefix: str) -> dict:
    """What a client login of `tenant` may do on the bus: its own jobs, nothing of another tenant's
    (deploy/README.md, "Tenancy on the bus"). Every grant that reaches job data names the tenant
    as a whole token before any wildcard, because a wildcard in a published subject is matched
    like any token (a publish on `…DIRECT.GET.S.x.>` passes an allow of `…DIRECT.GET.S.x.*` and
    is served: measured on nats-server 2.15.1). So:

    - events: publish only its jobs' submitted/cancel_requested/retry_requested; follow through
      consumers created on `$JS.API.CONSUMER.CREATE.CB_EVENTS.<name>.captionbus.job.<tenant>.>`
      (the unfiltered create, filter in the body, is not granted; the coordinator's durable name
      is denied, so its filter cannot be rewritten by a create-or-update);
    - job state: direct gets whose subject names the key (`…DIRECT.GET.KV_cb_jobs.$KV.cb_jobs.
      <tenant>.>`) and consumers filtered to `$KV.cb_jobs.<tenant>.>`; no STREAM.MSG.GET (a key or
      sequence in the body), no STREAM.INFO of KV_cb_jobs or CB_EVENTS (`subjects_filter` lists
      every key and job subject);
    - artifacts: its namespace of the object store (`$O.cb_artifacts.M|C.<tenant>.…`), read through
      consumers filtered inside it; no STREAM.INFO (lists every object) or STREAM.MSG.GET (reads
      any message by sequence) of OBJ_cb_artifacts;
    - stream existence by STREAM.NAMES (captionbus.core.bus.require_provisioned(names_only=True)).
    """
    job, kv, ev = f"{subjects.PREFIX}.job.{tenant}", f"$KV.{subjects.JOBS_BUCKET}.{tenant}", subjects.EVENTS_STREAM
    kv_stream = f"KV_{subjects.JOBS_BUCKET}"
    obj, obj_stream = f"$O.{subjects.ARTIFACTS_BUCKET}", f"OBJ_{subjects.ARTIFACTS_BUCKET}"
    allow = [
        f"{job}.*.submitted", f"{job}.*.cancel_requested", f"{job}.*.retry_requested",
        f"$JS.API.STREAM.INFO.{subjects.REQUESTS_STREAM}", "$JS.API.STREAM.NAMES",
        f"$JS.API.CONSUMER.CREATE.{ev}.*.{job}.>", f"$JS.API.CONSUMER.INFO.{ev}.*", f"$JS.FC.{ev}.>",
        f"$JS.API.DIRECT.GET.{kv_stream}.{kv}.>",
        f"$JS.API.CONSUMER.CREATE.{kv_stream}.*.{kv}.>", f"$JS.API.CONSUMER.INFO.{kv_stream}.*",
        f"$JS.FC.{kv_stream}.>",
        # artifacts: its namespace of the object store (captionbus/core/artifacts/transfer.py), written
        # (its inputs) and read through consumers on the filtered-create subject only
        f"{obj}.C.{tenant}.>", f"{obj}.M.{tenant}.>",
        f"$JS.API.CONSUMER.CREATE.{obj_stream}.*.{obj}.C.{tenant}.>",
        f"$JS.API.CONSUMER.CREATE.{obj_stream}.*.{obj}.M.{tenant}.>",
        f"$JS.API.CONSUMER.INFO.{obj_stream}.*", f"$JS.API.CONSUMER.DELETE.{obj_stream}.*", f"$JS.FC.{obj_stream}.>",
        "$SRV.>",
    ]
    deny = [f"$JS.API.CONSUMER.CREATE.{ev}.{subjects.COORDINATOR_CONSUMER}.>"]
    return {"pub": {"allow": allow, "deny": deny}, "sub": {"allow": [f"{prefix}.>"]}}


# --- JWTs (the header, payload and ed25519 signature nats-server's jwt package reads) ----------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(claims: dict, signer) -> str:
    claims = {**claims, "jti": "", "iat": int(time.time()), "iss": signer.public_key.decode()}
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode().rstrip("=")
    signing_input = f"{_b64(json.dumps(JWT_HEADER).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(signer.sign(signing_input.encode()))}"


def decode_server_jwt(token: str) -> dict:
    """An authorization request's claims, once its signature checks against the server key it
    names (`iss`, an nkey starting with N)."""
    import nacl.signing
    import nkeys

    head, payload, signature = token.split(".")
    claims = json.loads(_unb64(payload))
    issuer = claims.get("iss", "")
    raw = base64.b32decode(issuer + "=" * (-len(issuer) % 8))
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if nkeys.crc16(bytearray(body)) != crc or body[0] != nkeys.PREFIX_BYTE_SERVER:
        raise ValueError(f"the request's issuer {issuer!r} is not a server key")
    nacl.signing.VerifyKey(bytes(body[1:])).verify(f"{head}.{payload}".encode(), _unb64(signature))
    return claims


def new_account_seed() -> str:
    """A fresh account nkey seed (the callout's signing key; its public key is the server's
    `auth_callout.issuer`)."""
    import os

    import nkeys

    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()


def public_key(seed: str) -> str:
    import nkeys

    return nkeys.from_seed(bytearray(seed.strip().encode())).public_key.decode()


# --- the service ----------------------------------------------------------------------------------------

class Refused(Exception):
    """Why a connection is not let in; the server logs it and the client sees `Authorization Violation`."""


@dataclass
class Callout:
    """Answers the server's authorization requests for the users of `users` (read_users)."""

    users: dict[str, Account]
    seed: str
    account: str = "$G"  # the account the fleet's users are in (accounts.conf defines none: the global one)
    # what it let in (user, prefix, client), newest last: the last GRANTED_KEPT only, since the service
    # lives as long as the fleet and every connection and reconnect adds one
    granted: deque[dict] = field(default_factory=lambda: deque(maxlen=GRANTED_KEPT))
    _verified: set = field(default_factory=set)

    def __post_init__(self):
        import nkeys

        self._signer = nkeys.from_seed(bytearray(self.seed.strip().encode()))

    def _password_ok(self, account: Account, password: str) -> bool:
        # bcrypt at cost 11 is ~0.1-0.2 s of CPU: a reconnect storm of a whole fleet would queue on it,
        # so a password once checked is remembered by its hash for the life of this process.
        remembered = (account.user, hashlib.sha256(password.encode()).hexdigest(), account.password)
        if remembered in self._verified:
            return True
        if account.password.startswith("$2"):
            import bcrypt

            ok = bcrypt.checkpw(password.encode(), account.password.encode())
        else:
            ok = hmac.compare_digest(password.encode(), account.password.encode())
        if ok:
            self._verified.add(remembered)
        return ok

    def authorize(self, request: dict) -> tuple[str, dict]:
        """(user, the user JWT's `nats` claims) for an authorization request, or Refused."""
        nats = request.get("nats") or {}
        opts = nats.get("connect_opts") or {}
        try:
            login = json.loads(opts.get("auth_token") or "")
            user, password, key = login["user"], login["pass"], login["key"]
        except (ValueError, TypeError, KeyError):
            raise Refused("no captionbus login: connect with CAPTIONBUS_NATS_AUTH_CALLOUT=1 (user, password "
                          "and a per-connection key as the token)") from None
        account = self.users.get(user) if isinstance(user, str) else None
        if account is None or not isinstance(password, str) or not self._password_ok(account, password):
            raise Refused(f"user {user!r}: unknown user or wrong password")
        if not isinstance(key, str) or len(key) < CALLOUT_KEY_MIN:
            raise Refused(f"user {user!r}: the connection key is missing or shorter than {CALLOUT_KEY_MIN} characters")
        prefix = callout_inbox_prefix(user, key)
        granted = (tenant_permissions(account.tenant, prefix) if account.tenant
                   else connection_permissions(account.permissions, prefix))
        claims = {**granted,
                  "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}
        client = nats.get("client_info") or {}
        self.granted.append({"user": user, "prefix": prefix, "tenant": account.tenant, "host": client.get("host"),
                             "name": client.get("name")})
        return user, claims

    def respond(self, token: str) -> str:
        """The signed authorization response to the server's request JWT `token`."""
        request = decode_server_jwt(token)
        nats = request.get("nats") or {}
        user_nkey, server_id = nats.get("user_nkey"), (nats.get("server_id") or {}).get("id")
        response: dict = {"sub": user_nkey, "aud": server_id,
                          "nats": {"type": "authorization_response", "version": 2}}
        client = nats.get("client_info") or {}
        try:
            user, claims = self.authorize(request)
        except Refused as refusal:
            log.warning("connection refused", reason=str(refusal), host=client.get("host"), client=client.get("name"))
            response["nats"]["error"] = str(refusal)
        else:
            user_jwt = encode_jwt({"sub": user_nkey, "name": user, "aud": self.account, "nats": claims}, self._signer)
            response["nats"]["jwt"] = user_jwt
            log.info("connection let in", user=user, inbox=self.granted[-1]["prefix"], host=client.get("host"),
                     client=client.get("name"))
        return encode_jwt(response, self._signer)

    async def serve(self, nc, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Answer `$SYS.REQ.USER.AUTH` on `nc` (the callout's own login, one of the server's
        `auth_users`) until `stop`. A queue group: one answer per request, however many run."""

        async def handle(msg):
            try:
                answer = self.respond(msg.data.decode())
            except Exception as error:  # noqa: BLE001 - a malformed request is logged; the server times it out
                log.error("cannot answer an authorization request", error=f"{type(error).__name__}: {error}")
                return
            await msg.respond(answer.encode())

        sub = await nc.subscribe(AUTH_SUBJECT, queue=QUEUE, cb=handle)
        await nc.flush()
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            await sub.unsubscribe()
