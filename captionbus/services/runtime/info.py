"""Who is running a stage: interpreter, env, packages, hardware, model (WorkerInfo)."""
from __future__ import annotations

import os
import platform
import socket
import sys
from importlib import metadata
from typing import Any, Iterable

from captionbus import core
from captionbus.contracts import WorkerInfo, worker_identity
from captionbus.core import hardware, settings
from captionbus.core.envinfo import report_packages

# Reported by every worker; stages add their own (torch, whisperx ...) via report_packages.
BASE_PACKAGES = ("captionbus", "pydantic", "nats-py")


def package_versions(names: Iterable[str]) -> dict[str, str]:
    out = {}
    for name in dict.fromkeys(names):  # ordered, no duplicates
        if name == "captionbus":  # not installed in a stage env: its code is lent by the launcher
            out[name] = core.__version__
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def env_packages() -> list[str]:
    """Distributions the managed env's spec asks to report (its manifest), if any."""
    try:
        return report_packages()
    except Exception:
        return []


def hardware_summary() -> dict[str, str]:
    try:
        return hardware.load().summary()
    except Exception as e:  # a broken probe must not keep a worker from starting
        return {"cpu_count": str(os.cpu_count() or 0), "error": f"{type(e).__name__}: {e}"[:200]}


def worker_info(
    stage: str,
    env: str,
    *,
    replica: str | None = None,
    packages: Iterable[str] = (),
    hardware: dict[str, str] | None = None,
    model: str | None = None,
    backend: str | None = None,
    host: str | None = None,
    setup_error: str | None = None,
    launcher: str | None = None,
    slots: int = 1,
) -> WorkerInfo:
    # CAPTIONBUS_HOST_ID (Settings.host_id) when the caller has it: containers and cloned VMs
    # often share a hostname, and the fleet tells hosts apart by this name.
    host = host or _host_id()
    replica = replica or "0"
    return WorkerInfo(
        stage=stage,
        env=env,
        interpreter=sys.executable,
        python_version=platform.python_version(),
        host=host,
        pid=os.getpid(),
        worker_id=worker_identity(host, stage or "none", replica, os.getpid()),
        replica=replica,
        packages=package_versions([*BASE_PACKAGES, *env_packages(), *packages]),
        hardware=hardware_summary() if hardware is None else hardware,
        model=model,
        backend=backend,
        setup_error=setup_error,
        launcher=launcher,
        slots=slots,
    )


def _host_id() -> str:
    """CAPTIONBUS_HOST_ID (or the hostname) made a token, as every process of this host names it."""
    try:
        return settings.load().host_id
    except Exception:  # a bad setting elsewhere must not hide who this is
        return "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:64] or "host"


def flat_metadata(info: WorkerInfo) -> dict[str, str]:
    """$SRV metadata must be dict[str, str]: nested maps become `pkg.<name>` / `hw.<key>`."""
    out: dict[str, str] = {}
    for key, value in info.model_dump().items():
        if isinstance(value, dict):
            prefix = {"packages": "pkg", "hardware": "hw"}.get(key, key)
            out.update({f"{prefix}.{k}": str(v) for k, v in value.items()})
        elif value is not None:
            out[key] = str(value)
    return out


def worker_summary(info: WorkerInfo) -> dict[str, str]:
    """The short form carried on every StageCompleted / StageFailed: who ran it, where, and with
    which key package versions (`pkg.<name>`), so a job's record says what ran where.

    No host path: these events reach the job's tenant whole (the gateway's SSE stream and
    webhooks), and the interpreter's path names the operator's home and layout. Operators read
    it in $SRV INFO (flat_metadata: `captionbus workers`, the dashboard's workers view)."""
    summary = {"worker_id": info.worker_id, "stage": info.stage, "replica": info.replica, "env": info.env,
               "python": info.python_version, "host": info.host, "pid": str(info.pid)}
    summary.update({f"pkg.{name}": version for name, version in info.packages.items() if version != "missing"})
    return summary


def describe(definition: Any, resources: Any) -> str | None:
    if definition.describe_model is None:
        return None
    try:
        return definition.describe_model(resources)
    except Exception as e:
        return f"unknown ({type(e).__name__})"
