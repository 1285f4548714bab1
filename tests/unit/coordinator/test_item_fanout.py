"""for_each over a stage's list output (chunk.chunks): one asr node per chunk, appearing when the
chunk stage completes; a window of items in flight; a failed chunk fails the job naming it."""
from __future__ import annotations

import pytest

from captionbus.contracts import JobStatus, NodeStatus, StageCompleted
from captionbus.coordinator.graph import DEFAULT_WORKFLOWS_DIR, Workflow, WorkflowError, check_stages, load_workflow
from captionbus.coordinator.decide import Tick, decide
from tests.unit.coordinator.test_coordinator_decide import (
    OUTPUTS,
    POLICY,
    T0,
    artifact,
    failed,
    kinds,
    requested,
    step,
    submit,
)

CHUNKED = load_workflow(DEFAULT_WORKFLOWS_DIR / "chunked.yaml")
OUTPUTS = {**OUTPUTS, "vad": ["regions"], "chunk": ["chunks", "language"], "language": ["language"],
           "transcript_join": ["transcript"]}


def done(node: str, attempt: int = 1, **kw) -> StageCompleted:
    name = node.split("-")[0]
    stage = "asr" if name == "language" else name
    outputs = {o: artifact(f"{node}.{o}") for o in OUTPUTS[name]}
    return StageCompleted(job_id="j1", stage=stage, node=node, attempt=attempt, outputs=outputs, **kw)


def through_language(n_chunks: int):
    d = submit(CHUNKED)
    assert "asr" in d.state.nodes and d.state.nodes["asr"].status == NodeStatus.waiting  # the stand-in
    for node in ("demux", "vad"):
        d = step(d, done(node), CHUNKED)
    assert requested(d) == ["chunk"]
    d = step(d, done("chunk", items={"chunks": n_chunks}), CHUNKED)
    assert "asr" not in d.state.nodes  # the stand-in left; the chunks' nodes came
    assert [n for n in d.state.nodes if n.startswith("asr-")] == [f"asr-{i}" for i in range(n_chunks)]
    if n_chunks < 2:  # when_items: chunk.chunks > 1; one chunk detects in its own asr request
        assert d.state.nodes["language"].status == NodeStatus.skipped
        return d
    assert requested(d) == ["language"]
    return step(d, done("language"), CHUNKED)


def test_one_asr_request_per_chunk_within_the_window_then_join_in_order():
    d = through_language(10)
    first = d.requests
    assert [r.node for r in first] == [f"asr-{i}" for i in range(8)]  # max_in_flight: 8
    assert [r.params["item"] for r in first] == list(range(8))
    assert first[3].inputs == {"audio": artifact("demux.audio"), "chunks": artifact("chunk.chunks"),
                               "language": artifact("language.language")}
    d = step(d, done("asr-5"), CHUNKED)
    assert requested(d) == ["asr-8"]  # one finished, the next goes
    d = step(d, done("asr-0"), CHUNKED)
    assert requested(d) == ["asr-9"]
    for i in [1, 2, 3, 4, 6, 7, 8, 9]:
        assert requested(d := step(d, done(f"asr-{i}"), CHUNKED)) == ([] if i < 9 else ["transcript_join"])
    join = d.requests[0]
    assert join.input_lists["transcripts"] == [artifact(f"asr-{i}.transcript") for i in range(10)]
    for node in ("transcript_join", "subtitle_gen", "mux"):
        d = step(d, done(node), CHUNKED)
    assert d.state.status == JobStatus.completed
    assert d.state.outputs["transcript"] == artifact("transcript_join.transcript")


def through_language_with(workers: dict[str, int], n_chunks: int):
    d = submit(CHUNKED)
    for node in ("demux", "vad", "chunk", "language"):
        extra = {"items": {"chunks": n_chunks}} if node == "chunk" else {}
        d = decide(d.state, done(node, **extra), CHUNKED, T0, POLICY, workers)
    return d


def test_the_window_is_the_live_workers_of_the_stage_within_max_in_flight():
    d = through_language_with({"asr": 2}, 10)
    assert requested(d) == ["asr-0", "asr-1"]  # two workers: one chunk each, none queued
    d = decide(d.state, done("asr-0"), CHUNKED, T0, POLICY, {"asr": 2})
    assert requested(d) == ["asr-2"]
    d = decide(d.state, Tick(T0), CHUNKED, T0, POLICY, {"asr": 3})  # a worker joined: the next tick
    assert requested(d) == ["asr-3"]
    d = decide(d.state, Tick(T0), CHUNKED, T0, POLICY, {"asr": 3})
    assert requested(d) == []  # full
    d = decide(d.state, done("asr-1"), CHUNKED, T0, POLICY, {"asr": 1})  # two left: nothing new until one is done
    assert requested(d) == []
    d = decide(d.state, done("asr-2"), CHUNKED, T0, POLICY, {"asr": 1})
    assert requested(d) == []
    d = decide(d.state, done("asr-3"), CHUNKED, T0, POLICY, {"asr": 1})
    assert requested(d) == ["asr-4"]


def test_the_window_has_a_floor_of_one_and_a_ceiling_of_max_in_flight():
    assert requested(through_language_with({"asr": 0}, 10)) == ["asr-0"]  # waits for a worker to start
    assert len(requested(through_language_with({"asr": 40}, 10))) == 8  # chunked.yaml: max_in_flight 8
    assert len(requested(through_language_with({"vad": 3}, 10))) == 8  # asr not counted: the ceiling


def test_no_speech_means_no_chunk_and_an_empty_join():
    d = through_language(0)
    assert requested(d) == ["transcript_join"] and d.requests[0].input_lists["transcripts"] == []


def test_a_failed_chunk_fails_the_job_and_names_the_chunk():
    d = through_language(3)
    d = step(d, failed("asr-1", reason="the WAV is cut short"), CHUNKED)
    assert d.state.status == JobStatus.failed
    assert d.state.error == "stage asr (asr-1: item 1 of chunk.chunks) failed: the WAV is cut short"
    assert {d.state.nodes[n].status for n in ("asr-0", "asr-2")} == {NodeStatus.cancelled}
    assert kinds(d)[-1] == "failed"


def test_a_retryable_chunk_failure_retries_that_chunk_only():
    d = through_language(3)
    d = step(d, failed("asr-2", retryable=True), CHUNKED)
    assert d.state.nodes["asr-2"].status == NodeStatus.retry_wait
    assert d.state.nodes["asr-0"].status == NodeStatus.requested and d.state.status == JobStatus.running


def test_for_each_must_name_a_list_output():
    data = {"name": "bad", "nodes": {
        "demux": {"inputs": {"media": "job.input"}, "outputs": ["audio"]},
        "asr": {"for_each": "demux.audio", "inputs": {"audio": "demux.audio"}, "outputs": ["transcript"]},
    }}
    with pytest.raises(WorkflowError, match="stage demux does not list items in 'audio'"):
        check_stages(Workflow.from_dict(data))
    data["nodes"]["asr"]["for_each"] = "demux.nothing"
    with pytest.raises(WorkflowError, match="refers to demux.nothing"):
        Workflow.from_dict(data)
    data["nodes"]["asr"]["for_each"] = "demux.audio"
    data["nodes"]["sub"] = {"stage": "subtitle_gen", "inputs": {"transcript": "asr.transcript"}, "outputs": ["srt"]}
    with pytest.raises(WorkflowError, match="collect them with input_lists"):
        Workflow.from_dict(data)


def test_cancel_stops_every_open_chunk_and_retry_reruns_only_those():
    from captionbus.contracts import JobCancelRequested, JobRetryRequested

    d = through_language(4)
    d = step(d, done("asr-0"), CHUNKED)
    d = step(d, JobCancelRequested(job_id="j1"), CHUNKED)
    assert d.state.status == JobStatus.cancelled
    assert [d.state.nodes[f"asr-{i}"].status for i in range(4)] == [
        NodeStatus.completed, NodeStatus.cancelled, NodeStatus.cancelled, NodeStatus.cancelled]
    d = step(d, JobRetryRequested(job_id="j1"), CHUNKED)
    assert requested(d) == ["asr-1", "asr-2", "asr-3"]  # the finished chunk is not redone
    assert [r.attempt for r in d.requests] == [2, 2, 2]


def test_a_duplicate_or_stale_chunk_result_changes_nothing():
    d = through_language(2)
    d = step(d, done("asr-0"), CHUNKED)
    again = step(d, done("asr-0"), CHUNKED)  # a redelivered request's second completion
    assert not again.changed and again.state.nodes["asr-0"].status == NodeStatus.completed
    assert not step(d, done("asr-9"), CHUNKED).changed  # no such chunk



def test_with_the_language_given_no_detection_request_waits_in_the_asr_queue():
    d = submit(CHUNKED, source_language="en")
    assert d.state.nodes["language"].status == NodeStatus.skipped
    for node in ("demux", "vad"):
        d = step(d, done(node), CHUNKED)
    d = step(d, done("chunk", items={"chunks": 2}), CHUNKED)
    assert requested(d) == ["asr-0", "asr-1"]  # straight to the chunks
    assert d.requests[0].inputs["language"] == artifact("chunk.language")
    assert d.requests[0].params["source_language"] == "en"


@pytest.mark.parametrize("workflow", ["chunked", "transcribe"])
def test_one_chunk_makes_no_detection_request_and_decodes_with_the_chunk_stages_language(workflow):
    """A clip (one chunk) detects its language in its one asr request: no `language` request,
    asr-0 and the join read the chunk stage's language (null without -s, so the asr request
    detects); several chunks still detect once, first."""
    graph = load_workflow(DEFAULT_WORKFLOWS_DIR / f"{workflow}.yaml")
    d = submit(graph)
    assert d.state.nodes["language"].status == NodeStatus.waiting  # until the count is known
    for node in ("demux", "vad"):
        d = step(d, done(node), graph)
    d = step(d, done("chunk", items={"chunks": 1}), graph)
    assert requested(d) == ["asr-0"]
    assert d.state.nodes["language"].status == NodeStatus.skipped
    assert d.requests[0].inputs["language"] == artifact("chunk.language")
    d = step(d, done("asr-0"), graph)
    assert requested(d) == ["transcript_join"]
    assert d.requests[0].inputs["language"] == artifact("chunk.language")
    stages = [r.stage for r in d.state.nodes.values() if r.attempt]
    assert stages.count("asr") == 1  # one asr request in the whole job
    assert not step(d, done("language"), graph).changed  # a stray detection result changes nothing


def test_a_chunk_worker_of_before_without_a_language_output_leaves_it_out_of_a_clips_requests():
    """Rolling upgrade: an old chunk worker writes `language` only with -s. asr and
    transcript_join declare `language` optional: their requests go without it (asr then uses
    asr.language or detects), instead of the job failing with "chunk finished without its
    'language' output"."""
    d = submit(CHUNKED)
    for node in ("demux", "vad"):
        d = step(d, done(node), CHUNKED)
    old_chunk = StageCompleted(job_id="j1", stage="chunk", node="chunk", attempt=1,
                               outputs={"chunks": artifact("chunk.chunks")}, items={"chunks": 1})
    d = step(d, old_chunk, CHUNKED)
    assert requested(d) == ["asr-0"]
    assert "language" not in d.requests[0].inputs and "chunks" in d.requests[0].inputs
    d = step(d, done("asr-0"), CHUNKED)
    assert requested(d) == ["transcript_join"]
    assert "language" not in d.requests[0].inputs
    assert d.state.status == JobStatus.running


def test_a_missing_required_output_still_fails_the_job():
    d = submit(CHUNKED)
    d = step(d, done("demux"), CHUNKED)
    d = step(d, StageCompleted(job_id="j1", stage="vad", node="vad", attempt=1, outputs={}), CHUNKED)
    assert d.state.status == JobStatus.failed
    assert "vad finished without its 'regions' output, which chunk needs" in d.state.nodes["chunk"].error


def test_the_language_node_waits_for_the_chunk_count_and_two_chunks_detect_once():
    d = submit(CHUNKED)
    for node in ("demux", "vad"):
        d = step(d, done(node), CHUNKED)
    assert requested(d) == ["chunk"]  # not the language node: the count is not known yet
    d = step(d, done("chunk", items={"chunks": 2}), CHUNKED)
    assert requested(d) == ["language"]
    d = step(d, done("language"), CHUNKED)
    assert requested(d) == ["asr-0", "asr-1"]
    assert {r.inputs["language"] for r in d.requests} == {artifact("language.language")}


def test_when_items_must_count_a_list_output():
    data = {"name": "bad", "nodes": {
        "demux": {"inputs": {"media": "job.input"}, "outputs": ["audio"]},
        "asr": {"when_items": "demux.audio > 1", "inputs": {"audio": "demux.audio"}, "outputs": ["transcript"]},
    }}
    with pytest.raises(WorkflowError, match="when_items demux.audio: stage demux does not list items in 'audio'"):
        check_stages(Workflow.from_dict(data))
    for bad in ("demux.audio", "demux.audio > x", "job.input > 1", "options.x > 1 and y"):
        data["nodes"]["asr"]["when_items"] = bad
        with pytest.raises(WorkflowError, match="when_items"):
            Workflow.from_dict(data)
    data["nodes"]["asr"]["when_items"] = "demux.nothing > 1"
    with pytest.raises(WorkflowError, match="refers to demux.nothing"):
        Workflow.from_dict(data)
