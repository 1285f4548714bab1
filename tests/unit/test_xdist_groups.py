"""The suite's own xdist scheduling (tests/xdist_groups.py): modules sharing a session stack run on
one worker, so the stack starts once; run as a real pytest -n 3 on a small throwaway suite."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

from tests.xdist_groups import stack_groups, weights_from_timeline

REPO = Path(__file__).resolve().parents[2]


def run_suite(suite: Path, env: dict[str, str], workers: int) -> subprocess.CompletedProcess:
    """pytest -n WORKERS on a throwaway suite, with this repo's scheduler and no outer run's state."""
    env = {key: value for key, value in env.items() if key not in ("PYTEST_XDIST_WORKER", "CAPTIONBUS_TEST_GROUPS")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
                           "--rootdir", str(suite), "-n", str(workers), "--dist", "loadscope", "--no-loadscope-reorder",
                           str(suite)], check=False, cwd=suite, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_modules_sharing_stacks_transitively_are_one_group_and_the_others_their_own():
    groups = stack_groups({"a.py": {"stack"}, "b.py": {"translate_up", "chunked_fleet"}, "c.py": {"translate_up"},
                           "d.py": set(), "e.py": {"chunked_fleet"}})
    assert groups == {"a.py": "stack", "b.py": "chunked_fleet", "c.py": "chunked_fleet", "d.py": "d.py",
                      "e.py": "chunked_fleet"}


CONFTEST = '''
import os
from collections import OrderedDict
import pytest

pytest_plugins = ["tests.xdist_groups"]


@pytest.fixture(scope="session")
def translate_up():
    with open(os.environ["STARTS"], "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "-") + "\\n")
    return "up"
'''

USER = '''
import os, time

def test_{n}_first(translate_up):
    time.sleep(0.2)
    with open(os.environ["RAN"], "a") as f:
        f.write("{n} " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")

def test_{n}_second(translate_up):
    with open(os.environ["RAN"], "a") as f:
        f.write("{n} " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")
'''


def test_a_session_stack_shared_by_several_modules_starts_once_on_one_worker(tmp_path: Path):
    """Under xdist 3.8's own `--dist loadgroup` on pytest 9 the stack started on every worker
    (its group never reached the node ids); here four modules share it and it starts once."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    for n in range(4):
        (suite / f"test_user{n}.py").write_text(USER.format(n=n))
    (suite / "test_alone.py").write_text("import time\n\ndef test_alone():\n    time.sleep(0.5)\n")
    starts, ran = tmp_path / "starts", tmp_path / "ran"
    env = {**os.environ, "STARTS": str(starts), "RAN": str(ran), "PYTHONPATH": str(REPO)}
    done = run_suite(suite, env, workers=3)
    assert "9 passed" in done.stdout
    assert len(starts.read_text().splitlines()) == 1, starts.read_text()
    workers = {line.split()[1] for line in ran.read_text().splitlines()}
    assert len(ran.read_text().splitlines()) == 8 and len(workers) == 1, ran.read_text()


ORDER_CONFTEST = '''
import pytest
from tests.xdist_groups import LATE_MODULES

pytest_plugins = ["tests.xdist_groups"]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    config.stash[LATE_MODULES] = {"test_late_heavy.py"}
'''

STARTED = '''
import os
from collections import OrderedDict

def test_{n}():
    assert "CAPTIONBUS_TEST_TIMELINE" not in os.environ  # a stage worker's cache key would take it in
    with open(os.environ["RAN"], "a") as f:
        f.write("{n}\\n")
'''


def test_the_heaviest_unit_goes_first_but_never_a_late_one_before_the_early_ones(tmp_path: Path):
    """Weights {late_heavy 100 s, heavy 50 s, light 1 s}, late_heavy needing an env: on one worker
    the order is heavy (the heaviest early unit), then light (handed out while heavy's long test
    is still in hand: the lightest), then late_heavy; collection order would run light first and
    xdist's own order would never look at the weights."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(ORDER_CONFTEST)
    for name in ("light", "late_heavy", "heavy"):
        (suite / f"test_{name}.py").write_text(STARTED.format(n=name))
    weights = tmp_path / "weights.json"
    weights.write_text('{"test_late_heavy.py": 100, "test_heavy.py": 50, "test_light.py": 1}')
    ran = tmp_path / "ran"
    timeline = tmp_path / "timeline.jsonl"
    env = {**os.environ, "RAN": str(ran), "PYTHONPATH": str(REPO), "CAPTIONBUS_TEST_WEIGHTS": str(weights),
           "CAPTIONBUS_TEST_TIMELINE": str(timeline)}
    run_suite(suite, env, workers=1)
    assert ran.read_text().split() == ["heavy", "light", "late_heavy"]
    # The timeline names each phase's worker and unit; the weights are its seconds per unit.
    lines = [json.loads(line) for line in timeline.read_text().splitlines()]
    assert {(line["worker"], line["unit"], line["when"]) for line in lines} == {
        ("gw0", f"test_{name}.py", when) for name in ("light", "late_heavy", "heavy")
        for when in ("setup", "call", "teardown")}
    weights_now = weights_from_timeline(lines)
    assert sorted(weights_now) == ["test_heavy.py", "test_late_heavy.py", "test_light.py"]
    assert sum(weights_now.values()) == pytest.approx(sum(line["duration"] for line in lines), abs=0.2)


class _Worker:
    """What the scheduler sees of an xdist worker: the indexes it was sent, and its shutdown."""

    def __init__(self, name: str):
        self.sent: list[list[int]] = []
        self.shutting_down = False
        self.gateway = type("Gateway", (), {"id": name})()

    def send_runtest_some(self, indexes):
        self.sent.append(list(indexes))

    def shutdown(self):
        self.shutting_down = True


def test_a_crashed_workers_finished_unit_is_never_handed_out_again(tmp_path, monkeypatch):
    """xdist's remove_node puts a crashed worker's units back whole, finished ones included;
    handing one out sends an empty list, on which a worker holding its last test waits forever
    (the review of e76c4b7: the weights made the finished heavy unit the first choice). The
    replacement worker gets only the unit with tests left."""
    from tests import xdist_groups

    collection = [f"{module}::t{n}" for module in ("a.py", "b.py", "c.py") for n in (1, 2)]
    groups = tmp_path / "groups.json"
    groups.write_text('{"groups": {"a.py": "a.py", "b.py": "b.py", "c.py": "c.py"}, "late": []}')
    weights = tmp_path / "weights.json"
    weights.write_text('{"a.py": 50, "b.py": 40, "c.py": 1}')
    monkeypatch.setenv(xdist_groups.GROUPS_FILE, str(groups))
    monkeypatch.setenv(xdist_groups.WEIGHTS_FILE, str(weights))
    scheduler = xdist_groups.ModuleAndStackScheduling.__new__(xdist_groups.ModuleAndStackScheduling)
    scheduler.numnodes, scheduler.collection, scheduler.log = 2, None, lambda *args: None
    scheduler.config = type("Config", (), {"option": type("Options", (), {"loadscopereorder": False})()})()
    scheduler.workqueue, scheduler.assigned_work, scheduler.registered_collections = OrderedDict(), {}, {}
    first, second = _Worker("gw0"), _Worker("gw1")
    for worker in (first, second):
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    assert first.sent == [[0, 1], [4, 5]] and second.sent == [[2, 3]]  # a (heaviest), then c (lightest); b
    scheduler.mark_test_complete(first, 0)
    scheduler.mark_test_complete(first, 1)  # a done, c not started: the worker dies
    scheduler.remove_node(first)
    replacement = _Worker("gw2")
    scheduler.add_node(replacement)
    scheduler.add_node_collection(replacement, collection)
    scheduler.schedule()
    assert replacement.sent == [[4, 5]]
