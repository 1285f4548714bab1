"""`python -m captionbus.services serve STAGE` / `python -m captionbus.services info [STAGE]`: the entry point every
stage environment's interpreter runs (launchers set CAPTIONBUS_ENV and NATS_URL)."""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import threading
from typing import Any

import structlog
from pydantic import ValidationError

from captionbus.contracts.ids import validate_token
from captionbus.contracts.stage_declaration import explain
from captionbus.contracts.stage_options import ServiceOptions
from captionbus.core import settings as settings_mod
from captionbus.core.bus import BusError, StagePolicy, resolve_url
from captionbus.core.envinfo import current_env
from captionbus.core.logging import configure_logging
from captionbus.core.service_options import load_options
from captionbus.services import declarations, stage_module
from captionbus.services.runtime.definition import StageDefinition
from captionbus.services.runtime.info import worker_info
from captionbus.services.runtime.serve import serve

OPTION_ENV_PREFIX = "CAPTIONBUS_OPTION_"  # CAPTIONBUS_OPTION_MODEL=base == --option model=base

# Stage processes phone nobody by default: pyannote.audio 4 sends usage telemetry on every
# model load (whisperx imports it too) unless this is off. A user may still turn it on.
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")


def env_name() -> str:
    """The launcher's CAPTIONBUS_ENV, else the managed env this interpreter belongs to."""
    return settings_mod.load().env or current_env()


def load_stage(stage: str) -> StageDefinition:
    if stage not in declarations():
        raise SystemExit(f"unknown stage {stage!r}; known: {', '.join(sorted(declarations()))}")
    # Imported only now: each environment has the libraries of its own stages only.
    return importlib.import_module(stage_module(stage)).STAGE


def parse_options(pairs: list[str], model: type[ServiceOptions] | None = None) -> dict[str, Any]:
    """k=v pairs (env vars first, command line wins); values are JSON when they parse as JSON.

    CAPTIONBUS_OPTION_<KEY> variables are ambient (`up` hands them to every stage), so only the
    keys `model` knows are taken from them; a command-line key the stage lacks is refused later,
    when the options are validated."""
    raw = {k[len(OPTION_ENV_PREFIX):].lower(): v for k, v in os.environ.items() if k.startswith(OPTION_ENV_PREFIX)}
    if model is not None and model.model_config.get("extra") == "forbid":
        raw = {k: v for k, v in raw.items() if k in model.model_fields or (k.startswith("model_") and "models" in model.model_fields)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option wants key=value, got {pair!r}")
        raw[key.strip()] = value
    options = {}
    for key, value in raw.items():
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _replica_id(value: str) -> str:
    try:
        return validate_token(value, "replica id")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captionbus.services", description="captionbus stage services")
    defaults = settings_mod.load()
    parser.add_argument("--log-level", default=defaults.log_level)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run one stage service (a replica) until SIGTERM")
    serve.add_argument("stage")
    serve.add_argument("--replica-id", default=None, type=_replica_id,
                       help="names this replica on its host (A-Z a-z 0-9 _ -; default 0): worker id "
                            "<host>/<stage>/<replica>/<pid>")
    serve.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="setup option for the stage (repeatable); also CAPTIONBUS_OPTION_<KEY>")
    serve.add_argument("--grace", type=float, default=defaults.grace_s,
                       help="seconds a running request may finish after SIGTERM")
    info = commands.add_parser("info", help="print this interpreter's WorkerInfo as JSON")
    info.add_argument("stage", nargs="?", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        definition = load_stage(args.stage) if args.stage else None
        info = worker_info(args.stage or "", env_name(),
                           packages=definition.report_packages if definition else ())
        print(info.model_dump_json(indent=2))
        return 0

    configure_logging(args.log_level)
    log = structlog.get_logger("captionbus.stage").bind(stage=args.stage, env=env_name())
    try:
        settings = settings_mod.load()
        definition = load_stage(args.stage)
        options = parse_options(args.option, definition.options)
        try:
            load_options(definition.options, options, os.environ)
        except ValidationError as e:  # before connecting: a typo must not wait for the bus
            log.error("bad service options", error=f"{args.stage} service options: {explain(e, 'option')}")
            return 2
        url = resolve_url(settings)
        asyncio.run(serve(
            definition, settings, url, env_name=env_name(), policy=StagePolicy.from_env(),
            stop=None, options=options, replica_id=args.replica_id, grace_s=args.grace,
        ))
    except BusError as e:
        log.error("stage service cannot start", error=str(e))
        return 2
    except Exception:
        log.exception("stage service crashed")
        return 1
    if threading.active_count() > 1:
        # A handler abandoned at the end of the grace period still holds a thread; its request
        # was nak'ed already, so exit without waiting for it.
        sys.stderr.flush()
        os._exit(0)
    return 0
