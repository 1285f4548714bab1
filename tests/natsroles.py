"""A nats-server whose users have exactly the permissions of deploy/nats/roles.conf (test
passwords), for tests that run captionbus under each role and read the violations it logged."""
from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

from captionbus.server import _free_port, nats_server_binary

NATS_DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "nats"


def role_variables() -> list[str]:
    """The permission blocks roles.conf defines (COORDINATOR, WORKER, WORKER_ASR, GC, ...)."""
    return re.findall(r"^([A-Z][A-Z0-9_]*) = \{", (NATS_DEPLOY / "roles.conf").read_text(), re.M)


def unused_roles(used) -> list[str]:
    """`authorization.users` entries, one user nobody can log in as for each roles.conf block not
    in `used`: nats-server refuses a config whose top-level variables are not all referenced
    ("unknown field"), and so does `captionbus auth-callout run` (it has nats-server check its file)."""
    used = set(used)
    return [f'    {{user: "unused-{var.lower()}", password: "{secrets.token_hex(16)}", permissions: ${var}}}'
            for var in role_variables() if var not in used]


def users_block(users: dict[str, str]) -> str:
    """`authorization.users` entries for `users` (name -> variable, password pw-<name>), plus
    unused_roles for the blocks left unused."""
    entries = [f'    {{user: "{u}", password: "pw-{u}", permissions: ${var}}}' for u, var in users.items()]
    return "\n".join(entries + unused_roles(users.values()))


@contextlib.contextmanager
def _serving(config: Path, log: Path) -> Iterator[None]:
    """Run `nats-server -c config` until the block ends, once its log says it is ready."""
    proc = subprocess.Popen([nats_server_binary(), "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (log.exists() and "Server is ready" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _head(tmp_path: Path, port: int, log: Path) -> str:
    return f'listen: 127.0.0.1:{port}\nlog_file: "{log}"\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'


def _deploy_copy(tmp_path: Path) -> Path:
    """deploy/nats/*.conf copied under tmp_path/conf (a test edits its copies)."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    for conf in NATS_DEPLOY.glob("*.conf"):
        shutil.copy(conf, conf_dir / conf.name)
    return conf_dir


@contextlib.contextmanager
def roles_server(tmp_path: Path, users: dict[str, str]) -> Iterator[tuple[dict[str, str], Path]]:
    """users: user name -> permissions variable of roles.conf (e.g. {"worker-asr": "WORKER_ASR"}).
    Yields ({user: url with its password}, server log)."""
    conf_dir = _deploy_copy(tmp_path)
    port = _free_port()
    lines = users_block(users)
    log = tmp_path / "server.log"
    (conf_dir / "test.conf").write_text(
        _head(tmp_path, port, log) + f"include ./roles.conf\nauthorization {{\n  users: [\n{lines}\n  ]\n}}\n")
    with _serving(conf_dir / "test.conf", log):
        yield {u: f"nats://{u}:pw-{u}@127.0.0.1:{port}" for u in users}, log


CALLOUT_USER = "auth-callout"


@contextlib.contextmanager
def callout_server(tmp_path: Path, users: dict[str, str],
                   seed: str | None = None) -> Iterator[tuple[dict[str, str], Path, Path, str]]:
    """A nats-server whose connections are let in by `captionbus auth-callout` (deploy/nats/callout.conf):
    the server knows one user, the callout's own; `users` (name -> roles.conf variable, password
    pw-<name>, bcrypt-hashed as `nats server passwd` does) go in the accounts file the callout reads.
    Yields ({user: url with its password}, server log, accounts file, the callout's seed: `seed`
    or a new one); the caller runs the callout (captionbus.authcallout.Callout) as the callout user."""
    import bcrypt

    from captionbus.authcallout import new_account_seed, public_key

    conf_dir = _deploy_copy(tmp_path)
    salt = bcrypt.gensalt(rounds=4)  # fast for tests; the check is the same at any cost
    entries = "\n".join([f'    {{user: "{u}", password: "{bcrypt.hashpw(f"pw-{u}".encode(), salt).decode()}", '
                         f'permissions: ${var}}}' for u, var in users.items()] + unused_roles(users.values()))
    accounts = conf_dir / "callout-accounts.conf"
    accounts.write_text(f"include ./roles.conf\nauthorization {{\n  users: [\n{entries}\n  ]\n}}\n")
    seed = seed or new_account_seed()
    port = _free_port()
    log = tmp_path / "server.log"
    callout = (conf_dir / "callout.conf").read_text().replace("$2a$11$REPLACE_ME", f"pw-{CALLOUT_USER}")
    callout = callout.replace("AREPLACE_ME_WITH_THE_KEYGEN_PUBLIC_KEY", public_key(seed))
    (conf_dir / "callout.conf").write_text(callout)
    (conf_dir / "test.conf").write_text(_head(tmp_path, port, log) + "include ./callout.conf\n")
    with _serving(conf_dir / "test.conf", log):
        urls = {u: f"nats://{u}:pw-{u}@127.0.0.1:{port}" for u in [*users, CALLOUT_USER]}
        yield urls, log, accounts, seed


@contextlib.contextmanager
def users_server(tmp_path: Path, users: dict[str, str | None], name: str = "users-server") -> Iterator[dict[str, str]]:
    """A nats-server -js whose users (password pw-<name>) have the given permissions block bodies
    (None: no restrictions); yields {user: url}. For real refusals: a request the server refuses
    gets no reply, as a read does while a cluster elects a leader."""
    port = _free_port()
    entries = "\n".join(f'  {{user: "{u}", password: "pw-{u}"' + (f", permissions: {{{p}}}" if p is not None else "") + "}"
                        for u, p in users.items())
    log, conf = tmp_path / f"{name}.log", tmp_path / f"{name}.conf"
    conf.write_text(_head(tmp_path, port, log) + f"authorization {{ users: [\n{entries}\n] }}\n")
    with _serving(conf, log):
        yield {u: f"nats://{u}:pw-{u}@127.0.0.1:{port}" for u in users}


def violations(log: Path) -> list[tuple[str, str]]:
    """(user, subject) of every permission violation the server logged."""
    found = []
    for line in log.read_text().splitlines():
        if "Violation" in line:
            user = line.split("user:", 1)[1].split('"', 1)[0] if "user:" in line else "?"
            subject = line.split('Subject "', 1)[1].split('"', 1)[0] if 'Subject "' in line else line
            found.append((user, subject.strip()))
    return found


async def denied(call, timeout: float = 0.75) -> bool:
    """Whether a bus call fails (a refused request gets no reply: it times out)."""
    try:
        await asyncio.wait_for(call, timeout)
    except Exception:
        return True
    return False


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (all held open at once, so none repeats)."""
    held = [socket.socket() for _ in range(n)]
    for sock in held:
        sock.bind(("127.0.0.1", 0))
    numbers = [sock.getsockname()[1] for sock in held]
    for sock in held:
        sock.close()
    return numbers
