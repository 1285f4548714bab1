"""The decision function, with no server: events in, (state, actions) out."""
from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from captionbus.contracts import (
    ArtifactRef,
    JobCancelRequested,
    JobRetryRequested,
    JobSpec,
    JobStatus,
    JobSubmitted,
    NodeStatus,
    StageCompleted,
    StageFailed,
)
from captionbus.coordinator.decide import NODE_RETRY, Decision, Policy, Tick, decide, give_up
from captionbus.coordinator.graph import DEFAULT_WORKFLOWS_DIR, Workflow, load_workflow
from captionbus.coordinator.service import awaited, outbox_id, request_entry

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
# demux -> asr -> subtitle_gen -> mux: the decide() tests need a linear graph, not today's transcribe
TRANSCRIBE = load_workflow(Path(__file__).parent / "linear.yaml")
FANOUT = load_workflow(Path(__file__).parent / "fanout.yaml")
POLICY = Policy(retry=replace(NODE_RETRY, max_attempts=3, initial_s=2, multiplier=2), stage_deadline_s=60)
INPUT = ArtifactRef(key="0" * 64, name="film.mp4", size=10)
OUTPUTS = {"demux": ["audio", "probe"], "source_separation": ["vocals"], "asr": ["transcript"],
           "translation": ["transcript"], "subtitle_gen": ["srt", "vtt"], "mux": ["mp4", "mkv"]}


def artifact(name: str) -> ArtifactRef:
    return ArtifactRef(key=hashlib.sha256(name.encode()).hexdigest(), name=name, size=1)


def submit(graph=TRANSCRIBE, **kw) -> Decision:
    spec = JobSpec(job_id="j1", input=INPUT, workflow=graph.name, **kw)
    return decide(None, JobSubmitted(job_id="j1", spec=spec), graph, T0, POLICY)


def completed(node: str, attempt: int = 1, stage: str | None = None, **kw) -> StageCompleted:
    stage = stage or node.split("-")[0]
    outputs = {o: artifact(f"{node}.{o}") for o in OUTPUTS[stage]}
    return StageCompleted(job_id="j1", stage=stage, node=node, attempt=attempt, outputs=outputs, **kw)


def failed(node: str, attempt: int = 1, retryable: bool = False, reason: str = "boom") -> StageFailed:
    return StageFailed(job_id="j1", stage=node.split("-")[0], node=node, attempt=attempt,
                       reason=reason, retryable=retryable)


def step(d: Decision, event, graph=TRANSCRIBE, now=T0) -> Decision:
    return decide(d.state, event, graph, now, POLICY)


def requested(d: Decision) -> list[str]:
    return [r.node for r in d.requests]


def kinds(d: Decision) -> list[str]:
    return [e.kind for e in d.events]


def test_happy_path_transcribe():
    d = submit()
    assert d.state.status == JobStatus.running
    assert kinds(d) == ["started", "stage_requested"]
    assert requested(d) == ["demux"]
    demux_request = d.requests[0]
    assert demux_request.inputs == {"media": INPUT}
    assert demux_request.key == "j1.demux.1"
    assert d.events[1].event_id == "j1.demux.1.requested"  # derived, so a re-publish dedups

    d = step(d, completed("demux"))
    assert requested(d) == ["asr"] and d.requests[0].inputs == {"audio": artifact("demux.audio")}
    d = step(d, completed("asr"))
    assert requested(d) == ["subtitle_gen"]
    assert d.requests[0].params["formats"] == ["srt", "vtt"]
    d = step(d, completed("subtitle_gen"))
    mux = d.requests[0]
    assert mux.inputs == {"media": INPUT} and mux.input_lists == {"subtitles": [artifact("subtitle_gen.srt")]}
    d = step(d, completed("mux"))
    assert d.state.status == JobStatus.completed
    assert kinds(d) == ["completed"]
    assert d.events[0].outputs == {
        "srt": artifact("subtitle_gen.srt"), "vtt": artifact("subtitle_gen.vtt"),
        "mp4": artifact("mux.mp4"), "mkv": artifact("mux.mkv"),
    }
    assert d.state.outputs == d.events[0].outputs


def test_a_completions_speaker_turns_go_under_their_own_key_that_the_nodes_record_names():
    """The summary (~42 KB at its cap) is written once, under a key of the job's named by its
    bytes (before the state naming it: decide.PutRecordPart comes with that state), not on the
    record every later event rewrites, nor inside the node's own part (which the coordinator
    reads back; the summary only readers that show it). A job of no tenant's part lies under
    `_`, a tenant's under the tenant's keys."""
    from captionbus.contracts import JobState, subjects
    from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns, TurnSummary
    from captionbus.coordinator.decide import PutRecordPart

    summary = TurnSummary.of(SpeakerTurns(duration=9, speakers=["SPEAKER_00"],
                                          turns=[SpeakerTurn(start=1, end=4, speaker="SPEAKER_00")]))
    value = summary.model_dump_json().encode()
    key = "_.j1." + subjects.part_name(value)
    d = step(step(submit(), completed("demux")), completed("asr", speaker_turns=summary))
    node = d.state.nodes["asr"]
    assert node.speaker_turns is None and node.speaker_turns_key == key
    assert d.parts == [PutRecordPart(key, value), PutRecordPart(f"_.j1.{node.part}", node.stored())]
    assert TurnSummary.model_validate_json(d.parts[0].value) == summary
    assert b"SPEAKER_00" not in d.parts[1].value and key.encode() in d.parts[1].value
    assert d.state.nodes["demux"].speaker_turns_key is None
    assert [p.key for p in step(step(submit(), completed("demux")), completed("asr")).parts] == [
        f"_.j1.{subjects.part_name(d.state.nodes['asr'].model_copy(update={'speaker_turns_key': None}).stored())}"]
    stored = d.state.stored()
    assert b"SPEAKER_00" not in stored and JobState.model_validate_json(stored).parts["asr"] == node.part
    assert subjects.job_part_key("acme_j1", node.part) == f"acme.acme_j1.{node.part}"
    assert not any(map(subjects.is_job_key, [key, f"acme.acme_j1.{node.part}"]))
    assert all(map(subjects.is_job_key, [subjects.job_key("j1"), subjects.job_key("acme_j1")]))


def test_a_completed_node_is_one_part_written_once_and_the_record_names_it_in_its_place():
    """A node that completes is written whole, once, under a key named by its bytes (decide
    returns the write, PutRecordPart, with the state that names it); later decisions write no
    part for it again, and the stored record holds only the name, in the node's place. Deciding
    the same completion again writes the same bytes under the same key."""
    from captionbus.contracts import JobState, NodeState, subjects

    worker = {"worker_id": "gpu-1/asr/0/41", "env": "whisperx", "host": "gpu-1"}
    d1 = step(submit(), completed("demux", worker=worker | {"worker_id": "cpu-1/demux/0/7"}))
    d2 = step(d1, completed("asr", worker=worker, metrics={"seconds": 1.5}))
    assert [p.key for p in d1.parts] == [f"_.j1.{d1.state.nodes['demux'].part}"]
    assert [p.key for p in d2.parts] == [f"_.j1.{d2.state.nodes['asr'].part}"]  # demux's not again
    part = d2.parts[0]
    assert subjects.part_name(part.value) == d2.state.nodes["asr"].part
    assert NodeState.model_validate_json(part.value) == d2.state.nodes["asr"].model_copy(update={"part": None})
    assert NodeState.model_validate_json(part.value).worker == worker  # inline: the part is written once
    assert step(d1, completed("asr", worker=worker, metrics={"seconds": 1.5})).parts == d2.parts
    record = d2.state.stored()
    head = JobState.model_validate_json(record)
    assert head.parts == {"demux": d1.state.nodes["demux"].part, "asr": d2.state.nodes["asr"].part}
    assert list(__import__("json").loads(record)["nodes"]) == list(d2.state.nodes)  # in their places
    assert b"gpu-1" not in record
    parts = {p.key.rpartition(".")[2]: p.value for p in d1.parts + d2.parts}
    assert head.with_parts(parts).model_dump_json() == d2.state.model_dump_json()


def test_duplicate_completion_is_applied_once():
    d = step(submit(), completed("demux"))
    event = completed("asr")
    once = step(d, event)
    twice = step(once, event)
    assert requested(once) == ["subtitle_gen"]
    assert twice.changed is False and twice.actions == () and twice.state is once.state
    assert "duplicate" in twice.note
    # The same completion redelivered with a new event id (a second worker) is stale by attempt/status.
    again = step(once, completed("asr"))
    assert again.changed is False and "stale" in again.note


def test_stale_attempt_is_ignored():
    d = step(submit(), failed("demux", retryable=True))
    d = step(d, Tick(T0), now=T0 + timedelta(seconds=2))
    assert requested(d) == ["demux"] and d.requests[0].attempt == 2
    late = step(d, completed("demux", attempt=1))
    assert late.changed is False and "attempt 1" in late.note
    d = step(d, completed("demux", attempt=2))
    assert requested(d) == ["asr"]


def test_a_result_that_arrives_before_its_request_is_kept_for_later():
    # A coordinator published asr's request, then died before writing state; asr finished
    # before demux's completion came back to the next coordinator.
    d = submit()
    early = step(d, completed("asr"))
    assert early.retry_later and not early.changed and early.state is d.state and early.actions == ()
    d = step(d, completed("demux"))
    assert requested(d) == ["asr"] and d.requests[0].key == "j1.asr.1"  # same Nats-Msg-Id as the lost one
    d = step(d, completed("asr"))
    assert requested(d) == ["subtitle_gen"]
    # Only the next attempt of a waiting node is "early"; anything else stays stale.
    assert not step(submit(), completed("asr", attempt=2)).retry_later


def test_retry_with_exponential_backoff_and_deadline():
    d = submit(FANOUT, target_languages=["ta"])  # fanout.yaml sets no deadline_s: the policy's 60 s applies

    def tick(d, seconds):
        return step(d, Tick(T0 + timedelta(seconds=seconds)), FANOUT, now=T0 + timedelta(seconds=seconds))

    # attempt 1 times out: its deadline passes with no result
    assert tick(d, 59).changed is False
    d = tick(d, 60)
    node = d.state.nodes["demux"]
    assert node.status == NodeStatus.retry_wait and "within 60 s" in node.error
    assert node.next_attempt_at == T0 + timedelta(seconds=62)  # backoff 2 s after the 1st failure
    assert d.requests == []
    assert tick(d, 61).changed is False
    d = tick(d, 62)
    assert requested(d) == ["demux"] and d.requests[0].attempt == 2
    assert d.requests[0].deadline_s == 60
    # attempt 2 fails retryably: backoff doubles
    now = T0 + timedelta(seconds=70)
    d = step(d, failed("demux", attempt=2, retryable=True), FANOUT, now=now)
    assert d.state.nodes["demux"].next_attempt_at == now + timedelta(seconds=4)


def test_workflow_deadline_overrides_policy():
    d = submit()  # linear.yaml: demux deadline_s 1800
    assert d.requests[0].deadline_s == 1800
    assert step(d, Tick(T0), now=T0 + timedelta(seconds=1799)).changed is False
    assert step(d, Tick(T0), now=T0 + timedelta(seconds=1800)).state.nodes["demux"].status == NodeStatus.retry_wait


def test_exhausted_retries_fail_the_job_naming_the_stage():
    d = submit()
    now = T0
    for attempt in (1, 2):
        d = step(d, failed("demux", attempt, retryable=True, reason="disk full"), now=now)
        now += timedelta(minutes=5)
        d = step(d, Tick(now), now=now)
        assert d.requests[0].attempt == attempt + 1
    d = step(d, failed("demux", 3, retryable=True, reason="disk\nfull"), now=now)
    assert d.state.status == JobStatus.failed
    assert d.state.error == "stage demux (demux) failed 3 times; last error: disk full"
    assert kinds(d) == ["failed"] and d.events[0].node == "demux"


def test_node_max_attempts_overrides_policy():
    d = submit(FANOUT)
    d = step(d, completed("demux"), FANOUT)
    d = step(d, failed("asr", 1, retryable=True), FANOUT)
    d = step(d, Tick(T0), FANOUT, now=T0 + timedelta(minutes=1))
    d = step(d, failed("asr", 2, retryable=True), FANOUT)
    assert d.state.status == JobStatus.failed  # fanout.yaml: asr max_attempts 2


def test_permanent_failure_fails_at_once_with_the_stage_reason():
    d = step(submit(), failed("demux", reason="input has no audio stream"))
    assert d.state.status == JobStatus.failed
    assert d.state.error == "stage demux (demux) failed: input has no audio stream"
    assert d.events[0].reason == d.state.error


def test_cancel_stops_the_job_and_ignores_late_results():
    d = submit()
    d = step(d, JobCancelRequested(job_id="j1"))
    assert d.state.status == JobStatus.cancelled and kinds(d) == ["cancelled"]
    assert d.state.nodes["demux"].status == NodeStatus.cancelled
    assert step(d, completed("demux")).changed is False
    assert step(d, Tick(T0), now=T0 + timedelta(hours=1)).changed is False
    assert step(d, JobCancelRequested(job_id="j1")).changed is False


def test_retry_reruns_failed_nodes_with_a_fresh_budget():
    d = step(submit(), completed("demux"))
    d = step(d, failed("asr", reason="model missing"))
    assert d.state.status == JobStatus.failed
    d = step(d, JobRetryRequested(job_id="j1"))
    assert d.state.status == JobStatus.running and d.state.error is None
    assert requested(d) == ["asr"] and d.requests[0].attempt == 2  # demux is not rerun
    assert d.state.nodes["asr"].retry_base == 1
    # the fresh budget: three more automatic attempts
    d = step(d, failed("asr", 2, retryable=True))
    assert d.state.nodes["asr"].status == NodeStatus.retry_wait
    # a retry of a running job is a no-op
    assert step(d, JobRetryRequested(job_id="j1")).changed is False


def test_retry_after_cancel_rerequests_the_cancelled_node():
    d = step(submit(), JobCancelRequested(job_id="j1"))
    d = step(d, JobRetryRequested(job_id="j1"))
    assert requested(d) == ["demux"] and d.requests[0].attempt == 2


def test_optional_stage_skipped_and_fallback_input_chosen():
    d = submit(FANOUT)
    assert d.state.nodes["source_separation"].status == NodeStatus.skipped
    d = step(d, completed("demux"), FANOUT)
    assert requested(d) == ["asr"] and d.requests[0].inputs == {"audio": artifact("demux.audio")}

    d = submit(FANOUT, options={"separate_sources": True})
    d = step(d, completed("demux"), FANOUT)
    assert requested(d) == ["source_separation"]
    d = step(d, completed("source_separation"), FANOUT)
    assert requested(d) == ["asr"] and d.requests[0].inputs == {"audio": artifact("source_separation.vocals")}


def test_fan_out_per_language_and_join():
    d = submit(FANOUT, target_languages=["ta", "hi"], source_language="en")
    for node in ("demux", "asr"):
        d = step(d, completed(node), FANOUT)
    assert requested(d) == ["translation-ta", "translation-hi"]
    assert [r.params["target_language"] for r in d.requests] == ["ta", "hi"]
    assert d.requests[0].params["source_language"] == "en" and d.requests[0].stage == "translation_nllb"
    d = step(d, completed("translation-hi"), FANOUT)
    assert requested(d) == ["subtitle_gen-hi"]
    assert d.requests[0].inputs == {"transcript": artifact("translation-hi.transcript")}
    d = step(d, completed("subtitle_gen-hi"), FANOUT)
    assert requested(d) == []  # mux waits for every branch
    d = step(d, completed("translation-ta"), FANOUT)
    d = step(d, completed("subtitle_gen-ta"), FANOUT)
    assert requested(d) == ["mux"]
    assert d.requests[0].input_lists == {
        "subtitles": [artifact("subtitle_gen-ta.srt"), artifact("subtitle_gen-hi.srt")]
    }
    d = step(d, completed("mux"), FANOUT)
    assert d.state.status == JobStatus.completed
    assert set(d.state.outputs) == {"srt-ta", "srt-hi", "mp4"}


def test_fan_out_with_no_languages_joins_an_empty_list():
    d = submit(FANOUT)
    assert requested(d) == ["demux", "mux"]  # fanout.yaml's mux needs only the job input and the list
    assert d.requests[1].input_lists == {"subtitles": []}
    assert not any(n.startswith("translation") for n in d.state.nodes)


def test_fan_out_branch_failure_fails_only_that_branch():
    d = submit(FANOUT, target_languages=["ta", "hi"])
    for node in ("demux", "asr"):
        d = step(d, completed(node), FANOUT)
    d = step(d, failed("translation-ta", reason="no model for en->ta"), FANOUT)
    assert d.state.status == JobStatus.running
    assert d.state.failed_branches == {"ta": "stage translation_nllb (translation-ta) failed: no model for en->ta"}
    assert d.state.nodes["subtitle_gen-ta"].status == NodeStatus.abandoned
    assert d.state.nodes["translation-hi"].status == NodeStatus.requested  # the other branch goes on
    branch_failed = [e for e in d.events if e.kind == "branch_failed"]
    assert [(e.branch, e.node) for e in branch_failed] == [("ta", "translation-ta")]

    d = step(d, completed("translation-hi"), FANOUT)
    d = step(d, completed("subtitle_gen-hi"), FANOUT)
    mux = d.requests[-1]
    assert mux.node == "mux" and [r.name for r in mux.input_lists["subtitles"]] == ["subtitle_gen-hi.srt"]
    d = step(d, completed("mux"), FANOUT)
    assert d.state.status == JobStatus.completed
    assert set(d.state.outputs) == {"srt-hi", "mp4"}  # no srt-ta: its branch failed
    assert d.events[-1].kind == "completed" and set(d.events[-1].failed_branches) == {"ta"}


def test_a_failed_branch_while_the_join_waits_lets_the_join_run():
    d = submit(FANOUT, target_languages=["ta", "hi"])
    for node in ("demux", "asr", "translation-hi", "subtitle_gen-hi"):
        d = step(d, completed(node), FANOUT)
    assert "mux" not in requested(d)
    d = step(d, completed("translation-ta"), FANOUT)
    d = step(d, failed("subtitle_gen-ta", reason="cannot lay out"), FANOUT)
    assert requested(d) == ["mux"] and d.state.failed_branches.keys() == {"ta"}


def test_every_branch_failing_fails_the_job_when_every_output_needs_a_branch_and_retry_reruns_them():
    """fanout.yaml's outputs are the branches' SRTs and a mux that joins them: nothing is left."""
    d = submit(FANOUT, target_languages=["ta", "hi"])
    for node in ("demux", "asr"):
        d = step(d, completed(node), FANOUT)
    d = step(d, failed("translation-ta", reason="ta broke"), FANOUT)
    d = step(d, failed("translation-hi", reason="hi broke"), FANOUT)
    assert d.state.status == JobStatus.failed
    assert "every branch failed" in d.state.error and "ta broke" in d.state.error and "hi broke" in d.state.error
    assert d.state.nodes["subtitle_gen-hi"].status == NodeStatus.abandoned

    d = step(d, JobRetryRequested(job_id="j1"), FANOUT)
    assert d.state.status == JobStatus.running and d.state.failed_branches == {}
    assert sorted(requested(d)) == ["translation-hi", "translation-ta"]
    assert d.state.nodes["subtitle_gen-ta"].status == NodeStatus.waiting


SUBTITLE = load_workflow(DEFAULT_WORKFLOWS_DIR / "subtitle.yaml")
STAGE_OUTPUTS = {**OUTPUTS, "vad": ["regions"], "alignment": ["transcript"], "translation_nllb": ["transcript"],
                 "chunk": ["chunks", "language"], "transcript_join": ["transcript"]}
# subtitle/translate up to their transcript: the film's speech in one chunk (-s gives the language)
TO_TRANSCRIPT = ("demux", "vad", "chunk", "asr-0", "alignment-0", "transcript_join")


def _done(d: Decision, node: str, graph) -> Decision:
    stage = d.state.nodes[node].stage
    outputs = {o: artifact(f"{node}.{o}") for o in STAGE_OUTPUTS[stage]}
    items = {"chunks": 1} if stage == "chunk" else {}
    return step(d, StageCompleted(job_id="j1", stage=stage, node=node, attempt=d.state.nodes[node].attempt,
                                  outputs=outputs, items=items), graph)


def test_every_translation_failing_still_delivers_the_source_subtitles_and_a_mux():
    """Issue 18: `subtitle -s en -t fr,de` whose translations all fail completes with the
    source-language SRT/VTT, the transcript and a mux of the tracks that exist, naming each
    failed language; whichever order the work finishes in."""
    for translations_fail_first in (True, False):
        d = submit(SUBTITLE, source_language="en", target_languages=["fr", "de"])
        for node in TO_TRANSCRIPT:
            d = _done(d, node, SUBTITLE)
        assert sorted(requested(d)) == ["subtitle_gen", "translation-de", "translation-fr"]
        if not translations_fail_first:
            d = _done(d, "subtitle_gen", SUBTITLE)
        for lang in ("fr", "de"):
            d = step(d, failed(f"translation-{lang}", reason=f"no model weights for en->{lang}"), SUBTITLE)
        assert d.state.status == JobStatus.running, d.state.error
        assert d.state.nodes["subtitle_gen_translated-fr"].status == NodeStatus.abandoned
        if translations_fail_first:
            assert "mux" not in d.state.nodes or d.state.nodes["mux"].status == NodeStatus.waiting
            d = _done(d, "subtitle_gen", SUBTITLE)
        mux = next(r for r in d.requests if r.node == "mux")
        assert mux.input_lists == {"subtitles": [artifact("subtitle_gen.srt")]}  # the track that exists
        d = _done(d, "mux", SUBTITLE)
        assert d.state.status == JobStatus.completed and d.state.error is None
        assert set(d.state.failed_branches) == {"fr", "de"}
        assert "no model weights for en->fr" in d.state.failed_branches["fr"]
        assert set(d.state.outputs) == {"transcript", "srt", "vtt", "mp4", "mkv"}
        assert d.events[-1].kind == "completed" and set(d.events[-1].failed_branches) == {"fr", "de"}


def test_every_translation_failing_in_translate_delivers_the_transcript():
    translate = load_workflow(DEFAULT_WORKFLOWS_DIR / "translate.yaml")
    d = submit(translate, source_language="en", target_languages=["fr"])
    for node in TO_TRANSCRIPT:
        d = _done(d, node, translate)
    d = step(d, failed("translation-fr", reason="offline"), translate)
    assert d.state.status == JobStatus.completed and set(d.state.outputs) == {"transcript"}
    assert set(d.state.failed_branches) == {"fr"}


def test_a_failure_outside_the_branches_still_fails_the_job():
    d = submit(FANOUT, target_languages=["ta"])
    d = step(d, completed("demux"), FANOUT)
    d = step(d, failed("asr", reason="no speech model"), FANOUT)
    assert d.state.status == JobStatus.failed and d.state.failed_branches == {}


def test_completion_missing_a_needed_output_fails_clearly():
    d = submit()
    d = step(d, StageCompleted(job_id="j1", stage="demux", node="demux", attempt=1, outputs={}))
    assert d.state.status == JobStatus.failed
    assert d.state.error == "demux finished without its 'audio' output, which asr needs (it produced: nothing)"


def test_unknown_workflow_and_unknown_job():
    d = decide(None, JobSubmitted(job_id="j1", spec=JobSpec(job_id="j1", input=INPUT, workflow="nope")),
               None, T0, POLICY)
    assert d.state.status == JobStatus.failed and "unknown workflow 'nope'" in d.state.error
    assert decide(None, completed("demux"), TRANSCRIBE, T0, POLICY).state is None


def test_decide_is_pure():
    d = submit()
    before = d.state.model_dump()
    step(d, completed("demux"))
    step(d, JobCancelRequested(job_id="j1"))
    assert d.state.model_dump() == before
    again = submit()
    assert [e.event_id for e in again.events] == [e.event_id for e in d.events]


def test_give_up_fails_a_running_job_and_cancels_its_open_attempts():
    d = step(submit(), completed("demux"))  # asr requested
    event = completed("asr")
    g = give_up(d.state, "j1", event.event_id, "coordinator error:\n  boom", T0)
    assert g.changed and g.state.status == JobStatus.failed
    assert g.state.error == "coordinator error: boom"  # one line
    assert g.state.nodes["asr"].status == NodeStatus.cancelled  # a retry reruns it
    assert g.state.nodes["demux"].status == NodeStatus.completed
    assert event.event_id in g.state.applied
    [failed] = g.events
    assert (failed.kind, failed.event_id, failed.reason) == (
        "failed", f"j1.failed.internal.{event.event_id}", "coordinator error: boom")
    assert g.requests == []
    assert d.state.status == JobStatus.running  # pure: the input state is untouched
    assert step(g, JobRetryRequested(job_id="j1")).requests[0].node == "asr"


def test_give_up_without_a_state_only_announces_and_leaves_finished_jobs_alone():
    g = give_up(None, "j1", "e1", "boom", T0)
    assert g.changed and g.state is None and [e.event_id for e in g.events] == ["j1.failed.internal.e1"]
    d = step(submit(), JobCancelRequested(job_id="j1"))
    assert not give_up(d.state, "j1", "e2", "boom", T0).changed


def test_decide_carries_the_outbox_along():
    d = submit()
    pending = [{"kind": "started", "event_id": "j1.started"}]
    state = d.state.model_copy(update={"outbox": pending})
    assert step(Decision(state), completed("demux")).state.outbox == pending
    assert state.outbox == pending and submit().state.outbox == []


def test_an_outbox_request_is_awaited_only_while_its_node_waits_for_that_attempt():
    d = submit()
    [request] = d.requests
    entry, event = request_entry(request), {"kind": "started", "event_id": "j1.started"}
    assert outbox_id(entry) == f"request:{request.key}"
    assert awaited(entry, d.state, T0) and awaited(event, d.state, T0)
    later = step(d, completed(request.node))  # its result came: never sent again
    assert not awaited(entry, later.state, T0) and awaited(event, later.state, T0)
    retried = d.state.model_copy(update={"nodes": {**d.state.nodes, request.node: d.state.nodes[request.node].model_copy(
        update={"attempt": request.attempt + 1})}})
    assert not awaited(entry, retried, T0)  # another attempt is what the node waits for


def test_a_join_takes_a_failed_branch_whole_or_not_at_all():
    """mux collecting translations and subtitles: fr's translation completed but its subtitles
    failed, so neither of fr's artifacts reaches mux."""
    graph = Workflow.from_dict({"name": "joined", "nodes": {
        "translation": {"for_each": "target_languages", "inputs": {"media": "job.input"}, "outputs": ["transcript"]},
        "subtitle_gen": {"for_each": "target_languages", "inputs": {"transcript": "translation.transcript"},
                         "outputs": ["srt", "vtt"]},
        "mux": {"inputs": {"media": "job.input"},
                "input_lists": {"subtitles": ["subtitle_gen.srt"], "transcripts": ["translation.transcript"]},
                "outputs": ["mp4", "mkv"]},
    }})
    spec = JobSpec(job_id="j1", input=INPUT, workflow="joined", target_languages=["hi", "fr"])
    d = decide(None, JobSubmitted(job_id="j1", spec=spec), graph, T0, POLICY)
    for node in ("translation-hi", "translation-fr", "subtitle_gen-hi"):
        d = step(d, completed(node), graph)
    d = step(d, failed("subtitle_gen-fr", reason="no font"), graph)
    mux = d.requests[-1]
    assert mux.node == "mux"
    assert [r.name for r in mux.input_lists["subtitles"]] == ["subtitle_gen-hi.srt"]
    assert [r.name for r in mux.input_lists["transcripts"]] == ["translation-hi.transcript"]


def test_with_a_secret_only_results_carrying_the_requests_token_apply():
    """A worker credential can report only on requests it was handed: the request's token
    (HMAC of job, node and attempt under the coordinator's secret) must come back."""
    from captionbus.coordinator.decide import result_token

    policy = replace(POLICY, result_secret=b"coordinator-secret")
    spec = JobSpec(job_id="j1", input=INPUT, workflow="transcribe")
    d = decide(None, JobSubmitted(job_id="j1", spec=spec), TRANSCRIBE, T0, policy)
    token = d.requests[0].token
    assert token == result_token(b"coordinator-secret", "j1", "demux", 1) and len(token) == 32
    assert "coordinator-secret" not in repr(policy) and token not in d.state.model_dump_json()
    for forged in (failed("demux"), completed("demux", token="0" * 32),
                   completed("demux", token=result_token(b"coordinator-secret", "j1", "demux", 2))):
        refused = decide(d.state, forged, TRANSCRIBE, T0, policy)
        assert refused.changed is False and "token is not the request's" in refused.note
    ok = decide(d.state, completed("demux", token=token), TRANSCRIBE, T0, policy)
    assert ok.state.nodes["demux"].status == NodeStatus.completed and requested(ok) == ["asr"]
    assert ok.requests[0].token == result_token(b"coordinator-secret", "j1", "asr", 1)


def test_a_result_that_overtakes_its_jobs_state_is_put_back_only_with_its_requests_token():
    """Several coordinators: the request goes out with the write that creates the state, so another
    coordinator can be handed the result of a job it finds no state of. One carrying the
    request's token is applied again later (dropping it left the job waiting forever); one
    without is refused at once, so junk results for made-up jobs do not circle."""
    from captionbus.coordinator.decide import result_token

    policy = replace(POLICY, result_secret=b"coordinator-secret")
    real = completed("demux", token=result_token(b"coordinator-secret", "j1", "demux", 1))
    early = decide(None, real, TRANSCRIBE, T0, policy)
    assert early.retry_later and not early.changed and early.state is None and "no state" in early.note
    for forged in (completed("demux"), completed("demux", token="0" * 32)):
        refused = decide(None, forged, TRANSCRIBE, T0, policy)
        assert not refused.retry_later and not refused.changed and "no job" in refused.note


def test_a_fan_out_items_result_that_overtakes_the_write_listing_the_items_is_put_back():
    """The decision that lists a film's chunks (asr-0, asr-1, ...) publishes their requests with
    its write; a coordinator handed a chunk's result before that write lands finds no asr-0 in
    the state. With the request's token the result is put back; a made-up node is ignored."""
    from captionbus.coordinator.decide import result_token

    chunked = load_workflow(DEFAULT_WORKFLOWS_DIR / "chunked.yaml")
    policy = replace(POLICY, result_secret=b"s")
    spec = JobSpec(job_id="j1", input=INPUT, workflow="chunked", source_language="en")
    state = decide(None, JobSubmitted(job_id="j1", spec=spec), chunked, T0, policy).state
    assert "asr" in state.nodes and "asr-0" not in state.nodes  # the stand-in, items not listed yet

    def result(node: str, token: str | None) -> StageCompleted:
        return StageCompleted(job_id="j1", stage="asr", node=node, attempt=1, token=token,
                              outputs={"transcript": INPUT})

    early = decide(state, result("asr-0", result_token(b"s", "j1", "asr-0", 1)), chunked, T0, policy)
    assert early.retry_later and not early.changed and "not in the state yet" in early.note
    for ignored in (result("asr-0", "0" * 32), result("vad-0", result_token(b"s", "j1", "vad-0", 1))):
        d = decide(state, ignored, chunked, T0, policy)
        assert not d.retry_later and not d.changed and "no node" in d.note


def test_failures_are_recorded_with_their_class():
    """The class rides on the node and the job (captionbus.contracts.failures), from the StageFailed's
    error_type, the coordinator's own deadline, or the kind of refusal; a retry clears it."""
    setup = StageFailed(job_id="j1", stage="demux", node="demux", attempt=1, error_type="setup_failed",
                        reason="demux cannot be served on host h: RuntimeError: no model")
    d = step(submit(), setup)
    assert (d.state.failure_class, d.state.nodes["demux"].failure_class) == ("setup", "setup")
    d = step(d, JobRetryRequested(job_id="j1"))
    assert d.state.failure_class is None and d.state.nodes["demux"].failure_class is None

    bad = StageFailed(job_id="j1", stage="demux", node="demux", attempt=1, error_type="bad_input", reason="no audio")
    assert step(submit(), bad).state.failure_class == "input"
    crashed = StageFailed(job_id="j1", stage="demux", node="demux", attempt=1, error_type="max_deliveries",
                          reason="stage demux crashed or timed out on every one of 3 deliveries")
    assert step(submit(), crashed).state.failure_class == "worker_crash"

    d = submit(FANOUT)  # demux's deadline passes on every attempt: a timeout
    now = T0
    for _ in range(10):  # each tick either fails the overdue attempt or requests the next one
        now += timedelta(minutes=5)
        d = step(d, Tick(now), FANOUT, now=now)
    assert d.state.status == JobStatus.failed and d.state.failure_class == "timeout"

    nope = decide(None, JobSubmitted(job_id="j1", spec=JobSpec(job_id="j1", input=INPUT, workflow="nope")),
                  None, T0, POLICY)
    assert nope.state.failure_class == "input"
    g = give_up(submit().state, "j1", "e1", "coordinator error", T0)
    assert g.state.failure_class == "internal"


def test_failure_class_of_reasons_recorded_before_classes_existed():
    from captionbus.contracts.failures import classify

    assert classify(None, "stage asr (asr) failed: asr cannot be served on host h: x") == "setup"
    assert classify(None, "stage demux (demux) gave no result within 60 s (attempt 3)") == "timeout"
    assert classify(None, "no vad worker has been running for 300 s: start one") == "unserved"
    assert classify(None, "stage asr (asr) failed 3 times; last error: RuntimeError: x") == "stage_error"
    assert classify(None, "something else") == "internal"
    assert classify("exhausted") == "stage_error" and classify("unserved") == "unserved"
    assert classify("store_full") == "storage"
    assert classify(None, "stage asr (asr) failed: asr: artifact store full: no space on the disk") == "storage"
