"""Device choice, the same way for every stage's setup(). (Service options themselves are typed
models in each stage's declaration, loaded by captionbus.core.service_options.load_options into
SetupContext.options.)"""
from __future__ import annotations

from captionbus.core import hardware


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
