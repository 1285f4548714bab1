"""The dashboard's pure parts: job summaries and filters, the job page's timeline, the fan-out."""
from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest

from captionbus.dashboard.auth import AuthError, check_bind, parse_listen, token_from_env
from captionbus.dashboard.board import (
    Fanout, job_detail, job_summary, matches, parse_time, realtime_factor, speaker_lane, speaker_node,
)
from captionbus.contracts import ArtifactRef, JobSpec, JobState
from captionbus.contracts.jobs import JobStatus, NodeState, NodeStatus
from captionbus.contracts.speech import MAX_SUMMARY_TURNS, SpeakerTurn, SpeakerTurns, TurnSummary
from captionbus.core.settings import Settings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def state() -> JobState:
    spec = JobSpec(job_id="job-abc", workflow="translate", source_language="hi", target_languages=["en", "ta"],
                   input=ArtifactRef(key="0" * 64, name="Film Night.mp4", size=5))
    nodes = {
        "demux": NodeState(stage="demux", status=NodeStatus.completed, attempt=1, requested_at=T0,
                           finished_at=T0 + timedelta(seconds=2), metrics={"media_duration_s": 100.0, "handle_s": 1.5},
                           worker={"worker_id": "w1", "env": "common", "interpreter": "/e/common/bin/python"}),
        "asr": NodeState(stage="asr", status=NodeStatus.completed, attempt=2, requested_at=T0 + timedelta(seconds=2),
                         finished_at=T0 + timedelta(seconds=52), metrics={"handle_s": 40.0, "delivery": 2.0}),
        "translation-ta": NodeState(stage="translation_nllb", status=NodeStatus.failed, attempt=1,
                                    error="no route", metrics={"realtime_factor": 0.5}),
    }
    return JobState(spec=spec, status=JobStatus.completed, nodes=nodes, created_at=T0,
                    failed_branches={"ta": "no route"},
                    outputs={"srt": ArtifactRef(key="1" * 64, name="subs.srt", size=321)})


def test_summary_and_filters():
    summary = job_summary(state())
    assert [n["node"] for n in summary["nodes"]] == ["demux", "asr", "translation-ta"]
    assert summary["input"] == "Film Night.mp4" and summary["failed_branches"] == {"ta": "no route"}
    assert matches(summary, status="completed", workflow="translate", language="ta", text="film night")
    assert matches(summary, text="JOB-ABC")
    assert not matches(summary, status="failed")
    assert not matches(summary, language="fr")
    assert matches(summary, since=parse_time("2026-03-01T11:59:59Z"), until=parse_time("2026-03-01"+"T12:00:00+00:00"))
    assert not matches(summary, since=parse_time("2026-03-01T13:00:00+01:00") + 1)
    assert parse_time("2026-03-01T12:00:00") == T0.timestamp()  # no zone: UTC
    assert parse_time("") is None
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        parse_time("yesterday")


def test_realtime_factor_own_or_from_media_duration():
    s = state()
    assert realtime_factor(s, "translation-ta") == 0.5
    assert realtime_factor(s, "asr") == pytest.approx(0.4)


def test_job_detail_timeline_warnings_retries_and_outputs():
    def ev(kind, node, attempt, seconds, **extra):
        return {"kind": kind, "node": node, "stage": node, "attempt": attempt,
                "time": (T0 + timedelta(seconds=seconds)).isoformat(), **extra}

    events = [
        ev("stage_requested", "demux", 1, 0), ev("stage_completed", "demux", 1, 2, worker={"env": "common"}),
        ev("stage_requested", "asr", 1, 2), ev("stage_failed", "asr", 1, 10, reason="busy", retryable=True),
        ev("stage_requested", "asr", 2, 12), ev("stage_warning", "asr", 2, 20, message="kept ASR word times"),
        ev("stage_completed", "asr", 2, 52, metrics={"delivery": 2.0}),
    ]
    detail = job_detail(state(), events)
    assert [(a["node"], a["attempt"], a["status"], a["duration_s"]) for a in detail["timeline"]] == [
        ("demux", 1, "completed", 2.0), ("asr", 1, "failed", 8.0), ("asr", 2, "completed", 40.0)]
    assert detail["timeline"][2]["delivery"] == 2.0
    assert detail["retries"] == [{"node": "asr", "attempt": 1, "reason": "busy"}]
    assert [w["message"] for w in detail["warnings"]] == ["kept ASR word times"]
    asr = next(n for n in detail["nodes"] if n["node"] == "asr")
    assert asr["redeliveries"] == 1 and asr["duration_s"] == 50.0
    assert detail["outputs"] == [{"name": "srt", "file": "subs.srt", "size": 321, "download": None}]
    assert detail["downloads"] is False
    assert job_detail(state(), events, downloads=True)["outputs"][0]["download"] == "/api/jobs/job-abc/outputs/srt"
    # the failed translation node's reason, classed from its text (a state written before classes)
    ta = next(n for n in detail["nodes"] if n["node"] == "translation-ta")
    assert ta["failure_class"] == "internal" and asr["failure_class"] is None
    json.dumps(detail)  # what the endpoint sends


def test_failure_class_and_progress_notes_in_summaries():
    failed = state().model_copy(update={"status": JobStatus.failed, "failure_class": "setup",
                                        "error": "stage asr (asr) failed: asr cannot be served on host h: x"})
    assert job_summary(failed)["failure_class"] == "setup"
    older = failed.model_copy(update={"failure_class": None})
    assert job_summary(older)["failure_class"] == "setup"  # from the recorded reason
    assert job_summary(state().model_copy(update={"status": JobStatus.cancelled}))["failure_class"] == "cancelled"
    assert job_summary(state())["failure_class"] is None
    summary = job_summary(state(), {"asr": "loading model"})
    assert [n["message"] for n in summary["nodes"]] == ["", "loading model", ""]


def test_job_detail_without_events_takes_the_timeline_from_job_state():
    detail = job_detail(state(), [])
    assert [(a["node"], a["attempt"], a["status"], a["duration_s"]) for a in detail["timeline"]] == [
        ("demux", 1, "completed", 2.0), ("asr", 2, "completed", 50.0)]  # translation-ta was never requested


def test_the_speaker_lane_is_the_turns_on_the_diarization_nodes_record():
    """The diarization node's record carries its turns (TurnSummary.of the stage's SpeakerTurns), so
    the lane needs no artifact read: the turns as they are, up to MAX_SUMMARY_TURNS (then the first
    ones and turns_truncated), and every speaker's seconds and turns counted over all of them."""
    count = MAX_SUMMARY_TURNS + 500
    turns = SpeakerTurns(duration=count * 2.0, speakers=["Anna", "SPEAKER_01"], requested="2",
                         turns=[SpeakerTurn(start=2.0 * n, end=2.0 * n + (1.5 if n % 2 else 1.0),
                                            speaker="SPEAKER_01" if n % 2 else "Anna") for n in range(count)])
    summary = TurnSummary.of(turns)
    assert summary.turns_total == count and summary.turns_truncated and len(summary.turns) == MAX_SUMMARY_TURNS
    assert len(summary.model_dump_json()) < 50_000  # what the job state carries on every write
    record = state()
    record.nodes["who"] = NodeState(stage="diarization", status=NodeStatus.completed, attempt=1,
                                    speaker_turns=summary)
    record = JobState.model_validate_json(record.model_dump_json())  # as the KV holds it
    assert speaker_node(record) == "who" and job_detail(record, [])["speakers_node"] == "who"
    lane = speaker_lane("who", record.nodes["who"].speaker_turns)
    assert lane["turns"] == [t.model_dump() for t in turns.turns[:MAX_SUMMARY_TURNS]]
    assert (lane["turns_total"], lane["turns_truncated"]) == (count, True)
    assert [(s["label"], s["seconds"], s["turns"], s["share"]) for s in lane["speakers"]] == [
        ("Anna", 1250.0, 1250, 0.4), ("SPEAKER_01", 1875.0, 1250, 0.6)]
    short = speaker_lane("who", TurnSummary.of(SpeakerTurns(duration=3, speakers=["SPEAKER_00"], turns=turns.turns[:2])))
    assert short["turns_truncated"] is False and [s["label"] for s in short["speakers"]] == ["SPEAKER_00", "Anna",
                                                                                              "SPEAKER_01"]
    with pytest.raises(ValueError, match="names speaker 2 of 1"):
        TurnSummary(duration=1, speakers=[{"label": "A", "seconds": 1, "turns": 1}], turns=[(0, 1, 2)], turns_total=1)
    older = {"duration": 1, "speakers": [{"label": "A", "seconds": 1, "turns": 2}], "turns": [(0, 1, 0)],
             "turns_total": 2, "turns_truncated": False}  # stored by an older stage: ignored, derived
    # and written out as derived (a computed field), for JSON readers and older coordinators
    assert TurnSummary.model_validate(older).turns_truncated and TurnSummary(**older).model_dump()["turns_truncated"]
    with pytest.raises(ValueError, match="the speakers' turns add up to 2, not the 3 turns"):
        TurnSummary(**{**older, "turns_total": 3})
    with pytest.raises(ValueError, match="2 turns listed for 'B', who has 1"):
        TurnSummary(duration=1, speakers=[{"label": "A", "seconds": 1, "turns": 1}, {"label": "B", "seconds": 1, "turns": 1}],
                    turns=[(0, 1, 1), (1, 2, 1)], turns_total=2)
    with pytest.raises(ValueError):
        TurnSummary(duration=1, turns=[(0, 1, 0)] * (MAX_SUMMARY_TURNS + 1), turns_total=MAX_SUMMARY_TURNS + 1,
                    turns_truncated=True)
    no_record = state()
    no_record.nodes["who"] = NodeState(stage="diarization", status=NodeStatus.completed, attempt=1)
    assert speaker_node(no_record) == "who" and no_record.nodes["who"].speaker_turns is None


def test_fanout_drops_the_oldest_for_a_slow_page_only():
    async def main():
        fanout = Fanout(depth=3)
        slow, fast = fanout.subscribe(), fanout.subscribe()
        got = []
        for n in range(5):
            fanout.publish("event", {"n": n})
            got.append(json.loads((await fast.get())[1])["n"])  # keeps up: loses nothing
        assert [json.loads((await slow.get())[1])["n"] for _ in range(3)] == [2, 3, 4]  # the newest 3
        fanout.unsubscribe(slow)
        fanout.publish("event", {"n": 5})
        got.append(json.loads((await fast.get())[1])["n"])
        assert slow.empty() and got == [0, 1, 2, 3, 4, 5]
    asyncio.run(main())


def test_binds_and_tokens(tmp_path):
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80) and parse_listen("[::1]:8765") == ("::1", 8765)
    with pytest.raises(AuthError, match="HOST:PORT"):
        parse_listen("8765")
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "dash.example.org"):
        with pytest.raises(AuthError, match="without auth"):
            check_bind(host, None)
        check_bind(host, "t")
    token = tmp_path / "token"
    token.write_text("abc\n")
    assert token_from_env(Settings(dashboard_token_file=token, dashboard_token="x")) == "abc"
    assert token_from_env(Settings(dashboard_token="x")) == "x" and token_from_env(Settings()) is None
    with pytest.raises(AuthError, match="no-such"):
        token_from_env(Settings(dashboard_token_file=tmp_path / "no-such"))


def test_charts_count_the_last_hour_by_nearest_rank():
    """Durations and queue waits of the attempts that finished in the window (a cache hit has no
    wait), jobs per minute by creation and by end, and nearest-rank percentiles."""
    from captionbus.dashboard.stats import charts, percentile

    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    now = T0 + timedelta(hours=2)
    old = state().model_copy(update={"updated_at": T0})  # finished two hours before `now`: outside the window
    recent = state().model_copy(update={"created_at": now - timedelta(seconds=90),
                                        "updated_at": now - timedelta(seconds=30)})
    recent.spec = recent.spec.model_copy(update={"job_id": "job-new"})
    requested = now - timedelta(seconds=80)
    recent.nodes = {
        "demux": NodeState(stage="demux", status=NodeStatus.completed, attempt=1, requested_at=requested,
                           finished_at=requested + timedelta(seconds=4),
                           metrics={"started_at": requested.timestamp() + 1.5}),
        "asr": NodeState(stage="asr", status=NodeStatus.completed, attempt=1, requested_at=requested,
                         finished_at=requested + timedelta(seconds=2), metrics={"cache_hit": 1.0, "started_at": 0.0}),
    }
    data = charts([old, recent], now=now.timestamp())
    assert data["jobs_per_minute"]["submitted_total"] == 1 == data["jobs_per_minute"]["finished_total"]
    assert data["jobs_per_minute"]["submitted"][-2] == 1 and data["jobs_per_minute"]["finished"][-1] == 1
    stages = {s["stage"]: s for s in data["stages"]}
    assert stages["demux"]["duration"] == {"count": 1, "p50": 4.0, "p95": 4.0, "max": 4.0}
    assert stages["demux"]["queue_wait"]["p50"] == 1.5
    assert stages["asr"]["duration"]["count"] == 1 and stages["asr"]["queue_wait"]["count"] == 0
    summary = job_summary(recent)
    assert summary["duration_s"] == 60.0 and job_summary(state().model_copy(update={"status": JobStatus.running}))[
        "duration_s"] is None


def test_the_board_shows_a_record_whole_from_its_head_and_the_parts_its_watch_delivered():
    """The KV watch delivers a record's parts (written first) before the head naming them; the
    board shows the head with its completed nodes read in (JobState.with_parts), the same state
    as the record held whole, takes them from the state it showed when the head is rewritten,
    and keeps that state when a head names a part it never saw."""
    from types import SimpleNamespace

    from captionbus.contracts import subjects
    from captionbus.contracts.jobs import MissingParts
    from captionbus.dashboard.board import Board

    whole = state()
    parts = {}
    for node in whole.nodes.values():
        if node.status == NodeStatus.completed:
            node.part = subjects.part_name(node.stored())
            parts[node.part] = node.stored()
    board = Board(SimpleNamespace(jetstream=lambda: None), [])
    board.parts["job-abc"] = dict(parts)
    shown = board.whole(JobState.model_validate_json(whole.stored()))
    assert shown.model_dump_json() == whole.model_dump_json() and "job-abc" not in board.parts  # finished: dropped
    board.apply_state(shown)
    again = board.whole(JobState.model_validate_json(whole.stored()))  # from the state shown
    assert again.model_dump_json() == whole.model_dump_json()
    whole.nodes["mux"] = NodeState(stage="mux", status=NodeStatus.completed, attempt=1)
    whole.nodes["mux"].part = subjects.part_name(whole.nodes["mux"].stored())
    with pytest.raises(MissingParts):
        board.whole(JobState.model_validate_json(whole.stored()))
