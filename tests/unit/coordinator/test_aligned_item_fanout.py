"""chunked_aligned.yaml: one alignment request per chunk, each taking the same chunk's asr
transcript (a same-item reference of the workflow format, nothing alignment-specific in the
coordinator), and the join collecting the aligned chunks in chunk order."""
from __future__ import annotations

from captionbus.contracts import JobStatus, NodeStatus, StageCompleted
from captionbus.coordinator.graph import DEFAULT_WORKFLOWS_DIR, check_stages, load_workflow
from tests.unit.coordinator.test_coordinator_decide import artifact, requested, step, submit
from tests.unit.coordinator.test_item_fanout import OUTPUTS as ITEM_OUTPUTS

ALIGNED = load_workflow(DEFAULT_WORKFLOWS_DIR / "chunked_aligned.yaml")


OUTPUTS = {**ITEM_OUTPUTS, "alignment": ["transcript"]}


def done(node: str, **kw) -> StageCompleted:
    name = node.split("-")[0]
    stage = "asr" if name == "language" else name
    outputs = {o: artifact(f"{node}.{o}") for o in OUTPUTS[name]}
    return StageCompleted(job_id="j1", stage=stage, node=node, attempt=1, outputs=outputs, **kw)


def through_language(n_chunks: int):
    d = submit(ALIGNED)
    assert d.state.nodes["alignment"].status == NodeStatus.waiting  # the stand-in until the count is known
    for node in ("demux", "vad"):
        d = step(d, done(node), ALIGNED)
    d = step(d, done("chunk", items={"chunks": n_chunks}), ALIGNED)
    assert "alignment" not in d.state.nodes
    assert [n for n in d.state.nodes if n.startswith("alignment-")] == [f"alignment-{i}" for i in range(n_chunks)]
    if n_chunks < 2:  # when_items: chunk.chunks > 1; one chunk detects in its own asr request
        assert d.state.nodes["language"].status == NodeStatus.skipped
        return d
    return step(d, done("language"), ALIGNED)


def test_the_workflow_checks_against_the_stage_declarations():
    check_stages(ALIGNED)  # alignment takes `item` (AlignmentParams is ItemParams)


def test_each_chunk_is_aligned_once_with_its_own_transcript_then_joined_in_chunk_order():
    d = through_language(3)
    assert requested(d) == ["asr-0", "asr-1", "asr-2"]
    d = step(d, done("asr-2"), ALIGNED)
    assert requested(d) == ["alignment-2"]  # chunk 2 aligns while 0 and 1 still decode
    align = d.requests[0]
    assert align.stage == "alignment" and align.params["item"] == 2
    assert align.inputs == {"audio": artifact("demux.audio"), "transcript": artifact("asr-2.transcript")}
    d = step(d, done("asr-0"), ALIGNED)
    assert requested(d) == ["alignment-0"] and d.requests[0].inputs["transcript"] == artifact("asr-0.transcript")
    d = step(d, done("alignment-2"), ALIGNED)
    d = step(d, done("alignment-0"), ALIGNED)
    assert requested(d) == []  # the join waits for every chunk's alignment
    d = step(d, done("asr-1"), ALIGNED)
    assert requested(d) == ["alignment-1"]
    d = step(d, done("alignment-1"), ALIGNED)
    assert requested(d) == ["transcript_join"]
    assert d.requests[0].input_lists["transcripts"] == [artifact(f"alignment-{i}.transcript") for i in range(3)]
    aligned_requests = [n for n, s in d.state.nodes.items() if n.startswith("alignment-")]
    assert all(d.state.nodes[n].attempt == 1 for n in aligned_requests)  # each chunk aligned exactly once
    for node in ("transcript_join", "subtitle_gen", "mux"):
        d = step(d, done(node), ALIGNED)
    assert d.state.status == JobStatus.completed


def test_no_speech_aligns_nothing_and_joins_an_empty_list():
    d = through_language(0)
    assert requested(d) == ["transcript_join"] and d.requests[0].input_lists["transcripts"] == []


def test_vad_pyannote_feeds_the_chunk_stage_when_asked():
    """--vad pyannote (job option vad=pyannote): the chunk stage cuts the regions of the
    segmentation model whisperx's own VAD uses (vad_pyannote stage) and the Silero node is skipped."""
    d = submit(ALIGNED, options={"vad": "pyannote"})
    assert d.state.nodes["vad"].status == NodeStatus.skipped
    d = step(d, done("demux"), ALIGNED)
    assert requested(d) == ["vad_pyannote"]
    d = step(d, StageCompleted(job_id="j1", stage="vad_pyannote", node="vad_pyannote", attempt=1,
                               outputs={"regions": artifact("vad_pyannote.regions")}), ALIGNED)
    assert requested(d) == ["chunk"] and d.requests[0].inputs == {"regions": artifact("vad_pyannote.regions")}
