"""The job's stored record (JobState.stored(), what the coordinator writes to its KV key): each
worker summary once, nodes naming theirs; loads back to the same state; records of older
coordinators (summaries on the nodes) and the inline form of `status --json` load too."""
from __future__ import annotations

import json

import pytest

from captionbus.contracts import JobSpec, JobState, NodeState, NodeStatus
from captionbus.contracts.artifacts import ArtifactRef


def summary(replica: int) -> dict[str, str]:
    return {"worker_id": f"gpu-1/asr/{replica}/{4000 + replica}", "env": "whisperx", "host": "gpu-1",
            "interpreter": "/envs/whisperx/bin/python", "pkg.torch": "2.7.1"}


def chunked_state(chunks: int = 6) -> JobState:
    spec = JobSpec(job_id="j1", input=ArtifactRef(key="a" * 64, name="film.mp4", size=1))
    state = JobState(spec=spec)
    state.nodes["demux"] = NodeState(stage="demux", status=NodeStatus.completed, attempt=1,
                                     worker={"worker_id": "cpu-1/demux/0/7", "env": "common"})
    for i in range(chunks):
        state.nodes[f"asr-{i}"] = NodeState(stage="asr", status=NodeStatus.completed, attempt=1,
                                            worker=summary(i % 2), params={"item": i})
    state.nodes["mux"] = NodeState(stage="mux")  # not run yet: no worker
    return state


def test_the_stored_record_holds_each_worker_once_and_loads_back_to_the_same_state():
    state = chunked_state()
    record = json.loads(state.stored())
    assert record["workers"] == {"w0": {"worker_id": "cpu-1/demux/0/7", "env": "common"},
                                 "w1": summary(0), "w2": summary(1)}
    assert record["worker_refs"] == {"demux": "w0", **{f"asr-{i}": ["w1", "w2"][i % 2] for i in range(6)}}
    assert all("worker" not in node for node in record["nodes"].values())
    assert record["nodes"]["mux"] == {"stage": "mux", "status": "waiting", "attempt": 0, "retry_base": 0,
                                      "outputs": {}, "progress": 0.0, "metrics": {}, "params": {},
                                      "items": {}}  # nulls left out, read as their defaults
    loaded = JobState.model_validate_json(state.stored())
    assert loaded == state and loaded.workers == loaded.worker_refs == {} and loaded.nodes["asr-3"].worker == summary(1)
    assert loaded.stored() == state.stored()


def test_the_table_is_smaller_than_the_summaries_it_replaces():
    state = chunked_state(240)
    inline = len(state.model_dump_json())
    stored = len(state.stored())
    assert inline - stored > 239 * len(json.dumps(summary(0), separators=(",", ":"))) * 0.8, (inline, stored)


def test_other_dumps_keep_each_nodes_worker_inline_and_both_forms_load():
    """`status --json` and `run`'s job.json dump the state as before the table; a record an older
    coordinator wrote has the same shape and loads the same."""
    state = chunked_state()
    shown = json.loads(state.model_dump_json())
    assert shown["workers"] == shown["worker_refs"] == {} and shown["nodes"]["asr-1"]["worker"] == summary(1)
    older = json.loads(state.model_dump_json())
    del older["workers"], older["worker_refs"]
    assert JobState.model_validate(older) == JobState.model_validate(shown) == state


def test_a_record_naming_a_worker_its_table_lacks_is_refused_naming_both():
    record = json.loads(chunked_state().stored())
    del record["workers"]["w2"]
    with pytest.raises(ValueError, match=r"worker_refs names 'w2' for node asr-1: the record's nodes or workers \(w0, w1\) lack it"):
        JobState.model_validate(record)
    record = json.loads(chunked_state().stored())
    record["worker_refs"]["gone"] = "w0"
    with pytest.raises(ValueError, match="worker_refs names 'w0' for node gone"):
        JobState.model_validate(record)


def test_a_summary_on_the_record_of_an_older_coordinator_is_read_from_there_without_the_bus():
    import asyncio

    from captionbus.client import speaker_turns, with_record_parts
    from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns, TurnSummary

    summary = TurnSummary.of(SpeakerTurns(duration=5, speakers=["A"], turns=[SpeakerTurn(start=0, end=2, speaker="A")]))
    older = chunked_state()
    older.nodes["diarization"] = NodeState(stage="diarization", status=NodeStatus.completed, speaker_turns=summary)
    older = JobState.model_validate_json(older.model_dump_json())  # as an older coordinator stored it
    assert asyncio.run(speaker_turns(None, older, "diarization")) == summary  # no bus: never read
    assert asyncio.run(speaker_turns(None, older, "demux")) is None
    assert asyncio.run(with_record_parts(None, older)) == older
