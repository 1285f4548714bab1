"""Which managed environment this interpreter is (for worker info and log lines).

Runs inside stage environments, so stdlib only. The facts come from the manifest that
`captionbus envs create` wrote into the venv (the launcher imports MANIFEST from here); package versions are read by
captionbus/services/runtime/info.py from the names given here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from captionbus.core.settings import load

# Written by `captionbus envs create` into each venv it builds, last, so it means "built".
MANIFEST = "captionbus-env.json"


def current_manifest() -> dict:
    """The manifest of the venv this interpreter runs from; {} outside a managed env."""
    try:
        data = json.loads((Path(sys.prefix) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def current_env() -> str:
    """This interpreter's env name: from its manifest, else $CAPTIONBUS_ENV, else "unmanaged"
    (e.g. a developer's own interpreter, worth seeing in logs since production never runs so)."""
    return current_manifest().get("name") or load().env or "unmanaged"


def report_packages() -> list[str]:
    """Distributions whose versions this env reports (its spec's `report_versions`)."""
    return list(current_manifest().get("report_versions") or ["captionbus"])
