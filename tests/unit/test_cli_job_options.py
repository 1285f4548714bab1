"""The job flags every submitting command shares become the options the graph and stages read."""
from __future__ import annotations

import json

import click
from click.testing import CliRunner

from captionbus.cli import _parse_options, _with_job_options


@click.command()
@_with_job_options
def probe(workflow, source, targets, options):
    click.echo(json.dumps({"workflow": workflow, "source": source, "targets": targets,
                           "options": _parse_options(options)}))


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
