"""What several command groups share: the root group, the consoles, the job options, the
connection to a running bus."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console

from captionbus import exitcodes
from captionbus.cli.errors import CaptionbusGroup, UserError, console
from captionbus.contracts.declarations.chunk import DEFAULT_CHUNK_TARGET_S
from captionbus.core.settings import load

stdout = Console()

__all__ = ["console", "stdout", "main", "UserError"]


@click.group(cls=CaptionbusGroup)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="captionbus")
def main(verbose: int) -> None:
    """Films and videos to subtitles, as stage services on NATS."""
    from captionbus.core.logging import configure_logging

    # Interactive commands speak through their own output; job failures arrive as one line.
    # Long-running parts (up, coordinator) log at INFO: they are services.
    level = {0: "ERROR", 1: "INFO"}.get(verbose, "DEBUG")
    configure_logging(level=level)


def service_logging() -> None:
    from captionbus.core.logging import configure_logging

    if click.get_current_context().find_root().params.get("verbose", 0) == 0:
        configure_logging(level="INFO")


def terminate_like_ctrl_c() -> None:
    """SIGTERM (a `kill`, a CI timeout) cleans up like Ctrl-C: services and server stop."""

    def _raise(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def end_of_service(signum: int | None, say=console) -> None:
    """How a service command (`up`, `coordinator`, `dashboard`, `gateway`, `serve --replicas`)
    ends once a signal stopped it: Ctrl-C (SIGINT) exits 130, as README's exit-code table says
    (they all exited 0); SIGTERM, the way systemd and `up` stop a service, is a normal stop: 0."""
    if signum == signal.SIGINT:
        say.print("interrupted")  # `say`: `up --log-format json` says it as a JSON line
        sys.exit(exitcodes.INTERRUPTED)


def split_languages(value: str | None) -> list[str]:
    return [code.strip() for code in (value or "").split(",") if code.strip()]


def parse_options(pairs: tuple[str, ...]) -> dict:
    """`-o asr.model=/models/x -o subtitle_gen.profile=fast` → {"asr": {"model": ...}, ...}."""
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"option {pair!r} is not KEY=VALUE (e.g. asr.model=base)")
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
        target = options
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):  # e.g. --vad silero -o vad.threshold=0.6
                raise UserError(f"option {part} is given both as a value and as {part}.KEY=VALUE")
        if isinstance(target.get(leaf), dict):
            raise UserError(f"option {key} is given both as a value and as {key}.KEY=VALUE")
        target[leaf] = value
    return options


job_options = [
    click.option("-w", "--workflow", default="transcribe", show_default=True,
                 help="Workflow graph in config/workflows: transcribe, translate, subtitle, chunked."),
    click.option("-s", "--source-language", "source", default=None,
                 help="Spoken language (ISO 639-1); default: detect (translate/subtitle need it)."),
    click.option("-t", "--target-languages", "targets", default=None, help="Comma-separated languages to translate into."),
    click.option("-o", "--option", "options", multiple=True, help="Stage option STAGE.KEY=VALUE (repeatable)."),
    click.option("--separate-sources", is_flag=True, default=False,
                 help="Separate vocals from music/effects (htdemucs) before VAD and ASR."),
    click.option("--vad", "vad", type=click.Choice(["silero", "pyannote"]), default=None,
                 help="Voice activity detection backend (default silero)."),
    click.option("--speakers", "speakers", default=None, metavar="auto|N|MIN-MAX",
                 help="Label who speaks (diarization stage, env diarization): auto, a count (3) or a range "
                      "(2-4); words and segments of transcript.json get speakers. Same as "
                      "-o diarization.speakers=VALUE."),
    click.option("--glossary", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
                 help="TSV of terms to keep or map in translation (source<TAB>target)."),
    click.option("--chunk-s", "chunk_s", type=click.FloatRange(min=0), default=None,
                 help="Workflows with a chunk stage (transcribe, chunked): target chunk length in seconds, one "
                      f"asr request per chunk (0: the whole film in one; default {DEFAULT_CHUNK_TARGET_S:g} for audio "
                      f"longer than CAPTIONBUS_CHUNK_ABOVE_S, longer for a film too long for one job's chunks)."),
    click.option("--speaker-ref", "speaker_ref", multiple=True, metavar="NAME=CLIP",
                 help="A known speaker: a 2-10 s clip of their voice (any audio FFmpeg reads); the speaker "
                      "whose voice matches it is labelled NAME instead of SPEAKER_nn (transcript, voices, "
                      "SDH names). Repeatable; switches on --speakers auto unless given."),
    click.option("--speaker-names", "speaker_names", default=None, metavar="A=Anna,B=Ben",
                 help="SDH: name speakers in the subtitles where they start talking ([Anna] Hi.). Keys are "
                      "places in order of first appearance (A or 1 = whoever speaks first) or diarization "
                      "labels (SPEAKER_00=Anna); a plain list Anna,Ben names them in order. Needs a "
                      "transcript with speakers."),
]


def reference_clips(flags: tuple[str, ...], folder: Path) -> dict[str, Path]:
    """`--speaker-ref NAME=CLIP` flags -> name -> the clip converted to 16 kHz mono WAV in
    `folder`, each checked (decodes, 2-10 s); a bad one is refused here (exit 2), before any job."""
    from captionbus.core import speaker_refs

    try:
        pairs = [speaker_refs.parse_flag(flag) for flag in flags]
        speaker_refs.check_count([name for name, _ in pairs])
        return {name: speaker_refs.convert(clip, folder / f"reference-{n}.wav", f"--speaker-ref {name}={clip}")
                for n, (name, clip) in enumerate(pairs)}
    except speaker_refs.ReferenceError as e:
        raise UserError(str(e)) from None


def names_subtitles(workflow: str) -> bool:
    from captionbus.runner import names_subtitles as writes

    return writes(workflow)


def sdh_names(flags: tuple[str, ...], given: str | None) -> dict[str, str]:
    from captionbus.core import speaker_refs

    try:
        return speaker_refs.sdh_names([speaker_refs.parse_flag(flag)[0] for flag in flags], given)
    except speaker_refs.ReferenceError as e:
        raise UserError(str(e)) from None


def with_job_options(fn):
    """The shared job flags; the convenience ones become `-o` options the graph and stages read."""

    @functools.wraps(fn)
    def wrapper(*args, separate_sources: bool, vad: str | None, speakers: str | None, glossary: Path | None,
                chunk_s: float | None, speaker_names: str | None = None, speaker_ref: tuple[str, ...] = (),
                options=(), **kwargs):
        extra = []
        if speaker_ref and speakers is None:
            speakers = "auto"  # a known speaker needs the diarization stage
        if speakers is not None:  # checked with the params (DiarizationParams) at submit
            extra.append(f"diarization.speakers={json.dumps(speakers)}")
        if speaker_ref and names_subtitles(kwargs.get("workflow", "")):
            # known speakers are named in the subtitles too (under --speaker-names)
            names = sdh_names(speaker_ref, speaker_names)
            extra.append(f"subtitle_gen.speaker_names={json.dumps(names)}")
        elif speaker_names is not None:
            # As given: subtitle_gen's params read the A=Anna,B=Ben text (and refuse a bad one at submit).
            extra.append(f"subtitle_gen.speaker_names={json.dumps(speaker_names)}")
        if chunk_s is not None:
            extra.append(f"chunk.target_s={json.dumps(chunk_s)}")
        if separate_sources:
            extra.append("separate_sources=true")
        if vad:
            extra.append(f"vad={json.dumps(vad)}")
        if glossary is not None:
            # Inline text, not a path: the translation service may run on another host.
            extra.append(f"translation.glossary={json.dumps(glossary.read_text(encoding='utf-8'))}")
        if not speaker_ref:  # speaker_refs= only with the flag (the command defaults it to None)
            return fn(*args, options=tuple(options) + tuple(extra), **kwargs)
        with tempfile.TemporaryDirectory(prefix="captionbus-refs-") as folder:
            return fn(*args, options=tuple(options) + tuple(extra),
                      speaker_refs=reference_clips(speaker_ref, Path(folder)), **kwargs)

    for option in reversed(job_options):
        wrapper = option(wrapper)
    return wrapper


def check_out_dir(path: Path) -> Path:
    """The output folder, made now and proved writable: a job must not run for minutes and then
    find it cannot write its results (`--out /proc/x`, `--out some-file`)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot create it ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out {path}: not writable")
    return path


def exit_if_partial(outputs) -> None:
    """Exit 3 when the job completed without some target languages (their reasons are printed)."""
    failed = getattr(outputs, "failed_branches", None)
    if failed:
        console.print(f"job completed without: {', '.join(sorted(failed))}", highlight=False)
        sys.exit(exitcodes.PARTIAL)


insecure_option = click.option(
    "--insecure", is_flag=True,
    help="Allow a non-loopback NATS_URL without credentials and TLS (CAPTIONBUS_INSECURE=1).")


def require_secure(url: str, settings, insecure: bool) -> None:
    from captionbus.core.bus import require_secure as refuse_insecure

    refuse_insecure(url, settings, insecure)


def warn_if_insecure(url: str, settings) -> None:
    """A client command sends its credentials to `url`: say so when that is in clear text or
    unauthenticated off this host (`submit` refuses instead, unless --insecure)."""
    from captionbus.core.bus import insecure_reason

    reason = insecure_reason(url, settings)
    if reason is not None:
        console.print(f"[yellow]warning:[/] {reason}", highlight=False, soft_wrap=True)


def on_bus(name: str, action):
    """`await action(nc, js)` against the running bus (NATS_URL or the local `up`), then disconnect.
    The streams' check goes through a leader election like every read (captionbus.client.read)."""
    from captionbus.client import acting_for, read
    from captionbus.core.bus import client_tenant, connect, require_provisioned, resolve_url

    settings = load()
    url = resolve_url(settings)
    if not settings.insecure:
        warn_if_insecure(url, settings)

    async def go():
        nc = await connect(url, name, settings)
        try:
            js = nc.jetstream()
            # Behind the auth callout a client login acts for the tenant the server granted it: its
            # jobs only (captionbus.client.TENANT).
            tenant = await client_tenant(nc, settings)
            await read(lambda: require_provisioned(js, names_only=tenant is not None), "checking the bus's streams")
            with acting_for(tenant):
                return await action(nc, js)
        finally:
            with contextlib.suppress(Exception):  # a server that went away must not hold us here
                await asyncio.wait_for(nc.close(), 5)

    return asyncio.run(go())
