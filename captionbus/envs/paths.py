"""Where each stage environment lives on this host, and the command that builds it."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from captionbus.core import settings


def create_command(envs: Iterable[str]) -> str:
    return "captionbus envs create " + " ".join(envs)


def env_dir(env: str) -> Path:
    return settings.load().envs_dir / env


def env_python(env: str) -> Path:
    """The interpreter of an environment (whether or not it is built yet)."""
    if sys.platform == "win32":
        return env_dir(env) / "Scripts" / "python.exe"
    return env_dir(env) / "bin" / "python"
