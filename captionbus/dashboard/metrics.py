"""Prometheus metrics derived from what the dashboard already watches (see board.py for why).

Gauges (jobs by status, queues, workers) are read from the board at scrape time; histograms are
observed once per finished stage attempt as job states change, including the states replayed
when the dashboard starts, so a restarted dashboard reports every job still in the KV bucket.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from captionbus.dashboard.stats import queue_wait, stage_duration
from captionbus.contracts import JobState, failure_class

if TYPE_CHECKING:
    from captionbus.dashboard.board import Board

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RTF_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage_duration = Histogram(
            "captionbus_stage_duration_seconds", "Time from a stage request to its result",
            ["stage", "env", "host"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram(
            "captionbus_stage_queue_wait_seconds", "Time from a stage request to its handler starting on a worker "
            "(cache hits not counted)", ["stage"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.realtime_factor = Histogram(
            "captionbus_stage_realtime_factor", "Stage handling time over media duration",
            ["stage", "env"], buckets=RTF_BUCKETS, registry=self.registry)
        self.failures = Counter(
            "captionbus_job_failures", "Jobs that failed or were cancelled, by the stage that failed them and "
            "the reason class (captionbus.contracts.failures: setup, input, timeout, unserved, worker_crash, stage_error, "
            "cancelled, internal)", ["workflow", "stage", "reason_class"], registry=self.registry)
        self.redeliveries = Counter(
            "captionbus_stage_redeliveries", "Stage results that came from a redelivered request",
            ["stage"], registry=self.registry)
        self.board: Board | None = None
        self.registry.register(_BoardCollector(self))

    def observe(self, previous: JobState | None, state: JobState) -> None:
        for name, node in state.nodes.items():
            before = previous.nodes.get(name) if previous else None
            finished_now = node.status.value == "completed" and node.finished_at and (
                before is None or before.status.value != "completed" or before.attempt != node.attempt)
            if not finished_now:
                continue
            env, host = node.worker.get("env", ""), node.worker.get("host", "")
            duration, wait = stage_duration(node), queue_wait(node)  # the dashboard's charts' samples too
            if duration is not None:
                self.stage_duration.labels(node.stage, env, host).observe(duration)
            if wait is not None:
                self.queue_wait.labels(node.stage).observe(wait)
            rtf = _rtf(state, name)
            if rtf is not None:
                self.realtime_factor.labels(node.stage, env).observe(rtf)
            if node.metrics.get("delivery", 1) > 1:
                self.redeliveries.labels(node.stage).inc()
        if state.status.value in ("failed", "cancelled") and (
                previous is None or previous.status.value != state.status.value):
            failed = [n.stage for n in state.nodes.values() if n.status.value == "failed"]
            self.failures.labels(state.spec.workflow, failed[0] if failed else "none", job_failure_class(state)).inc()


def job_failure_class(state: JobState) -> str:
    if state.status.value == "cancelled":
        return "cancelled"
    return state.failure_class or failure_class(None, state.error or "")


def _rtf(state: JobState, name: str) -> float | None:
    node = state.nodes[name]
    if "realtime_factor" in node.metrics:
        return float(node.metrics["realtime_factor"])
    duration = next((n.metrics.get("media_duration_s") for n in state.nodes.values()
                     if n.metrics.get("media_duration_s")), None)
    handled = node.metrics.get("handle_s")
    return float(handled) / float(duration) if duration and handled is not None else None


class _BoardCollector(Collector):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterable:
        board = self.metrics.board
        jobs = GaugeMetricFamily("captionbus_jobs", "Jobs in the job-state bucket", labels=["status", "workflow"])
        waiting = GaugeMetricFamily("captionbus_queue_waiting", "Stage requests not yet delivered", labels=["stage"])
        in_flight = GaugeMetricFamily("captionbus_queue_in_flight", "Stage requests delivered, not acked", labels=["stage"])
        redelivered = GaugeMetricFamily("captionbus_queue_redelivered", "Requests redelivered (consumer info)", labels=["stage"])
        oldest = GaugeMetricFamily("captionbus_queue_oldest_waiting_seconds", "Age of the oldest waiting request", labels=["stage"])
        workers = GaugeMetricFamily("captionbus_workers", "Stage workers seen by $SRV discovery, by state "
                                    "(loading, idle, busy, setup_failed; lost: stopped answering)", labels=["stage", "state"])
        if board is not None:
            counts: dict[tuple[str, str], int] = {}
            for summary in board.summaries.values():
                key = (summary["status"], summary["workflow"])
                counts[key] = counts.get(key, 0) + 1
            for (status, workflow), n in sorted(counts.items()):
                jobs.add_metric([status, workflow], n)
            for row in board.queue_rows():
                waiting.add_metric([row["stage"]], row["waiting"])
                in_flight.add_metric([row["stage"]], row["in_flight"])
                redelivered.add_metric([row["stage"]], row["redelivered"])
                oldest.add_metric([row["stage"]], row["oldest_waiting_s"] or 0.0)
            by_state: dict[tuple[str, str], int] = {}
            for row in board.worker_rows():
                key = (row["stage"] or "", row["state"])
                by_state[key] = by_state.get(key, 0) + 1
            for (stage, state), n in sorted(by_state.items()):
                workers.add_metric([stage, state], n)
        yield from (jobs, waiting, in_flight, redelivered, oldest, workers)
