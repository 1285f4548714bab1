"""Every command's failures, handled once: `CaptionbusGroup` is the root group's class, so a
command written tomorrow gets the same one-line errors and exit codes without a decorator.

It used to be `@_friendly_errors`, applied by hand to 15 commands; a command without it (the
gateway started without a bus) printed a full `BusError` traceback. Now the root group's
`invoke` wraps the whole call, subcommand groups (`envs`, `gateway`, `subs`) included.
"""
from __future__ import annotations

import os
import sys

import click
from rich.console import Console

from captionbus import exitcodes
from captionbus.core.settings import SettingsError, load

console = Console(stderr=True)


class UserError(click.ClickException):
    """An error a person can act on: one line, no traceback; exit code from `captionbus.exitcodes`
    (default 2: refused before anything started)."""

    exit_code = exitcodes.USAGE

    def __init__(self, message: str, exit_code: int = exitcodes.USAGE):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        # soft_wrap: a command to copy must not be broken across lines
        console.print(f"[bold red]error:[/] {self.message}", highlight=False, soft_wrap=True)


def _known_errors() -> dict[type[BaseException], int]:
    """Failures with a message meant for a person, by exit code. Imported when one happens, so
    `captionbus --help` does not load nats."""
    from captionbus.client import SubmitError
    from captionbus.runner import JobFailedError
    from captionbus.stack import ServiceStartError
    from captionbus.core.artifacts import ArtifactStoreFull
    from captionbus.core.bus import BusError

    known: dict[type[BaseException], int] = {
        BusError: exitcodes.BUS, JobFailedError: exitcodes.JOB_FAILED, ServiceStartError: exitcodes.JOB_FAILED,
        ArtifactStoreFull: exitcodes.JOB_FAILED, SubmitError: exitcodes.USAGE, ValueError: exitcodes.USAGE,
    }
    return known


def user_error(error: Exception) -> click.ClickException:
    """`error` as the one line a person reads, with its exit code."""
    from captionbus.envs import EnvsMissing

    if isinstance(error, EnvsMissing):  # its message is the exact fixing command
        states = getattr(error, "states", {}) or {}
        which = ", ".join(f"{env} ({states.get(env, 'missing')})" for env in error.envs)
        return UserError(f"stage environments not ready: {which}; run: {error}")
    for kind, code in _known_errors().items():
        if isinstance(error, kind):
            return UserError(str(error), exit_code=code)
    import nats.errors

    if isinstance(error, nats.errors.Error):  # a request the bus refused or never answered
        from captionbus.client import bus_reason

        return UserError(f"NATS: {bus_reason(error)}", exit_code=exitcodes.BUS)
    if _debug():
        raise error
    return UserError(f"internal error: {type(error).__name__}: {error} (set CAPTIONBUS_DEBUG=1 for the traceback)",
                     exit_code=exitcodes.JOB_FAILED)


def _debug() -> bool:
    """CAPTIONBUS_DEBUG (captionbus.core.settings); when the settings are what failed, the variable alone."""
    try:
        return load().debug
    except SettingsError:
        raw = os.environ.get("CAPTIONBUS_DEBUG", "")  # settings-exempt: the settings are what failed
        return raw.strip().lower() in ("1", "true", "yes", "on")


class CaptionbusGroup(click.Group):
    """The root group: known failures become one line, anything else says where the details
    went; Ctrl-C is "interrupted" and exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a reader gone (`| head`) shows here, not in the interpreter's exit
            return result
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except SystemExit:  # a command's own exit code (status: 1 for a failed job)
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                quiet_broken_pipe()
            raise
        except KeyboardInterrupt:
            console.print("interrupted")
            sys.exit(exitcodes.INTERRUPTED)
        except BrokenPipeError:
            quiet_broken_pipe()
        except Exception as e:
            raise user_error(e) from None


def quiet_broken_pipe() -> None:
    """The reader of stdout went away (`captionbus jobs --json | head`): stop without a word, as
    a process killed by SIGPIPE would (exit 141). It used to print `internal error:
    BrokenPipeError`. Python ignores SIGPIPE (a NATS socket write must raise, not kill), so the
    write raised; stdout now points at /dev/null so the interpreter's last flush cannot fail
    again (the recipe in Python's `signal` docs)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(exitcodes.BROKEN_PIPE)
