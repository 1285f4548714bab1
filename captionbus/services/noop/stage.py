"""A stage that does nothing on purpose: for runtime tests and the hop benchmark.

Params: declaration.NoopParams (sleep_s, fail, fail_times, warn).
Inputs are passed through under their own names (so it declares no outputs to check); with no
inputs it writes `out.txt` (output `out`); with `write_bytes` N it writes N random bytes as `out`
(store-full tests).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from captionbus.contracts.declarations.noop import NOOP, NoopParams
from captionbus.services.runtime import (
    BadInput,
    Retryable,
    SetupContext,
    StageContext,
    StageDefinition,
)

_FAILURES = {
    "bad_input": lambda: BadInput("noop was asked to fail: bad input"),
    "retryable": lambda: Retryable("noop was asked to fail: try again"),
    "crash": lambda: RuntimeError("noop was asked to crash"),
}


def setup(ctx: SetupContext) -> dict:
    # `fail_setup` (a service option) stands in for a model that cannot load, for runtime tests.
    # `setup_s` stands in for a model that takes that long to load.
    time.sleep(float(getattr(ctx.options, "setup_s", 0) or 0))
    reason = getattr(ctx.options, "fail_setup", None)
    if reason:
        raise RuntimeError(reason)
    return {"loaded_at": time.time(), "options": ctx.options}


def handle(request, ctx: StageContext) -> dict[str, Path]:
    p: NoopParams = ctx.params
    if p.warn:
        ctx.warn(p.warn)
    if p.fail:
        if ctx.delivery <= (p.fail_times if p.fail_times is not None else 1 << 30):
            raise _FAILURES[p.fail]()
    sleep_s = p.sleep_s
    deadline = time.monotonic() + sleep_s
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
        ctx.progress(1 - left / sleep_s)
    if p.write_bytes:
        out = ctx.work_dir / "out.bin"
        with open(out, "wb") as f:
            for start in range(0, p.write_bytes, 1 << 20):
                f.write(os.urandom(min(1 << 20, p.write_bytes - start)))
        return {"out": out}
    if request.inputs:
        return {name: ctx.input_path(name) for name in request.inputs}
    out = ctx.work_dir / "out.txt"
    out.write_text(f"{request.key}\n")
    return {"out": out}


STAGE = StageDefinition(
    spec=NOOP,
    handle=handle,
    setup=setup,
    describe_model=lambda resources: "none",
    cacheable=False,  # its params script faults (sleep, crash): every request must really run
)
