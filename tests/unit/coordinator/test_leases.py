"""Job ownership's pure parts: the partition of a job (FNV-1a of its id, in every event's subject;
tests/integration/test_coordinators.py checks the server's filtering by it) and the lease
plan (`leases.plan`), run as rounds of several coordinators on one table of leases."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captionbus.contracts import subjects
from captionbus.coordinator.leases import plan, share


def test_the_partition_hash_is_fnv1a_32():
    # FNV-1a 32-bit reference values (Fowler/Noll/Vo test vectors), through the modulo.
    assert subjects.job_partition("a", 2**32 - 1) == 0xE40C292C
    assert subjects.job_partition("foobar", 2**32 - 1) == 0xBF9CF968
    assert subjects.job_partition("foobar", 16) == 0xBF9CF968 % 16


def test_partitions_of_many_jobs_are_spread_and_stable():
    ids = [f"job-{n}" for n in range(4000)]
    counts = [0] * 16
    for job in ids:
        counts[subjects.job_partition(job, 16)] += 1
    assert min(counts) > 4000 / 16 * 0.8 and max(counts) < 4000 / 16 * 1.2
    assert [subjects.job_partition(j, 16) for j in ids] == [subjects.job_partition(j, 16) for j in ids]


def test_partition_refuses_what_is_not_a_job_id_or_a_count():
    with pytest.raises(ValueError):
        subjects.job_partition("a.b", 16)
    with pytest.raises(ValueError):
        subjects.job_partition("job", 0)


def test_each_event_carries_its_jobs_partition():
    """The partition token of a job's events (subjects.job_event) is job_partition's, in every
    kind; events in the layout before job ownership have none (the server's filtering by it:
    tests/integration/test_coordinators.py)."""
    for job in ("job-1", "acme_job-2", "j19a-3f2c", "_x"):
        p = subjects.job_partition(job)
        for kind in (*subjects.COORDINATOR_KINDS, "stage_progress", "completed"):
            subject = subjects.job_event(job, kind)
            assert subjects.event_partition(subject) == p and subjects.event_job_id(subject) == job
            assert subjects.event_kind(subject) == kind
            assert subjects.event_partition(subjects.legacy_job_event(job, kind)) is None
        assert [f"captionbus.job.*.{p}.*.{kind}" for kind in subjects.COORDINATOR_KINDS] == subjects.partition_filters(p)


def rounds(table: dict[int, str], members: list[str], partitions: int, rng: random.Random, n: int = 20) -> None:
    """`n` rounds of every member in a random order on `table` (partition -> holder), as the KV
    would answer them: a take of a held partition fails (kv.create), a release frees it."""
    for _ in range(n):
        for member in rng.sample(members, len(members)):
            mine = {p for p, holder in table.items() if holder == member}
            take, release = plan(partitions, len(members), mine, table)
            for p in release:
                del table[p]
            for p in take:
                table.setdefault(p, member)


@settings(max_examples=200, deadline=None)
@given(partitions=st.integers(1, 64), members=st.integers(1, 8), seed=st.integers(0, 2**16),
       start=st.sampled_from(["empty", "one_holds_all"]))
def test_leases_settle_balanced_with_every_partition_held(partitions, members, seed, start):
    rng = random.Random(seed)
    names = [f"c{n}" for n in range(members)]
    table = {p: "c0" for p in range(partitions)} if start == "one_holds_all" else {}
    rounds(table, names, partitions, rng)
    assert sorted(table) == list(range(partitions))
    held = [sum(1 for holder in table.values() if holder == name) for name in names]
    assert max(held) <= share(partitions, members)
    # settled: another round moves nothing
    before = dict(table)
    rounds(table, names, partitions, rng, n=1)
    assert table == before


@settings(max_examples=100, deadline=None)
@given(partitions=st.integers(2, 64), members=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_a_dead_coordinators_partitions_go_to_the_others(partitions, members, seed):
    rng = random.Random(seed)
    names = [f"c{n}" for n in range(members)]
    table: dict[int, str] = {}
    rounds(table, names, partitions, rng)
    dead = rng.choice(names)
    kept = {p: holder for p, holder in table.items() if holder != dead}
    for p in set(table) - set(kept):  # its leases lapse (the bucket's TTL), its member key too
        del table[p]
    rounds(table, [n for n in names if n != dead], partitions, rng)
    assert sorted(table) == list(range(partitions)) and dead not in table.values()
    # the living keep what they held: only the dead one's jobs change hands
    assert all(table[p] == holder for p, holder in kept.items())


def test_plan_releases_only_when_nothing_is_free():
    assert plan(16, 2, set(range(16)), set(range(16))) == ([], list(range(8, 16)))
    assert plan(16, 2, set(range(12)), set(range(12))) == ([], [])  # 4 free: the other takes them
    assert plan(16, 2, set(), set(range(12))) == ([12, 13, 14, 15], [])
