"""Workflow files: loading, validation errors a person can act on, expansion for one job."""
from __future__ import annotations

from pathlib import Path

import pytest

from captionbus.contracts import ArtifactRef, JobSpec
from captionbus.coordinator.graph import (
    DEFAULT_WORKFLOWS_DIR,
    Source,
    Workflow,
    WorkflowError,
    load_workflow,
    load_workflows,
)

FANOUT = Path(__file__).parent / "fanout.yaml"
INPUT = ArtifactRef(key="0" * 64, name="film.mp4", size=10)


def spec(**kw) -> JobSpec:
    return JobSpec(job_id="j1", input=INPUT, **kw)


def wf(nodes: dict, outputs: dict | None = None) -> Workflow:
    return Workflow.from_dict({"name": "t", "nodes": nodes, "outputs": outputs or {}}, "t.yaml")


def test_transcribe_cuts_speech_into_chunks_one_asr_request_each():
    transcribe = load_workflows(DEFAULT_WORKFLOWS_DIR)["transcribe"]
    assert transcribe.topological_order() == ["demux", "vad", "chunk", "language", "asr", "diarization", "transcript_join",
                                              "subtitle_gen", "mux"]
    plan = transcribe.expand(spec(source_language="en", options={"asr": {"model": "base"}}))
    assert plan.errors == []
    # ASR decodes inside Silero's speech regions (no phantom words in music or silence), chunk by
    # chunk: the chunk stage decides from the audio's length whether there is more than one;
    # with -s it writes the language and no detection request runs.
    assert plan.stages() == ["demux", "vad", "chunk", "asr", "transcript_join", "subtitle_gen", "mux"]
    assert plan.nodes["chunk"].inputs == {"regions": Source("vad", "regions")}
    assert plan.nodes["asr"].inputs == {"audio": Source("demux", "audio"), "chunks": Source("chunk", "chunks"),
                                        "language": Source("chunk", "language")}
    assert "chunk_above_s" not in plan.nodes["chunk"].params  # the chunk worker's CAPTIONBUS_CHUNK_ABOVE_S
    assert plan.nodes["vad"].inputs == {"audio": Source("demux", "audio")}
    assert plan.nodes["asr"].params["model"] == "base"
    assert plan.nodes["asr"].params["source_language"] == "en"
    assert plan.nodes["subtitle_gen"].inputs["transcript"] == Source("transcript_join", "transcript")
    assert plan.nodes["subtitle_gen"].params["formats"] == ["srt", "vtt"]
    assert plan.nodes["mux"].inputs == {"media": Source(None, "input")}
    assert plan.nodes["mux"].input_lists == {"subtitles": [Source("subtitle_gen", "srt")]}
    assert set(plan.outputs) == {"transcript", "srt", "vtt", "mp4", "mkv"}
    detect = transcribe.expand(spec())
    assert detect.nodes["asr"].inputs["language"] == Source("language", "language")  # detected once
    assert detect.nodes["language"].params["task"] == "detect_language"
    # -w chunked cuts audio of any length
    chunked = load_workflows(DEFAULT_WORKFLOWS_DIR)["chunked"].expand(spec())
    assert chunked.nodes["chunk"].params["chunk_above_s"] == 0


def test_speakers_switch_on_diarization_and_the_assignment():
    """--speakers (options.diarization.speakers) runs diarization on demux's audio and the vad
    regions, beside asr; transcribe's speaker_assign (transcript_join) puts the turns on asr's
    words and feeds subtitle_gen, and the transcript becomes an output; in chunked, the one
    whole-film diarization request feeds transcript_join's optional `turns` (left out without it)."""
    flows = load_workflows(DEFAULT_WORKFLOWS_DIR)
    on = spec(source_language="en", options={"diarization": {"speakers": "2-3"}})
    plan = flows["transcribe"].expand(on, items={"chunk.chunks": 2})
    assert plan.errors == []
    assert plan.stages() == ["demux", "vad", "chunk", "asr", "diarization", "transcript_join", "subtitle_gen", "mux"]
    assert plan.nodes["diarization"].inputs == {"audio": Source("demux", "audio"), "regions": Source("vad", "regions")}
    assert plan.nodes["diarization"].params["speakers"] == "2-3"
    assert [n for n in plan.nodes if n.startswith("diarization")] == ["diarization"]  # one per film
    assert plan.nodes["transcript_join"].inputs["turns"] == Source("diarization", "turns")
    assert plan.outputs["transcript"] == Source("transcript_join", "transcript")
    chunked_on = flows["chunked"].expand(on, items={"chunk.chunks": 3})
    assert chunked_on.errors == []
    assert [n for n in chunked_on.nodes if n.startswith("diarization")] == ["diarization"]  # one per film
    assert chunked_on.nodes["transcript_join"].inputs["turns"] == Source("diarization", "turns")
    chunked_off = flows["chunked"].expand(spec(source_language="en"), items={"chunk.chunks": 3})
    assert chunked_off.errors == [] and "turns" not in chunked_off.nodes["transcript_join"].inputs
    assert not chunked_off.nodes["diarization"].active
    speech_off = flows["speech"].expand(spec())
    assert speech_off.stages() == ["demux", "asr", "subtitle_gen"]  # the door's default plan is unchanged
    assert speech_off.outputs["transcript"] == Source("asr", "transcript")
    speech_on = flows["speech"].expand(on)
    assert speech_on.nodes["asr"].inputs == {"audio": Source("demux", "audio")}  # asr decodes as without it
    assert speech_on.outputs["transcript"] == Source("speaker_assign", "transcript")
    for name in ("translate", "subtitle"):
        plan = flows[name].expand(spec(source_language="en", target_languages=["hi"],
                                       options={"diarization": {"speakers": "auto"}}), items={"chunk.chunks": 2})
        assert plan.errors == [], name
        assert plan.nodes["transcript_join"].inputs["turns"] == Source("diarization", "turns")
        assert plan.nodes["translation-hi"].inputs["transcript"] == Source("transcript_join", "transcript")
        assert plan.outputs["transcript"] == Source("transcript_join", "transcript")


def test_a_required_input_with_no_running_source_is_still_an_error():
    """Only an input the stage declares optional is left out when none of its nodes runs."""
    flow = wf({
        "demux": {"inputs": {"media": "job.input"}, "outputs": ["audio", "probe"]},
        "vad": {"when": "options.vad_on", "inputs": {"audio": "demux.audio"}, "outputs": ["regions"]},
        "diarization": {"inputs": {"audio": "demux.audio", "regions": "vad.regions"}, "outputs": ["turns"]},
    })
    assert any("diarization needs input 'regions'" in e for e in flow.expand(spec()).errors)


def test_unknown_node_reference_is_named():
    with pytest.raises(WorkflowError, match=r"t.yaml: .*node asr inputs.audio refers to unknown node 'demx'"):
        wf({"asr": {"inputs": {"audio": "demx.audio"}, "outputs": ["transcript"]}})


def test_unknown_output_lists_the_declared_ones():
    with pytest.raises(WorkflowError, match=r"refers to demux.sound, but demux declares outputs \[audio\]"):
        wf({
            "demux": {"inputs": {"media": "job.input"}, "outputs": ["audio"]},
            "asr": {"inputs": {"audio": "demux.sound"}, "outputs": ["transcript"]},
        })


def test_cycle_is_reported_with_its_path():
    with pytest.raises(WorkflowError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        wf({
            "a": {"inputs": {"x": "b.out"}, "outputs": ["out"]},
            "b": {"inputs": {"x": "a.out"}, "outputs": ["out"]},
        })


def test_node_without_inputs_is_refused():
    with pytest.raises(WorkflowError, match="needs inputs"):
        wf({"demux": {"outputs": ["audio"]}})


def test_misspelt_key_and_bad_condition_are_refused():
    with pytest.raises(WorkflowError, match=r"nodes\.demux\.input: unknown key"):
        wf({"demux": {"input": {"media": "job.input"}, "outputs": ["audio"]}})
    with pytest.raises(WorkflowError, match="condition 'options\\.x or y' not understood"):
        wf({"demux": {"inputs": {"media": "job.input"}, "outputs": ["a"], "when": "options.x or y"}})
    with pytest.raises(WorkflowError, match="for_each 'speakers' unknown"):
        wf({"demux": {"inputs": {"media": "job.input"}, "outputs": ["a"], "for_each": "speakers"}})


def test_plain_input_from_a_fan_out_must_use_input_lists():
    with pytest.raises(WorkflowError, match="collect them with input_lists"):
        wf({
            "t": {"inputs": {"x": "job.input"}, "outputs": ["o"], "for_each": "target_languages"},
            "m": {"inputs": {"x": "t.o"}, "outputs": ["o"]},
        })


def test_file_name_must_match_workflow_name(tmp_path):
    (tmp_path / "other.yaml").write_text(FANOUT.read_text())
    with pytest.raises(WorkflowError, match="must match the file name"):
        load_workflow(tmp_path / "other.yaml")


def test_optional_stage_off_and_fallback_input():
    fanout = load_workflow(FANOUT)
    plan = fanout.expand(spec())
    assert plan.nodes["source_separation"].active is False
    assert plan.nodes["asr"].inputs["audio"] == Source("demux", "audio")
    on = fanout.expand(spec(options={"separate_sources": True}))
    assert on.nodes["source_separation"].active is True
    assert on.nodes["asr"].inputs["audio"] == Source("source_separation", "vocals")


def test_fan_out_branches_reference_their_own_branch_and_join_collects_all():
    plan = load_workflow(FANOUT).expand(spec(target_languages=["ta", "hi"], options={"translation": {"batch_size": 8}}))
    assert list(plan.nodes) == [
        "demux", "source_separation", "asr", "translation-ta", "translation-hi",
        "subtitle_gen-ta", "subtitle_gen-hi", "mux",
    ]
    assert plan.nodes["translation-hi"].params["target_language"] == "hi"
    assert plan.nodes["translation-hi"].params["batch_size"] == 8  # job options beat graph params
    assert plan.errors == []
    assert plan.nodes["subtitle_gen-ta"].inputs == {"transcript": Source("translation-ta", "transcript")}
    assert plan.nodes["mux"].input_lists["subtitles"] == [
        Source("subtitle_gen-ta", "srt"), Source("subtitle_gen-hi", "srt"),
    ]
    assert set(plan.outputs) == {"srt-ta", "srt-hi", "mp4"}
    assert plan.stages() == ["demux", "asr", "translation_nllb", "subtitle_gen", "mux"]


def test_input_with_no_running_source_is_a_plan_error():
    w = wf({
        "sep": {"inputs": {"m": "job.input"}, "outputs": ["v"], "when": "options.sep"},
        "asr": {"inputs": {"a": "sep.v"}, "outputs": ["t"]},
    })
    assert w.expand(spec()).errors == [
        "asr needs input 'a' from sep.v, and none of those stages runs for this job"
    ]


def test_conditions():
    w = wf({
        "a": {"inputs": {"m": "job.input"}, "outputs": ["o"], "when": "options.vad == silero"},
        "b": {"inputs": {"m": "job.input"}, "outputs": ["o"], "when": "not options.fast"},
        "c": {"inputs": {"m": "job.input"}, "outputs": ["o"], "when": "target_languages"},
    })
    plan = w.expand(spec(options={"vad": "silero", "fast": True}))
    assert [n.active for n in plan.nodes.values()] == [True, False, False]


def test_translation_branches_route_by_language_pair():
    workflows = load_workflows(DEFAULT_WORKFLOWS_DIR)
    for name in ("translate", "subtitle"):
        plan = workflows[name].expand(spec(workflow=name, source_language="hi", target_languages=["en", "ta", "fr"]))
        assert plan.errors == []
        stages = {n.id: n.stage for n in plan.active() if n.name == "translation"}
        assert stages == {"translation-en": "translation_indictrans2", "translation-ta": "translation_indictrans2",
                          "translation-fr": "translation_nllb"}
        assert plan.nodes["translation-fr"].params["target_language"] == "fr"
    assert workflows["translate"].nodes["translation"].possible_stages("translation") == [
        "translation_indictrans2", "translation_nllb"]


def test_unsupported_pair_and_missing_source_are_plan_errors():
    subtitle = load_workflows(DEFAULT_WORKFLOWS_DIR)["subtitle"]
    errors = subtitle.expand(spec(workflow="subtitle", source_language="hi", target_languages=["en", "xx"])).errors
    assert len(errors) == 1 and errors[0].startswith("translation-xx: no translation backend for hi -> xx")
    assert "needs the source language" in subtitle.expand(spec(workflow="subtitle", target_languages=["en"])).errors[0]
    assert "nothing to translate" in subtitle.expand(
        spec(workflow="subtitle", source_language="en", target_languages=["en"])).errors[0]


def test_subtitle_graph_options_switch_separation_and_vad_backend():
    subtitle = load_workflows(DEFAULT_WORKFLOWS_DIR)["subtitle"]
    plain = subtitle.expand(spec(workflow="subtitle", source_language="en", target_languages=["hi"]))
    assert plain.nodes["asr"].inputs["audio"] == Source("demux", "audio")
    assert plain.nodes["chunk"].inputs["regions"] == Source("vad", "regions")  # asr reads the chunks
    assert not plain.nodes["source_separation"].active and not plain.nodes["vad_pyannote"].active
    assert [s.node_id for s in plain.nodes["mux"].input_lists["subtitles"]] == ["subtitle_gen", "subtitle_gen_translated-hi"]
    full = subtitle.expand(spec(workflow="subtitle", source_language="en", target_languages=["hi"],
                                options={"separate_sources": True, "vad": "pyannote"}))
    assert full.nodes["asr"].inputs == {"audio": Source("source_separation", "vocals"),
                                       "chunks": Source("chunk", "chunks"), "language": Source("chunk", "language")}
    assert full.nodes["chunk"].inputs["regions"] == Source("vad_pyannote", "regions")
    assert full.nodes["alignment"].inputs["audio"] == Source("source_separation", "vocals")
    assert not full.nodes["vad"].active


def test_route_needs_a_fan_out_and_a_known_router():
    base = {"name": "w", "nodes": {"t": {"inputs": {"x": "job.input"}, "outputs": ["y"], "route": "translation"}}}
    with pytest.raises(WorkflowError, match="needs for_each"):
        Workflow.from_dict(base)
    base["nodes"]["t"].update(for_each="target_languages", route="weather")
    with pytest.raises(WorkflowError, match="route 'weather' unknown"):
        Workflow.from_dict(base)


def test_options_for_one_branch_override_the_node_options():
    translate = load_workflows(DEFAULT_WORKFLOWS_DIR)["translate"]
    options = {"translation": {"batch_size": 2, "glossary": "a\tb"}, "translation-ta": {"glossary": "x\ty"}}
    plan = translate.expand(spec(workflow="translate", source_language="en", target_languages=["hi", "ta"], options=options))
    assert plan.errors == []
    assert plan.nodes["translation-hi"].params["glossary"] == "a\tb"
    assert plan.nodes["translation-ta"].params["glossary"] == "x\ty" and plan.nodes["translation-ta"].params["batch_size"] == 2


def test_submit_refuses_unknown_vad_backend_and_unsupported_pairs():
    from captionbus.client import SubmitError
    from captionbus.runner import validate_job

    with pytest.raises(SubmitError, match="vad='pyanote' unknown"):
        validate_job("translate", "en", ["hi"], local_stack=False, options={"vad": "pyanote"})
    with pytest.raises(SubmitError, match="no translation backend for hi -> la"):
        validate_job("subtitle", "HI", ["EN", "la"], local_stack=False)
    stages = validate_job("subtitle", "HI", ["EN", "fr"], local_stack=False, options={"vad": "pyannote"})
    assert {"vad_pyannote", "translation_indictrans2", "translation_nllb"} <= set(stages) and "vad" not in stages
