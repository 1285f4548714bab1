"""structlog for every captionbus process: JSON lines off a tty (services, CI, log shippers),
readable console lines on one. Call `configure_logging()` once at process start.

Context that belongs on every line (job id, stage, node, attempt, env) is bound on the logger a
piece of code is handed (`log.bind(...)`), so it survives worker threads without contextvars.
"""
from __future__ import annotations

import logging as _stdlib_logging
import sys

import structlog

_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


def configure_logging(level: str | int = "INFO", json: bool | None = None) -> None:
    """Route structlog (and the stdlib loggers of libraries such as nats) to stderr.

    json=None: JSON when stderr is not a terminal.
    """
    numeric = level if isinstance(level, int) else _LEVELS.get(str(level).upper(), 20)
    if json is None:
        json = not sys.stderr.isatty()

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if json:
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]

    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,  # loggers made at import time must see this config
    )
    # Libraries log through the stdlib; keep their warnings, in the same stream.
    _stdlib_logging.basicConfig(
        level=max(numeric, _stdlib_logging.WARNING), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True,
    )
