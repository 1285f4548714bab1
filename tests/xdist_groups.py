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
from collections import defaultdict
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

SHARED_STACKS = ("stack", "chunked_fleet", "translate_up")
GROUPS_FILE = "CAPTIONBUS_TEST_GROUPS"


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


def pytest_configure(config: pytest.Config) -> None:
    """On the controller of an xdist run: name the file the workers will write the groups to (the
    workers are started after this and inherit the environment)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        return
    folder = tempfile.mkdtemp(prefix="captionbus-test-groups-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ[GROUPS_FILE] = str(Path(folder) / "groups.json")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a worker: write the module -> group map of what it collected (every worker collects
    the same tests; the file is replaced whole, so the controller never reads half of one)."""
    target = os.environ.get(GROUPS_FILE)
    if not os.environ.get("PYTEST_XDIST_WORKER") or not target:
        return
    fixtures_of: dict[str, set[str]] = defaultdict(set)
    for item in items:
        fixtures_of[item.nodeid.split("::", 1)[0]] |= set(SHARED_STACKS) & set(item.fixturenames)
    partial = Path(f"{target}.{os.environ['PYTEST_XDIST_WORKER']}")
    partial.write_text(json.dumps(stack_groups(fixtures_of)), encoding="utf-8")
    partial.replace(target)


class ModuleAndStackScheduling(LoadScopeScheduling):
    """xdist's loadscope scheduling (whole work units to one worker, in collection order with
    `--no-loadscope-reorder`), with a work unit being a test module or a shared-stack group."""

    _groups: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._groups is None:
            path = Path(os.environ[GROUPS_FILE])
            try:
                self._groups = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise RuntimeError(f"no worker wrote the test groups to {path} ({e}): run with -n 0") from e
        module = nodeid.split("::", 1)[0]
        return self._groups.get(module, module)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own; `-p no:xdist` leaves it unknown
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") == "loadscope":
        return ModuleAndStackScheduling(config, log)
    return None
