"""`captionbus subs check FILE` and `captionbus subs fix FILE`.

Both read a file the same way (encoding detected or --encoding, cue times strict, an error names
the line) and refuse the same files (unreadable, or no cues), so what `check` accepts `fix` can
re-flow. Exit codes follow captionbus.exitcodes: 0 clean / written, 1 `check` found problems,
2 the file or an option is unusable.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from captionbus import exitcodes
from captionbus.contracts.languages import check_language
from captionbus.core.subtitles import read_subtitles, reflow
from captionbus.core.subtitles.check import check
from captionbus.core.subtitles.formats import FORMATS, format_for, render, write_subtitles
from captionbus.core.subtitles.rules import load_rules


class SubsError(click.ClickException):
    exit_code = exitcodes.USAGE


def _language(ctx, param, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_language(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


_rule_options = [
    click.option("--profile", default="default", show_default=True, help="Rules profile in config/subtitles.yaml."),
    click.option("--language", "-l", default=None, callback=_language,
                 help="Language code (ISO 639-1) for per-language rules, e.g. hi; see `captionbus languages`."),
    click.option("--fps", type=float, default=None, help="Video frame rate for the gap rule (default 24)."),
    click.option("--encoding", default=None,
                 help="The file's text encoding (default: detected: BOM, UTF-8, else Windows-1252/Latin-1)."),
]


def _with_rule_options(f):
    for option in reversed(_rule_options):
        f = option(f)
    return f


def _rules(profile: str, language: str | None):
    try:
        return load_rules(profile, language)
    except (KeyError, ValueError) as e:
        raise SubsError(str(e)) from None


def _read(file: Path, encoding: str | None):
    """The file's cues, or one line saying why there are none (the same for check and fix)."""
    try:
        fmt = format_for(file)
        cues = read_subtitles(file, fmt, encoding=encoding)
    except (ValueError, KeyError, OSError) as e:  # SubtitleFileError, pysubs2's parse errors
        raise SubsError(f"{file}: {e}") from None
    if not cues:
        raise SubsError(f"{file} has no subtitle cues: is it SRT, WebVTT or ASS?")
    return cues


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@click.group("subs", short_help="Check and re-flow subtitle files.")
def subs() -> None:
    """Check and re-flow subtitle files against the readability rules."""


@subs.command("check", short_help="Count rule violations; exit 1 if any.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_with_rule_options
@click.option("--examples", default=5, show_default=True, help="Violations to list.")
def check_cmd(file: Path, profile: str, language: str | None, fps: float | None, encoding: str | None,
              examples: int) -> None:
    """Count rule violations per rule and show the reading-speed distribution. Exit 1 if any."""
    rules = _rules(profile, language)
    report = check(_read(file, encoding), rules, fps, str(file))
    click.echo(report.render(max_examples=examples))
    sys.exit(exitcodes.OK if report.ok else exitcodes.JOB_FAILED)


@subs.command("fix", short_help="Re-flow a file to meet the rules.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", default=None,
              help="Where to write (default: FILE.fixed.EXT; - for stdout); the format follows the suffix.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output format (default: from the output's suffix, or the input's for stdout).")
@_with_rule_options
def fix_cmd(file: Path, output: str | None, fmt: str | None, profile: str, language: str | None,
            fps: float | None, encoding: str | None) -> None:
    """Re-flow FILE: new cue boundaries, line breaks and times that meet the rules."""
    rules = _rules(profile, language)
    to_stdout = output == "-"
    out = None if to_stdout else Path(output) if output else file.with_name(f"{file.stem}.fixed{file.suffix}")
    if out is not None:
        if out.is_dir():
            raise SubsError(f"-o {out}: is a folder; give a file name")
        if fmt is None:
            try:
                format_for(out)
            except ValueError as e:
                raise SubsError(f"-o {out}: {e}") from None
    result = reflow(_read(file, encoding), rules, fps)
    if to_stdout:
        sys.stdout.write(render(result.cues, fmt or format_for(file)))
        sys.stdout.flush()
        where = "stdout"
    else:
        try:
            write_subtitles(result.cues, out, fmt)
        except OSError as e:
            raise SubsError(f"-o {out}: cannot write it ({e.strerror or e})") from None
        where = str(out)
    # The summary goes to stderr when the subtitles go to stdout, so a pipe gets only subtitles.
    report = click.get_text_stream("stderr" if to_stdout else "stdout")
    click.echo(f"wrote {where}: {_plural(len(result.cues), 'cue')}, "
               f"{_plural(len(result.problems), 'problem')} left", file=report)
    for p in result.problems[:20]:
        click.echo(f"  cue {p.cue + 1 if p.cue is not None else '-'}: {p.rule}: {p.message}", file=report)
