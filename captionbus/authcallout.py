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
runs, and what happens when it does not: deploy/README.md ("Per-connection identity"). How it
reads accounts.conf (a strict subset of the NATS format, and why): read_conf.
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
from captionbus.core.bus import CALLOUT_KEY_MIN, USER_INFO, callout_inbox_prefix

log = structlog.get_logger("captionbus.authcallout")

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
QUEUE = "captionbus-auth-callout"
# nats-server's default for `allow_responses: true` (one reply, within two minutes)
RESPONSE_TTL_NS = 120 * 10**9
JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
GRANTED_KEPT = 1000


# --- accounts.conf / roles.conf: a documented subset of the NATS configuration format ----------------

class ConfError(ValueError):
    pass


# One token: a space run, a comment, a quoted string (no backslash, no line break), a punctuation mark,
# or a bare word. Whatever matches none of them (`;`, a backslash, `(`) is refused where it stands.
_TOKEN = re.compile(r'''(?P<space>\s+)|(?P<comment>(?:\#|//)[^\n]*)|"(?P<dq>[^"\\\n]*)"|'(?P<sq>[^'\\\n]*)'|'''
                    r'''(?P<punct>[{}\[\],:=])|(?P<word>[^\s{}\[\],:="'#;()\\]+)''')
_REFUSED = {";": "`;` (a terminator: write entries on lines or between commas)",
            "\\": "a backslash (escapes are not read here: quote the text without one)",
            "(": "a block string `( ... )`", ")": "a block string `( ... )`",
            '"': "a quoted string with a backslash or a line break in it",
            "'": "a quoted string with a backslash or a line break in it"}
_SUBSET = "captionbus/authcallout.py reads a subset of the NATS format: see read_conf"
_BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off")


@dataclass(frozen=True)
class _Token:
    kind: str  # "str" (quoted), "word" (bare), "punct"
    text: str
    line: int


def _tokens(text: str, source: str) -> list[_Token]:
    out: list[_Token] = []
    pos, spaced = 0, True
    while pos < len(text):
        line = text.count("\n", 0, pos) + 1
        m = _TOKEN.match(text, pos)
        if not m:
            what = _REFUSED.get(text[pos], repr(text[pos:pos + 20]))
            raise ConfError(f"{source}:{line}: cannot read {what} ({_SUBSET})")
        kind = m.lastgroup
        if kind == "comment" and not spaced and out and out[-1].kind == "word":
            raise ConfError(f"{source}:{line}: a comment right after {out[-1].text!r}: put a space before it "
                            f"or quote the value ({_SUBSET})")
        if kind in ("dq", "sq"):
            out.append(_Token("str", m.group(kind), line))
        elif kind in ("punct", "word"):
            out.append(_Token(kind, m.group(kind), line))
        spaced = kind in ("space", "comment") or kind == "punct"
        pos = m.end()
    return out


class _Parser:
    def __init__(self, path: Path, variables: dict, seen: set[Path]):
        self.path = path
        try:
            self.tokens = _tokens(path.read_text(), str(path))
        except UnicodeDecodeError as error:
            raise ConfError(f"{path}: not UTF-8 text ({error})") from None
        self.pos = 0
        self.variables = variables
        self.seen = seen

    def fail(self, message: str):
        at = self.tokens[min(self.pos, len(self.tokens) - 1)].line if self.tokens else 1
        raise ConfError(f"{self.path}:{at}: {message} ({_SUBSET})")

    def _peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _at(self, *punct: str) -> bool:
        token = self._peek()
        return token is not None and token.kind == "punct" and token.text in punct

    def _take(self) -> _Token:
        token = self._peek()
        if token is None:
            self.fail("the file ends inside a value")
        self.pos += 1
        return token

    def body(self, top: bool, end: str | None) -> dict:
        out: dict = {}
        while True:
            if self._peek() is None:
                if end is None:
                    return out
                self.fail(f"a block is not closed with {end!r}")
            if end is not None and self._at(end):
                self.pos += 1
                return out
            if self._at(","):
                self.pos += 1
                continue
            key = self._take()
            if key.kind not in ("word", "str"):
                self.fail(f"expected a key, got {key.text!r}")
            if key.kind == "word" and key.text == "include":
                self._include(top, out)
                continue
            if self._at(":", "="):
                self.pos += 1
            elif not self._at("{"):
                self.fail(f"expected ':' or '=' after {key.text!r}")
            value = self.value()
            if key.text in out:
                self.fail(f"{key.text!r} is set twice in one block")
            out[key.text] = value
            if top:
                self.variables[key.text] = value

    def _include(self, top: bool, out: dict) -> None:
        if not top:
            self.fail("`include` only at the top level of a file")
        name = self._take()
        if name.kind not in ("word", "str"):
            self.fail("`include` takes a file name")
        target = (self.path.parent / name.text).resolve()
        if target in self.seen:
            self.fail(f"{name.text} is included twice (or includes itself)")
        self.seen.add(target)
        for key, value in _Parser(target, self.variables, self.seen).body(True, None).items():
            if key in out:
                self.fail(f"{key!r} (from {name.text}) is set twice")
            out[key] = value

    def value(self):
        token = self._take()
        if token.kind == "str":
            return token.text
        if token.kind == "punct":
            if token.text == "{":
                return self.body(False, "}")
            if token.text == "[":
                items = []
                while not self._at("]"):
                    if self._peek() is None:
                        self.fail("a list is not closed with ']'")
                    if self._at(","):
                        self.pos += 1
                        continue
                    items.append(self.value())
                self.pos += 1
                return items
            self.fail(f"unexpected {token.text!r}")
        word = token.text
        if word.startswith("$"):
            if word[1:] not in self.variables:
                self.fail(f"{word} is not a top-level key defined above it (the server would also look in "
                          "enclosing blocks and the environment; here only top-level keys are read)")
            return self.variables[word[1:]]
        if word in ("true", "false"):
            return word == "true"
        if word.lower() in _BOOLEAN_WORDS:
            self.fail(f"{word!r}: write true or false (the server reads {word!r} as a boolean)")
        if word[0].isdigit() or (len(word) > 1 and word[0] in "+-." and word[1].isdigit()):
            if word.isdigit():
                return int(word)
            self.fail(f"{word!r}: only whole numbers are read here (the server reads units and fractions)")
        if "//" in word:
            self.fail(f"{word!r}: quote a value with // in it (the server may read a comment there)")
        return word


def read_conf(path: Path) -> dict:
    """A NATS configuration file as accounts.conf and roles.conf write it, read as nats-server
    reads it, or ConfError naming the file and line of whatever this parser does not read.

    Why a parser of our own. The callout must grant what the servers would grant in static mode
    from the same accounts.conf (one source of truth for both modes: deploy/README.md), so it reads
    that file, and nothing on PyPI reads the NATS format (checked December 2026: the NATS packages
    are clients and wrappers). The nearest format, HOCON, is not it: pyhocon 0.3.63 refuses
    accounts.conf at `include ./roles.conf` and `$COORDINATOR` (HOCON writes `include "..."` and
    `${...}`), reads `off` as the string "off" and `a: b; c: d` as a = "b; c: d". nats-server
    itself checks a file (`nats-server -t -c FILE`; check_with_server) but does not print what it
    read.

    Why a strict subset. A reading that differs from the server's would grant other permissions
    than static mode. So this reads only:

        key: value    key = value    key { ... }     (keys bare or quoted; each once per block)
        value: { ... }  [ ... ]  "text"  'text'  bare-word  true  false  123  $TOP_LEVEL_KEY
        commas between entries optional; # and // comments; `include FILE` at the top level

    and refuses, with the line, each form nats-server 2.15.1 accepts (`-t`) where a reading could
    differ: `;` terminators (a bare `b;` would have been the value), backslash escapes ("b\\"c" is
    b"c to the server), booleans other than true/false (the server reads `off`/`no` as false: read
    as a string, `allow_responses: off` would have granted responses), numbers with units or
    fractions (`1K`), `$VAR` from an enclosing block or the environment (the server resolves both),
    `key value` with neither ':' nor '=' for anything but a block, block strings `( ... )`,
    `include` inside a block, a key set twice. read_users then checks the users' fields."""
    path = Path(path)
    return _Parser(path, {}, {path.resolve()}).body(True, None)


# The role block whose users act for a tenant of their own (their user name): roles.conf's CLIENT.
TENANT_ROLE = "CLIENT"


def _granted(block: dict) -> tuple:
    """What a permissions block grants, in a form two blocks compare equal in when they grant the
    same: subjects as sets, a lone subject as a list of one, the reply prefixes left out (the
    callout replaces them with each connection's own), allow_responses as `{max}`.

    Why by content. read_users decides which users are tenants by their block. It did by identity
    (`permissions: $CLIENT`, the parser's one object): a user given an inline copy of the CLIENT
    block was not a tenant, so the callout granted it the block as written, the static client's
    rights, which read every tenant's jobs. A block that grants what CLIENT grants is CLIENT's,
    however it is written (tests/unit/test_tenant_layout.py, tests/security/test_tenancy.py)."""
    def subjects_of(rule) -> tuple:
        rule = _allow_deny(rule)
        return tuple(frozenset(s for s in rule.get(kind, []) if not s.startswith("_INBOX"))
                     for kind in ("allow", "deny"))

    responses = block.get("allow_responses", False)
    if responses:
        responses = int(responses.get("max", 1)) if isinstance(responses, dict) else 1
    return subjects_of(block.get("publish")), subjects_of(block.get("subscribe")), responses or 0


@dataclass(frozen=True)
class Account:
    user: str
    password: str  # a bcrypt hash (`nats server passwd`) or, in tests, the password itself
    permissions: dict
    tenant: str | None = None  # a user of the CLIENT block: the tenant it acts for (its name)


_USER_KEYS = ("user", "password", "permissions")
_PERMISSION_KEYS = ("publish", "subscribe", "allow_responses")


def _check_permissions(block, where: str) -> None:
    """A permissions block the callout applies whole: publish / subscribe (a subject, a list, or
    {allow, deny}) and allow_responses (true, false or {max: N}); any other key is refused, since
    the server would apply it and the callout would not."""
    if not isinstance(block, dict):
        raise ConfError(f"{where}: a block {{publish, subscribe, allow_responses}}, got {block!r}")
    if unknown := sorted(set(block) - set(_PERMISSION_KEYS)):
        raise ConfError(f"{where}: {', '.join(unknown)} is not applied by the callout (it applies "
                        f"{', '.join(_PERMISSION_KEYS)})")
    for name in ("publish", "subscribe"):
        rule = block.get(name)
        if rule is None:
            continue
        if isinstance(rule, dict) and (unknown := sorted(set(rule) - {"allow", "deny"})):
            raise ConfError(f"{where}.{name}: {', '.join(unknown)} is not applied by the callout (allow, deny)")
        for kind, listed in (rule.items() if isinstance(rule, dict) else [("allow", rule)]):
            listed = [listed] if isinstance(listed, str) else listed
            if not isinstance(listed, list) or not all(isinstance(s, str) and s for s in listed):
                raise ConfError(f"{where}.{name}.{kind}: a subject or a list of subjects, got {listed!r}")
    responses = block.get("allow_responses", False)
    if isinstance(responses, dict):
        limit = responses.get("max", 1)
        if set(responses) - {"max"} or isinstance(limit, bool) or not isinstance(limit, int):
            raise ConfError(f"{where}.allow_responses: true, false or {{max: N}} (the callout's responses last "
                            f"{RESPONSE_TTL_NS // 10**9} s, the server's default; it does not apply expires)")
    elif not isinstance(responses, bool):
        raise ConfError(f"{where}.allow_responses: true, false or {{max: N}}, got {responses!r}")


def read_users(path: Path) -> dict[str, Account]:
    """The users of an accounts.conf-style file: `authorization { users: [{user, password,
    permissions: $ROLE}] }`, with the permission blocks it includes (roles.conf); read_conf says
    which forms are read. A user whose block grants what the CLIENT block grants (`$CLIENT`, or a
    copy of it written inline: _granted) is a tenant of its own name (tenant_permissions). Every
    user needs a permissions block (a user without one may do anything), and a field the callout
    would not apply (nkey, account, allowed_connection_types, expires ...) is refused rather than
    ignored."""
    conf = read_conf(path)
    tenant_block = conf.get(TENANT_ROLE)
    if "accounts" in conf:
        raise ConfError(f"{path}: the callout grants users of `authorization {{ users: [...] }}`, "
                        "not of `accounts` blocks")
    auth = conf.get("authorization")
    users = auth.get("users") if isinstance(auth, dict) else None
    if not isinstance(users, list) or not users:
        raise ConfError(f"{path}: no `authorization {{ users: [...] }}`")
    if unknown := sorted(set(auth) - {"users", "timeout"}):
        raise ConfError(f"{path}: authorization.{unknown[0]} is not applied by the callout (it reads users)")
    out: dict[str, Account] = {}
    for n, entry in enumerate(users, 1):
        where = f"{path}: authorization.users[{n}]"
        if not isinstance(entry, dict):
            raise ConfError(f"{where}: a block {{user, password, permissions}}, got {entry!r}")
        if unknown := sorted(set(entry) - set(_USER_KEYS)):
            raise ConfError(f"{where}: {', '.join(unknown)} is not applied by the callout (it reads "
                            f"{', '.join(_USER_KEYS)})")
        user, password = entry.get("user"), entry.get("password")
        if not (isinstance(user, str) and user and isinstance(password, str) and password):
            raise ConfError(f"{where}: a user and a password, each a non-empty string")
        if user in out:
            raise ConfError(f"{where}: user {user!r} a second time")
        if "permissions" not in entry:
            raise ConfError(f"{where} ({user}): no permissions block: the user could do anything")
        _check_permissions(entry["permissions"], f"{where} ({user}).permissions")
        tenant = None
        if tenant_block is not None and _granted(entry["permissions"]) == _granted(tenant_block):
            if not is_tenant(user):
                raise ConfError(f"{where}: user {user!r} of ${TENANT_ROLE} names its tenant: "
                                "use 1-32 characters from a-z 0-9 - (not starting with -)")
            tenant = user
        out[user] = Account(user, password, entry["permissions"], tenant)
    return out


def check_with_server(path: Path, binary: str | None = None) -> None:
    """Have nats-server read `path` as the servers would (`nats-server -t -c`), ConfError with its
    words when it refuses the file: the callout then never grants from a file the servers could
    not load (in static mode the same file is theirs). nats-server is on every host that runs the
    callout: it runs on the NATS nodes (deploy/README.md). nats-server refuses a top-level key
    nothing references ("unknown field"), so an accounts file must use every roles.conf block it
    includes, as deploy/nats/accounts.conf does."""
    import subprocess

    from captionbus.core.bus import BusError
    from captionbus.server import nats_server_binary

    try:
        done = subprocess.run([binary or nats_server_binary(), "-t", "-c", str(path)], capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired, BusError) as error:
        raise ConfError(f"cannot have nats-server check {path}: {error}") from None
    said = " ".join((done.stdout + done.stderr).split())
    if done.returncode != 0:
        raise ConfError(f"nats-server refuses {path}: {said or f'exit {done.returncode}'}")


# --- permissions: a role block as a user JWT's, with this connection's reply prefix ------------------

def _allow_deny(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):  # `publish: "x"` / `publish: [..]` is the allow list
        value = {"allow": value}
    return {k: [v] if isinstance(v, str) else list(v) for k, v in value.items() if k in ("allow", "deny")}


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
    # what the server granted this connection, which the client reads to know whether it acts for a
    # tenant (captionbus.core.bus.client_tenant): the server answers with the asker's own permissions
    # only. (A block without an allow list allows every subject it does not deny: left as it is.)
    if "allow" in pub and USER_INFO not in pub["allow"]:
        pub["allow"].append(USER_INFO)
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
      (the unfiltered create, filter in the body, is not granted; the coordinators' durable names,
      `coordinator-p<N>` of each partition and `coordinator` of those before job ownership, are
      denied, so their filters cannot be rewritten by a create-or-update);
    - job state: direct gets whose subject names the key (`…DIRECT.GET.KV_cb_jobs.$KV.cb_jobs.
      <tenant>.>`) and consumers filtered to `$KV.cb_jobs.<tenant>.>`; no STREAM.MSG.GET (a key or
      sequence in the body), no STREAM.INFO of KV_cb_jobs or CB_EVENTS (`subjects_filter` lists
      every key and job subject);
    - artifacts: its namespace of the object store (`$O.cb_artifacts.M|C.<tenant>.…`), read through
      consumers filtered inside it; no STREAM.INFO (lists every object) or STREAM.MSG.GET (reads
      any message by sequence) of OBJ_cb_artifacts;
    - stream existence by STREAM.NAMES (captionbus.core.bus.require_provisioned(names_only=True));
    - its own permissions (`$SYS.REQ.USER.INFO`), from which its client knows it acts for this
      tenant (captionbus.core.bus.client_tenant).

    And nothing else, in particular:

    - no `$SRV` (worker discovery): a worker's STATS carry the ids of the jobs it runs and its last
      error, whatever tenant they are of; `captionbus workers` as a tenant says it cannot list them;
    - no CONSUMER.INFO or CONSUMER.DELETE: a consumer's name is one token, so no grant can hold
      them to the tenant's own consumers, and `….INFO.CB_EVENTS.*` answered for the coordinator's
      durable too (its filter, pending counts). A tenant's reads count what a consumer holds from
      the create's own answer (captionbus.core.tenancy.held), and its chunk readers are left to
      their inactivity threshold instead of deleted.
    """
    job, kv, ev = f"{subjects.PREFIX}.job.{tenant}", f"$KV.{subjects.JOBS_BUCKET}.{tenant}", subjects.EVENTS_STREAM
    kv_stream = f"KV_{subjects.JOBS_BUCKET}"
    obj, obj_stream = f"$O.{subjects.ARTIFACTS_BUCKET}", f"OBJ_{subjects.ARTIFACTS_BUCKET}"
    allow = [
        # its jobs' events (`captionbus.job.<tenant>.<partition>.<job>.<kind>`), and in the layout before
        # job ownership (an older client's)
        f"{job}.*.*.submitted", f"{job}.*.*.cancel_requested", f"{job}.*.*.retry_requested",
        f"{job}.*.submitted", f"{job}.*.cancel_requested", f"{job}.*.retry_requested",
        f"$JS.API.STREAM.INFO.{subjects.REQUESTS_STREAM}", "$JS.API.STREAM.NAMES",
        f"$JS.API.CONSUMER.CREATE.{ev}.*.{job}.>", f"$JS.FC.{ev}.>",
        f"$JS.API.DIRECT.GET.{kv_stream}.{kv}.>",
        f"$JS.API.CONSUMER.CREATE.{kv_stream}.*.{kv}.>", f"$JS.FC.{kv_stream}.>",
        # artifacts: its namespace of the object store (captionbus/core/artifacts/transfer.py), written
        # (its inputs) and read through consumers on the filtered-create subject only
        f"{obj}.C.{tenant}.>", f"{obj}.M.{tenant}.>",
        f"$JS.API.CONSUMER.CREATE.{obj_stream}.*.{obj}.C.{tenant}.>",
        f"$JS.API.CONSUMER.CREATE.{obj_stream}.*.{obj}.M.{tenant}.>",
        f"$JS.FC.{obj_stream}.>",
        USER_INFO,
    ]
    deny = [f"$JS.API.CONSUMER.CREATE.{ev}.{name}.>"
            for name in (subjects.COORDINATOR_CONSUMER, *subjects.partition_consumers())]
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
