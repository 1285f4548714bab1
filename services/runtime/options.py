"""Service options and device choice, the same way for every stage's setup()."""
from __future__ import annotations

import os
from typing import Any

from core import hardware
from services.runtime.definition import SetupContext


def option(ctx: SetupContext, key: str, env_var: str, default: Any = None) -> Any:
    """`serve STAGE --option key=value`, else the env var, else the default (empty = unset)."""
    value = ctx.options.get(key)
    if value in (None, ""):
        value = os.environ.get(env_var)
    return default if value in (None, "") else value


def default_device() -> str:
    """cuda where the host's hardware cache found a GPU *and* this env's torch can use it (a
    CPU torch wheel on a GPU host cannot), else cpu. Call from setup() of a torch stage."""
    if "cuda" not in hardware.load().kinds():
        return "cpu"
    try:
        import torch
    except ImportError:  # e.g. CTranslate2 without torch: trust the hardware cache
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"
