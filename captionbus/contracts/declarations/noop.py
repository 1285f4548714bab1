"""noop: does nothing on purpose (runtime tests, benchmarks). No env serves it: tests run it in their own process.

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_options import ServiceOptions
from captionbus.contracts.stage_params import NOT_BOOL, StageParams

class NoopParams(StageParams):
    """The runtime tests' stage: it fails, sleeps and warns on request."""

    sleep_s: Annotated[float, Field(ge=0, le=3600), NOT_BOOL] = Field(0.0, description="work this long, reporting progress")
    fail: Literal["bad_input", "retryable", "crash"] | None = Field(None, description="raise that kind of error ...")
    fail_times: Annotated[int, Field(ge=0), NOT_BOOL] | None = Field(None, description="... on the first N deliveries only; unset: every one")
    warn: str | None = Field(None, description="publish this StageWarning first")
    write_bytes: Annotated[int, Field(ge=0, le=1 << 34), NOT_BOOL] = Field(
        0, description="write this many random bytes as output `out` instead of passing the inputs through")


class NoopOptions(ServiceOptions):
    """The runtime tests' stage keeps whatever it is given (setup() returns it)."""

    model_config = ConfigDict(extra="allow", frozen=True)


NOOP = StageSpec(
    name="noop",
    summary="does nothing on purpose (runtime tests, benchmarks)",
    env=None,
    params=NoopParams,
    outputs=(),
    options=NoopOptions,
    passthrough=True,
)

SPECS = (NOOP,)
