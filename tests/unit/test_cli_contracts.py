"""The CLI's contracts that need no bus: one exit-code table, help on every option, no cut-off
help lines, arguments refused before anything starts."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from captionbus import exitcodes
from captionbus.cli import main, parse_since

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_exit_code_table_has_one_meaning_per_number_and_is_in_the_readme():
    codes = [code for code, _ in exitcodes.TABLE]
    assert codes == [0, 1, 2, 3, 4, 130, 141] and len(set(codes)) == len(codes)
    assert exitcodes.markdown_table() in README.read_text()


@pytest.mark.parametrize("path, command", list(_commands(main)), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_option_has_help_and_no_help_line_is_cut(path, command):
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            assert (param.help or "").strip(), f"captionbus {' '.join(path)} {param.opts[0]} has no help"
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    cut = [line for line in result.output.splitlines() if line.rstrip().endswith("...") and not line.startswith("Usage:")]
    assert not cut, cut


def test_top_level_help_lines_are_whole():
    result = CliRunner().invoke(main, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    assert not [line for line in result.output.splitlines() if line.rstrip().endswith("...") and not line.startswith("Usage:")], result.output


def cli(*args: str, home: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPTIONBUS_HOME": str(home), **(extra_env or {})}
    env.pop("NATS_URL", None)
    return subprocess.run([sys.executable, "-m", "captionbus", *args], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\0" * 16)
    return path


@pytest.mark.parametrize("out, says", [
    ("/proc/captionbus-x", "--out /proc/captionbus-x: cannot create it"),
    ("{clip}", "exists and is not a folder"),
])
def test_run_refuses_an_unwritable_out_before_anything_starts(tmp_path, clip, out, says):
    done = cli("run", str(clip), "--out", out.format(clip=clip), home=tmp_path / "home")
    assert done.returncode == exitcodes.USAGE, done.stderr
    assert says in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "home" / "nats").exists()  # no server was started


def test_subtitle_without_targets_is_refused(tmp_path, clip):
    done = cli("run", str(clip), "-w", "subtitle", "-s", "en", home=tmp_path / "home")
    assert done.returncode == exitcodes.USAGE
    assert "workflow 'subtitle' needs target languages: add -t" in done.stderr


def test_vad_choice_is_refused_where_the_workflow_has_no_choice(tmp_path, clip):
    done = cli("run", str(clip), "--vad", "pyannote", home=tmp_path / "home")
    assert done.returncode == exitcodes.USAGE
    assert "workflow 'transcribe' always uses Silero VAD; --vad chooses for translate, subtitle, chunked and chunked_aligned" in done.stderr


def test_up_refuses_an_unknown_stage_before_nats_starts(tmp_path):
    done = cli("up", "--stages", "asr,nosuch", home=tmp_path / "home")
    assert done.returncode == exitcodes.USAGE
    assert "unknown stage 'nosuch'" in done.stderr and "NATS at" not in done.stderr
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").iterdir())


@pytest.mark.parametrize("args, says", [(["-w", "nosuch"], "no workflow 'nosuch'"),
                                        (["-w", "../x"], "invalid workflow name")])
def test_up_refuses_an_unknown_workflow_before_nats_starts(tmp_path, args, says):
    done = cli("up", *args, home=tmp_path / "home")
    assert done.returncode == exitcodes.USAGE and says in done.stderr, done.stderr
    assert not (tmp_path / "home" / "nats").exists()


def test_serve_refuses_an_unknown_stage(tmp_path):
    done = cli("serve", "nosuch", home=tmp_path / "home")
    assert done.returncode == exitcodes.USAGE and "unknown stage 'nosuch'" in done.stderr


def test_commands_that_need_the_bus_exit_4_without_one(tmp_path):
    for args in (["jobs"], ["status", "j1"], ["events", "j1"], ["workers"]):
        done = cli(*args, home=tmp_path / "home")
        assert done.returncode == exitcodes.BUS, (args, done.stderr)
        assert "captionbus up" in done.stderr


def test_languages_lists_codes_with_names():
    result = CliRunner().invoke(main, ["languages"])
    assert result.exit_code == 0
    assert re.search(r"^hi\s+hin\s+Hindi$", result.output, re.M)
    assert re.search(r"^ta\s+tam\s+Tamil$", result.output, re.M)


def test_logs_prints_a_stage_log_and_refuses_unknown_stages(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "asr-0.log").write_text("".join(f"line {i}\n" for i in range(100)))
    env = {"CAPTIONBUS_HOME": str(tmp_path)}
    result = CliRunner().invoke(main, ["logs", "asr", "-n", "3"], env=env)
    assert result.exit_code == 0 and result.output.splitlines() == ["line 97", "line 98", "line 99"]
    assert CliRunner().invoke(main, ["logs", "vad"], env=env).exit_code == exitcodes.USAGE
    assert CliRunner().invoke(main, ["logs", "nosuch"], env=env).exit_code == exitcodes.USAGE


def test_since_takes_durations_and_iso_times():
    from datetime import UTC, datetime, timedelta

    ago = datetime.now(UTC) - parse_since("10m")
    assert timedelta(minutes=9, seconds=59) < ago < timedelta(minutes=10, seconds=5)
    assert parse_since("2026-12-01T03:00") == datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    with pytest.raises(click.ClickException):
        parse_since("yesterday")
