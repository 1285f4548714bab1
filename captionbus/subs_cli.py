"""`captionbus subs check FILE` and `captionbus subs fix FILE`."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from core.subtitles import check_file, fix_file
from core.subtitles.formats import FORMATS
from core.subtitles.rules import load_rules

_rule_options = [
    click.option("--profile", default="default", show_default=True, help="profile in config/subtitles.yaml"),
    click.option("--language", "-l", default=None, help="language code for per-language rules (e.g. hi)"),
    click.option("--fps", type=float, default=None, help="video frame rate for the gap rule (default 24)"),
]


def _readable_subtitles(action):
    """Run `action()`; a file that is not a subtitle file is one line, not a traceback."""
    try:
        return action()
    except UnicodeDecodeError as e:
        raise click.ClickException(f"not a text subtitle file (bytes at {e.start} are not UTF-8)") from None
    except (ValueError, KeyError, OSError) as e:  # pysubs2's parse errors derive from these
        raise click.ClickException(f"cannot read it as SRT, WebVTT or ASS: {e}") from None


def _with_rule_options(f):
    for option in reversed(_rule_options):
        f = option(f)
    return f


@click.group("subs", short_help="Check and re-flow subtitle files.")
def subs() -> None:
    """Check and re-flow subtitle files against the readability rules."""


@subs.command("check", short_help="Count rule violations; exit 1 if any.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_with_rule_options
@click.option("--examples", default=5, show_default=True, help="violations to list")
def check_cmd(file: Path, profile: str, language: str | None, fps: float | None, examples: int) -> None:
    """Count rule violations per rule and show the reading-speed distribution. Exit 1 if any."""
    rules = load_rules(profile, language)
    report = _readable_subtitles(lambda: check_file(file, rules, fps))
    if report.cues == 0 and file.read_bytes().strip():
        raise click.ClickException(f"{file} has no subtitle cues: is it SRT, WebVTT or ASS?")
    click.echo(report.render(max_examples=examples))
    sys.exit(0 if report.ok else 1)


@subs.command("fix", short_help="Re-flow a file to meet the rules.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="where to write (default: FILE.fixed.EXT); the format follows the suffix")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="output format")
@_with_rule_options
def fix_cmd(file: Path, output: Path | None, fmt: str | None, profile: str, language: str | None,
            fps: float | None) -> None:
    """Re-flow FILE: new cue boundaries, line breaks and times that meet the rules."""
    rules = load_rules(profile, language)
    out = output or file.with_name(f"{file.stem}.fixed{file.suffix}")
    result = _readable_subtitles(lambda: fix_file(file, out, rules, fps, fmt))
    click.echo(f"wrote {out}: {len(result.cues)} cues, {len(result.problems)} problems left")
    for p in result.problems[:20]:
        click.echo(f"  cue {p.cue + 1 if p.cue is not None else '-'}: {p.rule}: {p.message}")

