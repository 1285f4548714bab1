"""How README's `pytest` spreads the suite over pytest-xdist workers (pyproject's addopts:
`-n 3 --dist loadscope`, with the scheduler below in place of xdist's own loadscope one).

Why parallel at all: the suite waits more than it computes. Run in one process on this 2-core
machine it took 2168 s with the load average at 0.6-2.6 throughout (servers, stacks and model
loads starting, polls), so tests side by side use cores that sat idle.

Why these groups: a test module runs whole on one worker (its module fixtures are set up once and
its tests keep their order), and the modules that share a session stack (SHARED_STACKS, started in
tests/e2e/conftest.py) form one group, so each stack starts once, on one worker, and closes after
the group's last test (tests/e2e/conftest.py `_early_close`: every later user of a stack is in the
same group, hence on the same worker).

Why a scheduler of our own and not xdist's `loadgroup` with `xdist_group` marks: xdist 3.8 puts a
test's group into its node id by assigning `item._nodeid`, which pytest 9 no longer reads (its node
ids live in `item._id`), so under pytest 9.2 every test was its own group: the first run of this
suite under `--dist loadgroup` started the translate stack on all three workers. Which modules
share a stack is known only after collection (a fixture's closure), and only the workers collect,
so each worker writes the module -> group map to a file the controller named (CAPTIONBUS_TEST_GROUPS)
and the controller's scheduler reads it when it splits the collection into work units."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

SHARED_STACKS = ("stack", "chunked_fleet", "translate_up")
GROUPS_FILE = "CAPTIONBUS_TEST_GROUPS"
WEIGHTS_FILE = "CAPTIONBUS_TEST_WEIGHTS"  # a weights file in place of DEFAULT_WEIGHTS (tests of this file)
DEFAULT_WEIGHTS = Path(__file__).with_name("xdist_weights.json")
LATE_MODULES = pytest.StashKey[set[str]]()  # module node ids that need a stage env (tests/conftest.py)
TIMELINE_FILE = "CAPTIONBUS_TEST_TIMELINE"  # opt-in: one JSON line per test phase, as the controller hears of it


def stack_groups(fixtures_of: dict[str, set[str]]) -> dict[str, str]:
    """Each module -> its group: the module itself, or, for a module that uses shared stacks, the
    first of SHARED_STACKS in its group (stacks used together by one module, transitively, share a
    group)."""
    parent = {name: name for name in SHARED_STACKS}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for used in fixtures_of.values():
        roots = sorted({root(name) for name in used}, key=SHARED_STACKS.index)
        for other in roots[1:]:
            parent[other] = roots[0]
    return {module: min((root(name) for name in used), key=SHARED_STACKS.index) if used else module
            for module, used in fixtures_of.items()}


_timeline: str | None = None  # CAPTIONBUS_TEST_TIMELINE, taken out of the environment


def pytest_configure(config: pytest.Config) -> None:
    """On the controller of an xdist run: name the file the workers will write the groups to (the
    workers are started after this and inherit the environment). The timeline's file name leaves
    the environment here: a stage worker's cache key takes in every CAPTIONBUS_* setting and the
    stamp of each file one names (runtime/cache.worker_fingerprint), and the timeline grows with
    every test, so with it inherited test_stage_cache's keys changed between two runs."""
    global _timeline
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    _timeline = os.environ.pop(TIMELINE_FILE, None) or _timeline
    if not getattr(config.option, "numprocesses", None):
        return
    folder = tempfile.mkdtemp(prefix="captionbus-test-groups-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ[GROUPS_FILE] = str(Path(folder) / "groups.json")


@pytest.hookimpl(wrapper=True)  # after every other implementation: conftest's sorts and stashes LATE_MODULES
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    """On a worker: write the module -> group map of what it collected, and which modules need a
    stage env (every worker collects the same tests; the file is replaced whole, so the
    controller never reads half of one)."""
    yield
    target = os.environ.get(GROUPS_FILE)
    if not os.environ.get("PYTEST_XDIST_WORKER") or not target:
        return
    fixtures_of: dict[str, set[str]] = defaultdict(set)
    for item in items:
        fixtures_of[item.nodeid.split("::", 1)[0]] |= set(SHARED_STACKS) & set(item.fixturenames)
    plan = {"groups": stack_groups(fixtures_of), "late": sorted(config.stash.get(LATE_MODULES, set()))}
    partial = Path(f"{target}.{os.environ['PYTEST_XDIST_WORKER']}")
    partial.write_text(json.dumps(plan), encoding="utf-8")
    partial.replace(target)


def load_weights(path: Path) -> dict[str, float]:
    """Seconds per work unit, as `python -m tests.xdist_groups TIMELINE` wrote them; none when the
    file is missing or unreadable (every unit then counts DEFAULT_TEST_S per test)."""
    try:
        return {str(unit): float(seconds) for unit, seconds in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


class ModuleAndStackScheduling(LoadScopeScheduling):
    """xdist's loadscope scheduling (whole work units to one worker), with a work unit being a test
    module or a shared-stack group, handed out heaviest first.

    Why weights: the suite's wall is the last worker's finish. In collection order the heaviest
    units (the MLX decode, the shared stacks, the chaos run) came in the second half, so one worker
    was still on a 300 s unit when the others ran dry. Each unit's seconds, measured in a run
    (tests/xdist_weights.json), let the scheduler hand out the longest unit first (LPT), which
    ends the run within the longest unit of an even split.

    Two rules shape that order:
    - Env-free modules still go before the modules that need a stage env (the `late` set the
      workers report, sorted so by tests/conftest.py): on a fresh machine the env builds run
      in the background meanwhile, and a worker handed an env-needing unit first would wait for
      its build.
    - A worker is given its next unit while it still runs the last test of the one before (an
      xdist worker runs a test only once it knows the next), so the next unit is chosen then. A
      worker with over PREFETCH_S seconds of work still in hand gets the lightest unit waiting,
      so a heavy one is not parked behind a long test while another worker could take it; one
      near its end gets the heaviest.
    A unit missing from the weights (a new module) counts DEFAULT_TEST_S per test."""

    PREFETCH_S = 20.0
    DEFAULT_TEST_S = 1.0

    _groups: dict[str, str] | None = None
    _late: frozenset[str] = frozenset()
    _weights: dict[str, float] | None = None

    def _plan(self) -> dict[str, str]:
        if self._groups is None:
            path = Path(os.environ[GROUPS_FILE])
            try:
                plan = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise RuntimeError(f"no worker wrote the test groups to {path} ({e}): run with -n 0") from e
            self._groups = plan["groups"]
            self._late = frozenset(self._groups.get(module, module) for module in plan["late"])
        return self._groups

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return self._plan().get(module, module)

    def _weight(self, scope: str, tests: int) -> float:
        if self._weights is None:
            self._weights = load_weights(Path(os.environ.get(WEIGHTS_FILE) or DEFAULT_WEIGHTS))
        known = self._weights.get(scope)
        return known if known is not None else self.DEFAULT_TEST_S * tests

    def _is_late(self, scope: str) -> bool:
        """Whether the unit holds a module that needs a stage env (a group: any of its modules)."""
        self._plan()
        return scope in self._late

    def _left(self, scope: str, tests: dict[str, bool]) -> float:
        """Seconds of a unit still to run: its weight times its share of tests not done."""
        return self._weight(scope, len(tests)) * list(tests.values()).count(False) / len(tests)

    def _in_hand(self, node) -> float:
        """Seconds of work the node still holds."""
        return sum(self._left(scope, tests) for scope, tests in self.assigned_work.get(node, {}).items())

    def _assign_work_unit(self, node) -> None:
        """Put the chosen unit at the queue's head; xdist's own method then hands it out. Units
        with nothing left to run are dropped first: a crashed worker's units come back whole,
        finished tests included (xdist's remove_node), and handing one out would send a worker an
        empty list, on which a worker holding its last test waits forever."""
        for scope in [scope for scope, tests in self.workqueue.items() if all(tests.values())]:
            del self.workqueue[scope]
        if not self.workqueue:
            node.shutdown()
            return
        waiting = [scope for scope in self.workqueue if not self._is_late(scope)] or list(self.workqueue)
        by_weight = sorted(waiting, key=lambda scope: self._left(scope, self.workqueue[scope]))
        chosen = by_weight[0] if self._in_hand(node) > self.PREFETCH_S else by_weight[-1]
        self.workqueue.move_to_end(chosen, last=False)
        super()._assign_work_unit(node)


_scheduler: ModuleAndStackScheduling | None = None  # the controller's, for the timeline's unit names


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own; `-p no:xdist` leaves it unknown
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    global _scheduler
    if config.getvalue("dist") == "loadscope":
        _scheduler = ModuleAndStackScheduling(config, log)
        return _scheduler
    return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With CAPTIONBUS_TEST_TIMELINE=FILE, the controller appends each test phase's report (worker,
    work unit, node id, phase, duration, when it arrived) to FILE: which worker ran what when, and
    the input of `python -m tests.xdist_groups FILE`, which writes the weights."""
    target = _timeline
    if not target or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    node = getattr(report, "node", None)
    line = {"t": round(time.time(), 3), "worker": node.gateway.id if node is not None else "main",
            "unit": _scheduler._split_scope(report.nodeid) if _scheduler else report.nodeid.split("::", 1)[0],
            "nodeid": report.nodeid, "when": report.when, "duration": round(report.duration, 3),
            "outcome": report.outcome}
    with open(target, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


def weights_from_timeline(lines: list[dict]) -> dict[str, float]:
    """Seconds per work unit: the sum of its tests' setup, call and teardown durations."""
    weights: dict[str, float] = defaultdict(float)
    for line in lines:
        weights[line["unit"]] += line["duration"]
    return {unit: round(seconds, 1) for unit, seconds in sorted(weights.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":  # python -m tests.xdist_groups TIMELINE  (rewrites tests/xdist_weights.json)
    import sys

    timeline = [json.loads(line) for line in Path(sys.argv[1]).read_text(encoding="utf-8").splitlines() if line]
    DEFAULT_WEIGHTS.write_text(json.dumps(weights_from_timeline(timeline), indent=1) + "\n", encoding="utf-8")
    print(f"{DEFAULT_WEIGHTS}: {len({line['unit'] for line in timeline})} units")
