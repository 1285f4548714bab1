"""Start and stop the dashboard as its own process (for `up`). Imports no web framework, so
`captionbus run` does not pay for one."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from captionbus.dashboard.auth import DEFAULT_LISTEN, check_bind, operator_token_from_env, parse_listen, token_from_env
from captionbus.stack import _die_with_parent
from captionbus.core.settings import Settings


def start_dashboard_process(settings: Settings, url: str, listen: str = DEFAULT_LISTEN) -> subprocess.Popen:
    """The dashboard beside `up`'s services: its own process (uvicorn takes over signal handling
    in the process it serves from), the launcher's interpreter, its log in HOME/logs. A bind that
    needs auth and has none is refused here, before anything starts."""
    check_bind(parse_listen(listen)[0], token_from_env() or operator_token_from_env())
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "dashboard.log", "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "captionbus", "dashboard", "--listen", listen],
            env={**os.environ, "NATS_URL": url, "CAPTIONBUS_HOME": str(settings.home)},
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent,
        )


def stop_dashboard_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
