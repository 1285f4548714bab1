from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from captionbus.contracts.artifacts import ArtifactRef
from captionbus.contracts.ids import JobId, NodeId, StageName
from captionbus.contracts.version import SCHEMA_VERSION


def request_key(job_id: str, node: str, attempt: int) -> str:
    """The idempotency key of one try of one node: `<job>.<node>.<attempt>`. It is a request's
    Nats-Msg-Id, the stem of the ids of the events about it, and what the coordinator's result
    token signs; everything that names a request builds it here."""
    return f"{job_id}.{node}.{attempt}"


class StageRequest(BaseModel):
    """Published by the coordinator on `subjects.stage_request(stage)`.

    (job_id, node, attempt) identifies one try; `key` is its idempotency key and the
    Nats-Msg-Id of the publish.
    """

    schema_version: str = SCHEMA_VERSION
    job_id: JobId
    stage: StageName
    node: NodeId
    attempt: int = Field(ge=1)
    inputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    # Several artifacts under one name (e.g. one subtitle track per language for mux).
    input_lists: dict[str, list[ArtifactRef]] = Field(default_factory=dict)
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the stage's params; their model is captionbus.contracts.stage_specs.STAGES[stage].params "
                    "(JSON Schema: params_<stage>.json), checked at submit and again by the stage",
    )
    deadline_s: float | None = Field(default=None, description="the coordinator gives up after this")
    token: str | None = Field(default=None, description=(
        "proof of delivery: the worker echoes it in its stage_completed / stage_failed; the coordinator "
        "refuses a result without the token of the request it sent (a forged result)"))

    @property
    def key(self) -> str:
        return request_key(self.job_id, self.node, self.attempt)
