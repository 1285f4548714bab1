"""How the auth callout reads accounts.conf (captionbus/authcallout.py, read_conf / read_users): the
deploy files as before, the documented subset of the NATS format, and a refusal, with the line, of
every form where its reading could differ from nats-server's -- each checked against the real
nats-server (`-t`), which accepts most of them, so they are refused on purpose, not as typos."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from captionbus.authcallout import ConfError, check_with_server, connection_permissions, read_conf, read_users
from captionbus.server import nats_server_binary
from captionbus.contracts import subjects
from captionbus.core.bus import USER_INFO
from tests.natsroles import NATS_DEPLOY, role_variables

USER = "{user: a, password: b, permissions: {publish: [\"x\"]}}"


def server_accepts(path: Path, **env: str) -> bool:
    done = subprocess.run([nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **env}, check=False)
    return done.returncode == 0


def accounts(tmp_path: Path, users: str, before: str = "", inside: str = "") -> Path:
    path = tmp_path / "accounts.conf"
    path.write_text(f"{before}\nauthorization {{\n  {inside}\n  users: [\n    {users}\n  ]\n}}\n")
    return path


def test_the_deploy_files_read_as_the_server_reads_them():
    users = read_users(NATS_DEPLOY / "accounts.conf")
    assert set(users) == {"coordinator", "worker", "worker-asr", "client", "gateway", "dashboard", "gc",
                          "dashboard_downloads", "dashboard_operator"}
    roles = read_conf(NATS_DEPLOY / "roles.conf")
    assert set(roles) == {*role_variables(), "COORDINATOR_CONSUMERS"}  # a list the role blocks deny
    assert users["worker"].permissions == roles["WORKER"] and roles["WORKER"]["allow_responses"] is True
    assert users["gc"].permissions["subscribe"] == {"allow": ["_INBOX_gc.>"]}
    assert "$JS.API.STREAM.PURGE.CB_EVENTS" in users["gc"].permissions["publish"]["allow"]
    # the coordinators' consumers of CB_EVENTS: denied by name to every role that reads the events
    for user in ("client", "gateway", "dashboard", "dashboard_operator", "dashboard_downloads"):
        publish = users[user].permissions["publish"]
        assert "$JS.API.CONSUMER.CREATE.CB_EVENTS" not in publish["allow"], user
        assert set(publish["deny"]) == {f"$JS.API.CONSUMER.CREATE.CB_EVENTS.{name}{tail}" for name in (
            subjects.COORDINATOR_CONSUMER, *subjects.partition_consumers()) for tail in ("", ".>")}, user
    check_with_server(NATS_DEPLOY / "accounts.conf")  # and nats-server loads the same file


# (what the file says, what the refusal names, whether nats-server -t accepts the file)
REFUSED_FORMS = [
    # a bare value would have run on to `b;`
    ({"users": "{user: a, password: b; permissions: {publish: [\"x\"]}}"}, "`;`", True),
    # the server reads b"c, the old parser b\"c
    ({"users": "{user: a, password: \"b\\\"c\", permissions: {publish: [\"x\"]}}"}, "backslash", True),
    # false to the server; the string "off" was truthy here: responses granted
    ({"users": "{user: a, password: b, permissions: {publish: [\"x\"], allow_responses: off}}"},
     "write true or false", True),
    ({"users": "{user: a, password: b, permissions: {publish: [\"x\"], allow_responses: yes}}"},
     "write true or false", True),
    ({"users": "{user: a, password: b, permissions: {publish: [\"x\"], allow_responses: {max: 1K}}}"},
     "whole numbers", True),
    # resolved by the server from the enclosing block or the environment
    ({"users": "{user: a, password: b, permissions: $P}", "inside": "P = {publish: [\"x\"]}"},
     "not a top-level key", True),
    ({"users": "{user: a, password: $PW, permissions: {publish: [\"x\"]}}"}, "not a top-level key", True),
    ({"users": "{user: a, password: pass#word, permissions: {publish: [\"x\"]}}"}, "comment right after", True),
    ({"users": "{user: a, password: b, user: c, permissions: {publish: [\"x\"]}}"}, "set twice", None),
    ({"users": "{user a, password: b, permissions: {publish: [\"x\"]}}"}, "expected ':' or '='", None),
    ({"users": USER, "inside": "include ./roles.conf"}, "only at the top level", None),
    # fields the server applies and the callout would not
    ({"users": "{user: a, password: b, allowed_connection_types: [\"STANDARD\"], permissions: {publish: [\"x\"]}}"},
     "allowed_connection_types is not applied", True),
    ({"users": "{user: a, password: b, permissions: {publish: [\"x\"], allow_responses: {max: 1, expires: \"1m\"}}}"},
     "does not apply expires", True),
    ({"users": "{user: a, password: b}"}, "no permissions block", True),
    ({"users": "{user: a, password: b, permissions: {publish: [\"x\"], bogus: 1}}"}, "bogus is not applied", False),
    ({"users": f"{USER}\n    {USER}"}, "user 'a' a second time", False),
    ({"users": USER, "inside": "token: \"s3cret\""}, "authorization.token is not applied", None),
]


@pytest.mark.parametrize("form, refusal, server_accepts_it", REFUSED_FORMS,
                         ids=[r for _, r, _ in REFUSED_FORMS])
def test_a_form_outside_the_subset_is_refused_with_its_line(tmp_path, form, refusal, server_accepts_it):
    path = accounts(tmp_path, **form)
    with pytest.raises(ConfError, match=refusal) as refused:
        read_users(path)
    assert str(refused.value).startswith(str(path)), refused.value
    if server_accepts_it is not None:
        assert server_accepts(path, PW="secret") == server_accepts_it


def test_the_subset_reads_what_the_server_reads(tmp_path):
    """Every form the subset reads, in one file nats-server accepts; the values as the server
    takes them (a lone subject is the allow list, as nats-server reads `publish: "x"`)."""
    (tmp_path / "roles.conf").write_text(
        "// roles\nONE = {\n  publish = 'x.y'   # one subject\n  subscribe: {allow: \"a.b\", deny: [\"c\", \"d\",]}\n"
        "  allow_responses: {max: 3}\n}\nTWO: {publish: {deny: [\">\"]}, allow_responses: false}\n")
    path = accounts(tmp_path, "{user: 'a', \"password\": \"$2a$11$x.y/z\", permissions: $ONE},\n"
                              "    {user = b, password = bee, permissions = $TWO}",
                    before="include \"./roles.conf\"", inside="timeout: 2")
    assert server_accepts(path)
    users = read_users(path)
    assert users["a"].password == "$2a$11$x.y/z" and users["b"].password == "bee"
    granted = connection_permissions(users["a"].permissions, "_INBOX_a_1")
    assert granted == {"pub": {"allow": ["x.y", USER_INFO]}, "sub": {"allow": ["a.b", "_INBOX_a_1.>"], "deny": ["c", "d"]},
                       "resp": {"max": 3, "ttl": 120 * 10**9}}
    granted = connection_permissions(users["b"].permissions, "_INBOX_b_1")
    assert granted == {"pub": {"deny": [">"]}, "sub": {"allow": ["_INBOX_b_1.>"]}}


def test_a_file_the_servers_refuse_is_refused_with_their_words(tmp_path):
    """An accounts file that leaves a roles.conf block unused loads in no server ("unknown field"),
    so `captionbus auth-callout run` refuses it too (check_with_server)."""
    (tmp_path / "roles.conf").write_text((NATS_DEPLOY / "roles.conf").read_text())
    path = accounts(tmp_path, "{user: worker, password: b, permissions: $WORKER}", before="include ./roles.conf")
    assert set(read_users(path)) == {"worker"}  # the subset reads it ...
    with pytest.raises(ConfError, match="nats-server refuses .*unknown field"):
        check_with_server(path)  # ... the server does not
    with pytest.raises(ConfError, match="cannot have nats-server check"):
        check_with_server(path, binary=str(tmp_path / "no-such-nats-server"))
