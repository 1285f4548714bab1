"""The job flags every submitting command shares become the options the graph and stages read."""
from __future__ import annotations

import json
import re

import click
from click.testing import CliRunner

import pytest

from captionbus.cli import UserError, device_envs, parse_options, with_job_options


@click.command()
@with_job_options
def probe(workflow, source, targets, options):
    click.echo(json.dumps({"workflow": workflow, "source": source, "targets": targets,
                           "options": parse_options(options)}))


def test_convenience_flags_become_options(tmp_path):
    glossary = tmp_path / "terms.tsv"
    glossary.write_text("Bollywood\t\nचाय\tchai\n", encoding="utf-8")
    result = CliRunner().invoke(probe, ["-w", "subtitle", "-s", "hi", "-t", "en,ta", "--separate-sources",
                                        "--vad", "pyannote", "--glossary", str(glossary),
                                        "-o", "translation-ta.num_beams=2"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.output)
    assert parsed["options"] == {
        "separate_sources": True, "vad": "pyannote",
        "translation": {"glossary": "Bollywood\t\nचाय\tchai\n"},
        "translation-ta": {"num_beams": 2},
    }


def test_without_flags_no_options_and_bad_vad_choice_refused():
    assert json.loads(CliRunner().invoke(probe, []).output)["options"] == {}
    result = CliRunner().invoke(probe, ["--vad", "webrtc"])
    assert result.exit_code == 2 and "webrtc" in result.output


def test_speaker_names_go_to_subtitle_gen_as_given():
    parsed = json.loads(CliRunner().invoke(probe, ["--speaker-names", "A=Anna,B=Ben"]).output)
    assert parsed["options"] == {"subtitle_gen": {"speaker_names": "A=Anna,B=Ben"}}
    from captionbus.contracts.declarations.subtitle_gen import SubtitleGenParams
    assert SubtitleGenParams(**parsed["options"]["subtitle_gen"]).speaker_names == {"A": "Anna", "B": "Ben"}
    assert SubtitleGenParams(speaker_names="Anna, Ben").speaker_names == {"1": "Anna", "2": "Ben"}


@pytest.mark.parametrize("workflow", ["transcribe", "chunked", "subtitle"])
def test_speaker_names_reach_every_subtitle_gen_node_of_a_job(workflow):
    """The flag's option goes where every `-o subtitle_gen.*` goes: each subtitle_gen node's
    params, every language branch included, checked by the stage's params model."""
    from captionbus.contracts import ArtifactRef, JobSpec
    from captionbus.contracts.declarations.subtitle_gen import SubtitleGenParams
    from captionbus.coordinator.graph import DEFAULT_WORKFLOWS_DIR, load_workflows

    options = parse_options(tuple(json.loads(CliRunner().invoke(
        probe_raw, ["--speaker-names", "SPEAKER_01=Ben,A=Anna"]).output)))
    job = JobSpec(job_id="j1", input=ArtifactRef(key="0" * 64, name="film.mp4", size=10), workflow=workflow,
                  source_language="hi", target_languages=["en", "ta"] if workflow == "subtitle" else [],
                  options=options)
    plan = load_workflows(DEFAULT_WORKFLOWS_DIR)[workflow].expand(job)
    nodes = [n for n in plan.active() if n.stage == "subtitle_gen"]
    assert len(nodes) == (3 if workflow == "subtitle" else 1)
    for node in nodes:
        params = SubtitleGenParams.model_validate(node.params)
        assert params.speaker_names == {"SPEAKER_01": "Ben", "A": "Anna"}, node.id


@click.command()
@with_job_options
def probe_raw(workflow, source, targets, options):
    click.echo(json.dumps(list(options)))


def test_chunk_s_becomes_the_chunk_stage_target_and_is_never_negative():
    parsed = json.loads(CliRunner().invoke(probe, ["-w", "chunked", "--chunk-s", "45"]).output)
    assert parsed["options"] == {"chunk": {"target_s": 45.0}}
    assert CliRunner().invoke(probe, ["--chunk-s", "-1"]).exit_code == 2


def test_devices_pin_one_cuda_device_per_replica_in_turn():
    assert device_envs("0,1", 3) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"},
                                      {"CUDA_VISIBLE_DEVICES": "0"}]
    assert device_envs(None, 2) == [None, None]
    with pytest.raises(UserError, match="CUDA device indexes"):
        device_envs("0;rm -rf /", 1)


def test_speakers_flag_is_the_diarization_stage_param_and_is_checked_at_submit():
    from captionbus.runner import SubmitError, validate_job

    parsed = json.loads(CliRunner().invoke(probe, ["--speakers", "2-4", "-o", "diarization.embedder=dvector"]).output)
    assert parsed["options"] == {"diarization": {"speakers": "2-4", "embedder": "dvector"}}
    stages = validate_job("chunked", "en", [], local_stack=False, options=parsed["options"])
    assert "diarization" in stages
    for options, message in [
        ({"diarization": {"speakers": "5-2"}}, "speakers '5-2': need 1 <= MIN <= MAX <= 20"),
        ({"diarization": {"speakers": "many"}}, "use auto, a number (3) or a range (2-4)"),
        ({"diarization": {"embedder": "x-vector", "speakers": "auto"}}, "embedder="),
        ({"speakers": "auto"}, "use --speakers VALUE"),
    ]:
        with pytest.raises(SubmitError, match=re.escape(message)):
            validate_job("transcribe", "en", [], local_stack=False, options=options)
    assert validate_job("speech", "en", [], local_stack=False, options={"diarization": {"speakers": "auto"}}) == [
        "demux", "asr", "vad", "diarization", "transcript_join", "subtitle_gen"]
