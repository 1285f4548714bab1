"""pytest-xdist groups for README's `pytest` (pyproject's addopts run it with `--dist loadgroup`).

Why parallel at all: the suite waits more than it computes. Run serially on this 2-core machine it
took 2168 s with the load average at 0.6-2.6 throughout (servers, stacks and model loads starting,
polls), so tests side by side use cores that sat idle.

Why these groups: a test module runs whole on one worker (its module fixtures are set up once and
its tests keep their order), and the modules that share a session stack (SHARED_STACKS, started in
tests/e2e/conftest.py) form one group, so each stack starts once, on one worker, and closes after
the group's last test (tests/e2e/conftest.py `_early_close`: every later user of a stack is in the
same group, hence on the same worker). Without xdist the marks change nothing."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

SHARED_STACKS = ("stack", "chunked_fleet", "translate_up")


def stack_groups(fixtures_of: dict[Path, set[str]]) -> dict[str, str]:
    """Each shared stack -> its group's name: stacks used together by one module, transitively,
    share one group, named after the first of them in SHARED_STACKS."""
    group_of = {name: name for name in SHARED_STACKS}

    def root(name: str) -> str:
        while group_of[name] != name:
            name = group_of[name]
        return name

    for used in fixtures_of.values():
        roots = sorted({root(name) for name in used}, key=SHARED_STACKS.index)
        for other in roots[1:]:
            group_of[other] = roots[0]
    return {name: root(name) for name in SHARED_STACKS}


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the xdist_group marks into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    fixtures_of: dict[Path, set[str]] = defaultdict(set)
    for item in items:
        fixtures_of[item.path] |= set(SHARED_STACKS) & set(item.fixturenames)
    groups = stack_groups(fixtures_of)
    for item in items:
        used = fixtures_of[item.path]
        if used:
            group = groups[min(used, key=SHARED_STACKS.index)]
        else:
            group = item.path.relative_to(config.rootpath).as_posix()
        item.add_marker(pytest.mark.xdist_group(group))
