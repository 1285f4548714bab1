"""The job's stored record (JobState.stored(), what the coordinator writes to its KV key): each
completed node named by its part (written once, under a key of its own), each worker summary of
the other nodes once; loads back, with its parts, to the same state; records of older
coordinators (every node inline, summaries on the nodes) and the inline form of `status --json`
load too."""
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
    assert record["nodes"]["mux"] == {"stage": "mux"}  # a node's defaults left out, read as such
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


# ---- a small head plus each completed node written once (JobState.parts, NodeState.part) -------------


def parted(state: JobState) -> tuple[JobState, dict[str, bytes]]:
    """`state` with each completed node as decide() leaves it (its part named), and the parts."""
    from captionbus.contracts import subjects

    parts = {}
    for node in state.nodes.values():
        if node.status == NodeStatus.completed:
            node.part = subjects.part_name(node.stored())
            parts[node.part] = node.stored()
    return state, parts


def test_a_record_names_each_completed_nodes_part_in_its_place_and_reads_back_whole():
    state, parts = parted(chunked_state())
    record = json.loads(state.stored())
    assert list(record["nodes"]) == list(state.nodes)  # the order kept
    assert record["nodes"]["asr-3"] == state.nodes["asr-3"].part and len(record["nodes"]["asr-3"]) == 20
    assert record["nodes"]["mux"] == {"stage": "mux"}  # defaults left out
    assert record["workers"] == {} and "gpu-1" not in state.stored().decode()  # workers: in the parts
    head = JobState.model_validate_json(state.stored())
    assert not head.whole and set(head.parts) == {"demux", *(f"asr-{i}" for i in range(6))}
    assert set(head.nodes) == {"mux"}
    whole = head.with_parts(parts)
    assert whole.whole and list(whole.nodes) == list(state.nodes)
    assert whole.model_dump_json() == state.model_dump_json()
    assert "part" not in whole.model_dump()["nodes"]["asr-3"] and "parts" not in whole.model_dump()
    assert whole.stored() == state.stored()  # and writes back the same


def test_a_head_missing_a_part_a_part_not_its_names_bytes_and_storing_a_head_are_refused():
    from captionbus.contracts.jobs import MissingParts

    state, parts = parted(chunked_state())
    head = JobState.model_validate_json(state.stored())
    gone = state.nodes["asr-2"].part
    with pytest.raises(MissingParts, match=f"names 1 part.*{gone}") as missing:
        head.with_parts({k: v for k, v in parts.items() if k != gone})
    assert missing.value.names == [gone]
    with pytest.raises(ValueError, match=f"record part {gone}: its bytes are not the part of that name"):
        head.with_parts({**parts, gone: parts[gone].replace(b"gpu-1", b"gpu-9")})
    with pytest.raises(ValueError, match="a record read without its parts cannot be stored"):
        head.stored()


def test_a_head_is_not_dumped_without_its_completed_nodes():
    """`parts` is never dumped: a head's dump held its open nodes only (`nodes: ['mux']`) and
    loaded back as a whole state without the completed ones (review of 5ae3b0d). Every dump of
    a head's nodes is refused; its dumps without them, and the whole state's, are as before."""
    state, parts = parted(chunked_state())
    head = JobState.model_validate_json(state.stored())
    for dump in (head.model_dump_json, head.model_dump, lambda: head.model_dump(mode="json"),
                 lambda: JobState.model_validate(head.model_dump()), lambda: head.model_dump(include={"nodes"})):
        with pytest.raises(ValueError, match="a record read without its parts .7 completed nodes. cannot be dumped"):
            dump()
    assert json.loads(head.model_dump_json(exclude={"nodes"}))["status"] == "pending"
    whole = JobState.model_validate_json(head.with_parts(parts).model_dump_json())
    assert whole.whole and list(whole.nodes) == list(state.nodes)


def test_records_of_older_coordinators_read_whole_and_their_part_keys_still_read():
    """Every node inline (before parts), with or without the worker table, and a speaker summary
    key of the form before part names (`_.<job>.<node>.turns.<attempt>`): whole as read."""
    older = chunked_state()
    older.nodes["diarization"] = NodeState(stage="diarization", status=NodeStatus.completed, attempt=1,
                                           speaker_turns_key="_.j1.diarization.turns.1")
    for record in (older.model_dump_json(), older.stored()):
        read = JobState.model_validate_json(record)
        assert read.whole and read.with_parts({}) is read
        assert read.model_dump_json() == older.model_dump_json()


def test_part_keys_are_safe_for_every_node_id_a_workflow_can_make():
    """A part's key never holds its node's id (review: `job_part_key` validated it as a NATS
    token, so a fan-out item of an odd name made decide raise): it is named by the SHA-256 of
    the part's bytes, base32, so any node id and any bytes give a valid key of three tokens under
    the job's key prefix; a name that is not such a digest is refused."""
    from captionbus.contracts import subjects
    from captionbus.contracts.ids import validate_token

    odd = ["asr-0", "translation-pt-BR", "x" * 64, "a_b-c", "mux", "-", "_", "9"]
    spec = JobSpec(job_id="acme_j1", input=ArtifactRef(key="a" * 64, name="film.mp4", size=1))
    state = JobState(spec=spec, nodes={n: NodeState(stage="asr", status=NodeStatus.completed, attempt=1,
                                                    params={"item": n}) for n in odd})
    state, parts = parted(state)
    for node_id, node in state.nodes.items():
        key = subjects.job_part_key("acme_j1", node.part)
        tenant, job, name = key.split(".")
        assert (tenant, job) == ("acme", "acme_j1") and validate_token(name) and not subjects.is_job_key(key)
        assert node_id not in name
    assert JobState.model_validate_json(state.stored()).with_parts(parts).model_dump_json() == state.model_dump_json()
    for value in (b"", b"\x00\xff", "ünïcode.*>".encode(), b"x" * 100_000):
        assert subjects.is_part_name(subjects.part_name(value))
    for bad in ("asr-0", "asr.turns.1", "*", ">", "a" * 20, "A" * 19, "A" * 21, "AAAAAAAAAAAAAAAAAAA1"):
        with pytest.raises(ValueError, match="invalid record part name"):
            subjects.job_part_key("j1", bad)


def test_a_films_record_read_back_from_its_head_and_parts_is_the_record_the_coordinator_held():
    """benchmarks/job_state.py's film (chunked, speakers) through decide(): the last record
    written, with the parts written before it, reads back as the state decide() held (what the
    coordinator wrote whole before parts); each part was written once, and the head holds no
    completed node's outputs, metrics or worker."""
    from benchmarks.job_state import simulate
    from captionbus.contracts import subjects

    film = simulate(24, 4, True)
    values, held = film["values"], film["state"]
    job_key = subjects.job_key(held.job_id)
    parts = [(key, value) for key, value in values if key != job_key]
    assert len({key for key, _ in parts}) == len(parts), "a part written twice"
    head = JobState.model_validate_json(next(value for key, value in reversed(values) if key == job_key))
    whole = head.with_parts({key.rpartition(".")[2]: value for key, value in parts})
    assert whole.model_dump_json() == held.model_dump_json()
    completed = [n for n in held.nodes.values() if n.status == NodeStatus.completed]
    assert len(completed) == len(head.parts) and not any(n.outputs or n.worker for n in head.nodes.values())
    assert held.nodes["diarization"].speaker_turns_key in dict(parts)
