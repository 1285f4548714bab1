"""Durations the dashboard charts and /metrics exports, from one definition each.

Every number is a difference of two times the bus recorded, read from the job-state records the
coordinator writes as it applies events (captionbus/coordinator/decide.py stamps the state and the events it
decides with the same `now`):

- a job's duration: its terminal write (`updated_at`, the time of its `completed` / `failed` /
  `cancelled` event) minus `created_at` (the time of its `started` event); None while it runs.
- a stage attempt's duration: the node's `finished_at` minus `requested_at` (its
  `stage_requested` event) — the `captionbus_stage_duration_seconds` histogram's samples.
- its queue wait: when the worker's handler started (`started_at` in the `stage_completed`
  event's metrics, the worker's clock) minus `requested_at`: the
  `captionbus_stage_queue_wait_seconds` samples. A cache hit did not run a handler and has none;
  a negative difference (clocks of two hosts) counts as 0.

Only a node's last attempt is in its state, so an attempt a cancel or a retry replaced is not
counted (nor is it in /metrics). Percentiles are nearest-rank on the samples themselves (not
interpolated from histogram buckets), so a test can recompute them from the events.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from captionbus.contracts import JobState
from captionbus.contracts.jobs import NodeState

WINDOW_S = 3600.0  # the charts' window: the last hour
BUCKET_S = 60.0  # jobs per minute


def job_duration(state: JobState) -> float | None:
    if not state.status.finished:
        return None
    return round((state.updated_at - state.created_at).total_seconds(), 3)


def stage_duration(node: NodeState) -> float | None:
    if node.status.value != "completed" or not node.requested_at or not node.finished_at:
        return None
    return (node.finished_at - node.requested_at).total_seconds()


def queue_wait(node: NodeState) -> float | None:
    started = node.metrics.get("started_at")
    if node.status.value != "completed" or not node.requested_at or started is None or node.metrics.get("cache_hit"):
        return None
    return max(0.0, float(started) - node.requested_at.timestamp())


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank: the smallest sample with at least `p` of the samples at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value else None


def summary_of(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "p50": _round(percentile(values, 0.5)), "p95": _round(percentile(values, 0.95)),
            "max": _round(max(values) if values else None)}


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def charts(states: Iterable[JobState], now: float | None = None, window_s: float = WINDOW_S,
           bucket_s: float = BUCKET_S) -> dict[str, Any]:
    """Jobs submitted and finished per minute, and per stage the p50/p95 of attempt durations and
    queue waits of the attempts that finished in the window."""
    now = time.time() if now is None else now
    since = now - window_s
    n = int(window_s // bucket_s)
    submitted, finished = [0] * n, [0] * n
    durations: dict[str, list[float]] = {}
    waits: dict[str, list[float]] = {}

    def slot(ts: float) -> int:
        return min(n - 1, int((ts - since) // bucket_s))

    def inside(ts: float | None) -> bool:
        return ts is not None and since <= ts <= now

    for state in states:
        created, updated = state.created_at.timestamp(), state.updated_at.timestamp()
        if inside(created):
            submitted[slot(created)] += 1
        if state.status.finished and inside(updated):
            finished[slot(updated)] += 1
        for node in state.nodes.values():
            if not inside(_ts(node.finished_at)):
                continue
            duration, wait = stage_duration(node), queue_wait(node)
            if duration is not None:
                durations.setdefault(node.stage, []).append(duration)
            if wait is not None:
                waits.setdefault(node.stage, []).append(wait)
    stages = sorted(set(durations) | set(waits))
    return {
        "window_s": window_s, "bucket_s": bucket_s, "since": since, "now": now,
        "jobs_per_minute": {"submitted": submitted, "finished": finished,
                            "submitted_total": sum(submitted), "finished_total": sum(finished)},
        "stages": [{"stage": stage, "duration": summary_of(durations.get(stage, [])),
                    "queue_wait": summary_of(waits.get(stage, []))} for stage in stages],
    }
