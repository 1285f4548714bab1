from __future__ import annotations

from pydantic import BaseModel, Field


class WorkerInfo(BaseModel):
    """What a running stage service says about itself (also its $SRV metadata)."""

    stage: str
    env: str
    interpreter: str
    python_version: str
    host: str
    pid: int
    worker_id: str
    packages: dict[str, str] = Field(default_factory=dict, description="key package versions")
    hardware: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    backend: str | None = None
    setup_error: str | None = Field(default=None, description=(
        "why this replica's setup (model loading) failed; it then fails the requests no healthy replica takes"))
