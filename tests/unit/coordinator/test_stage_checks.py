"""Workflow nodes and job options against each stage's declaration (captionbus.contracts.stage_specs):
refused at load with the file and node named, and at submit with the stage's keys listed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from captionbus.contracts import ArtifactRef, JobSpec
from captionbus.coordinator.graph import DEFAULT_WORKFLOWS_DIR, WorkflowError, load_workflow, load_workflows, option_errors

INPUT = ArtifactRef(key="0" * 64, name="film.mp4", size=10)
TRANSCRIBE = yaml.safe_load((DEFAULT_WORKFLOWS_DIR / "transcribe.yaml").read_text())


def spec(workflow: str = "transcribe", **kw) -> JobSpec:
    return JobSpec(job_id="j1", input=INPUT, workflow=workflow, **kw)


def write(tmp_path: Path, change) -> Path:
    """transcribe.yaml with `change(nodes)` applied, as a file of its own name."""
    data = yaml.safe_load(yaml.safe_dump(TRANSCRIBE))
    change(data["nodes"])
    path = tmp_path / "transcribe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_packaged_workflows_fit_their_stages():
    assert set(load_workflows(DEFAULT_WORKFLOWS_DIR)) == {"transcribe", "translate", "subtitle", "speech", "chunked", "chunked_aligned"}


@pytest.mark.parametrize("change, message", [
    (lambda n: n["asr"].update(stage="asr_large"), "node asr: unknown stage 'asr_large' (stages: alignment, asr, chunk, demux, "),
    (lambda n: n["demux"].update(outputs=["audio", "probe", "video"]),
     "node demux: stage demux does not produce video (its outputs: audio, probe)"),
    (lambda n: n["asr"]["inputs"].update(speech="demux.audio"),
     "node asr: stage asr reads no input speech (its inputs: audio, regions, chunks, language)"),
    (lambda n: n["asr"].update(inputs={"regions": "demux.probe"}), "node asr: stage asr needs input audio"),
    (lambda n: n["mux"].update(input_lists={"tracks": ["subtitle_gen.srt"]}),
     "node mux: stage mux reads no input list tracks (its input lists: subtitles)"),
    (lambda n: n["mux"].update(for_each="target_languages"),
     "node mux: stage mux cannot run per target_language: it takes no such param"),
    (lambda n: n["asr"].update(params={"beam_size": 5}),
     "node asr: params: unknown param 'beam_size' (asr params: language, task, model, cache)"),
    (lambda n: n["subtitle_gen"].update(params={"formats": ["srt", "docx"]}),
     "node subtitle_gen: params: formats.1='docx': Input should be 'srt', 'vtt', 'ass', 'json' or 'txt'"),
])
def test_a_node_that_does_not_fit_its_stage_is_refused_at_load(tmp_path, change, message):
    path = write(tmp_path, change)
    with pytest.raises(WorkflowError) as refused:
        load_workflow(path)
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


def test_routed_nodes_are_checked_against_every_stage_they_may_run(tmp_path):
    data = yaml.safe_load((DEFAULT_WORKFLOWS_DIR / "translate.yaml").read_text())
    data["nodes"]["translation"]["params"] = {"num_beams": 4}  # a service option, not a param
    path = tmp_path / "translate.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(WorkflowError, match="node translation: params: unknown param 'num_beams' "
                                            r"\(translation_indictrans2 params: glossary, batch_size, context, cache\)"):
        load_workflow(path)


def test_good_options_pass():
    assert option_errors(load_workflow(DEFAULT_WORKFLOWS_DIR / "transcribe.yaml"), spec(options={
        "asr": {"language": "hi", "cache": False}, "subtitle_gen": {"formats": "srt", "profile": "fast"},
        "demux": {"audio_track": 1}})) == []
    translate = load_workflow(DEFAULT_WORKFLOWS_DIR / "subtitle.yaml")
    assert option_errors(translate, spec("subtitle", source_language="en", target_languages=["hi", "ta"], options={
        "separate_sources": True, "vad": "pyannote", "vad_pyannote": {"threshold": 0.6},
        "translation": {"glossary": "a\tb"}, "translation-ta": {"batch_size": 4}, "translation_nllb": {"context": 2},
        "subtitle_gen_translated-hi": {"profile": "x"}, "source_separation": {"chunk_s": 30}})) == []


@pytest.mark.parametrize("options, message", [
    ({"asr": {"nosuchkey": 1}}, "option asr: unknown param 'nosuchkey' (asr params: language, task, model, cache)"),
    ({"asr": {"language": "klingon"}}, "option asr: language='klingon': unknown language code 'klingon'"),
    ({"subtitle_gen": {"formats": ["doc"]}}, "option subtitle_gen: formats.0='doc': Input should be 'srt'"),
    ({"nosuchstage": {"x": 1}}, "option nosuchstage: workflow transcribe has no stage or node 'nosuchstage' "
                                "(valid: demux, vad, chunk, language, asr, diarization, transcript_join, subtitle_gen, mux)"),
    ({"alignment": {"language": "en"}}, "workflow transcribe has no stage or node 'alignment'"),
    ({"asr": 1}, "option asr=1: stage options are asr.KEY=VALUE"),
    ({"separate_sources": True}, "option separate_sources: workflow transcribe has no stage or node"),
])
def test_bad_options_are_refused_with_the_valid_keys(options, message):
    errors = option_errors(load_workflow(DEFAULT_WORKFLOWS_DIR / "transcribe.yaml"), spec(options=options))
    assert len(errors) == 1 and message in errors[0], errors


def test_branch_options_need_a_branch_of_this_job_and_fit_every_routed_stage():
    subtitle = load_workflow(DEFAULT_WORKFLOWS_DIR / "subtitle.yaml")
    job = dict(workflow="subtitle", source_language="en", target_languages=["hi"])
    assert option_errors(subtitle, spec(**job, options={"translation-ta": {"batch_size": 2}})) == [
        "option translation-ta: 'ta' is not one of this job's target_languages (hi)"]
    errors = option_errors(subtitle, spec(**job, options={"translation-hi": {"batch_size": 100}}))
    assert errors == ["option translation-hi: batch_size=100: Input should be less than or equal to 64 "
                      "(translation_indictrans2 params: glossary, batch_size, context, cache)"]
    assert "valid: demux, source_separation, vad, vad_pyannote, chunk, language, asr, alignment, diarization, " \
           "transcript_join, translation, subtitle_gen, subtitle_gen_translated, mux, translation_indictrans2, " \
           "translation_nllb, translation-<target_language>" \
           in option_errors(subtitle, spec(**job, options={"translate": {"x": 1}}))[0]


def test_a_plan_checks_every_active_node_s_final_params():
    """What no single option shows: the merged params (graph < job options < branch) of each
    node that will run, e.g. an overlap too large for the chunk set elsewhere."""
    translate = load_workflow(DEFAULT_WORKFLOWS_DIR / "translate.yaml")
    plan = translate.expand(spec("translate", source_language="en", target_languages=["hi"], options={
        "separate_sources": True, "source_separation": {"chunk_s": 6}, "demux": {"audio_track": 0}}))
    assert plan.errors == []
    plan = translate.expand(spec("translate", source_language="en", target_languages=["hi"], options={
        "separate_sources": True, "source_separation": {"chunk_s": 6, "overlap_s": 3}}))
    assert plan.errors == ["source_separation: overlap_s must be at most a third of chunk_s (2 s), not 3 "
                           "(source_separation params: chunk_s, overlap_s, cache)"]
