from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from captionbus.contracts.ids import validate_token
from captionbus.contracts.jobs import utcnow


def worker_identity(host: str, stage: str, replica: str, pid: int) -> str:
    """The one name of a stage worker process on every surface: `<host>/<stage>/<replica>/<pid>`.

    Every part is needed. Several stage services run on one host, each with replicas 0..N-1,
    so host + replica alone (the old `<host>-<replica>`) named five services on a host `vm-0`,
    and the dashboard, keyed by it, showed one worker of five. The pid tells apart a replica
    restarted after a crash (the old process shows as `lost`, the new one as live) and two
    launchers on one host that number their replicas alike. Host, stage and replica are tokens
    ([A-Za-z0-9_-], captionbus.contracts.ids), so `/` splits the id back into its parts unambiguously."""
    for value, what in ((host, "host id"), (stage, "stage name"), (replica, "replica id")):
        validate_token(value, what)
    return f"{host}/{stage}/{replica}/{int(pid)}"


class WorkerInfo(BaseModel):
    """What a running stage service says about itself (also its $SRV metadata)."""

    stage: str
    env: str
    interpreter: str
    python_version: str
    host: str
    pid: int
    worker_id: str = Field(description="captionbus.contracts.workers.worker_identity(host, stage, replica, pid)")
    replica: str = Field("0", description="the replica's id on its host (serve --replica-id)")
    packages: dict[str, str] = Field(default_factory=dict, description="key package versions")
    hardware: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    backend: str | None = None
    setup_error: str | None = Field(default=None, description=(
        "why this replica's setup (model loading) failed; it then fails the requests no healthy replica takes"))
    launcher: str | None = Field(default=None, max_length=16, description=(
        "who started the process: `up` or `run` (CAPTIONBUS_LAUNCHER); none for `captionbus serve`"))
    slots: int = Field(default=1, ge=1, description=(
        "requests it works on at once (asr: its decoders sharing one model load); the coordinator "
        "counts a stage's live workers by their slots"))


WorkerStateName = Literal["loading", "idle", "busy", "setup_failed"]


class CurrentRequest(BaseModel):
    """A request a worker holds now."""

    job_id: str
    node: str
    attempt: int
    since: datetime = Field(default_factory=utcnow)


class WorkerState(BaseModel):
    """What a stage worker is doing now: the `data` of its $SRV STATS reply (one per endpoint).

    $SRV INFO/PING metadata is fixed when a micro service registers, and a worker registers
    before its model loads (so it is discoverable, and answers cache hits, while `loading`):
    everything that changes afterwards (state, the loaded model, setup's error) is here.
    Readers merge it over the metadata (captionbus.client.worker_replies)."""

    state: WorkerStateName
    since: datetime = Field(default_factory=utcnow, description="when the worker entered this state")
    current: list[CurrentRequest] = Field(default_factory=list, description="requests it holds now")
    jobs_done: int = Field(0, description="requests completed (cache hits included) since it started")
    jobs_failed: int = Field(0, description="requests it reported failed or gave back for a retry")
    last_error: str | None = None
    model: str | None = Field(None, description="the loaded model, once setup is done")
    setup_error: str | None = None
