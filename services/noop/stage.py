"""A stage that does nothing on purpose: for runtime tests and the hop benchmark.

params:
  sleep_s: float       work this long (in small steps, reporting progress)
  fail: bad_input | retryable | crash   raise that kind of error ...
  fail_times: int      ... on the first N deliveries only (default: every delivery)
  warn: str            publish this StageWarning first
Inputs are passed through under their own names; with no inputs it writes `out.txt`.
"""
from __future__ import annotations

import time
from pathlib import Path

from services.runtime import (
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
    return {"loaded_at": time.time(), "options": ctx.options}


def handle(request, ctx: StageContext) -> dict[str, Path]:
    p = request.params
    if p.get("warn"):
        ctx.warn(str(p["warn"]))
    if p.get("fail"):
        if p["fail"] not in _FAILURES:
            raise BadInput(f"noop: unknown fail mode {p['fail']!r}; use {', '.join(_FAILURES)}")
        if ctx.delivery <= int(p.get("fail_times", 1 << 30)):
            raise _FAILURES[p["fail"]]()
    sleep_s = float(p.get("sleep_s", 0))
    deadline = time.monotonic() + sleep_s
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
        ctx.progress(1 - left / sleep_s)
    if request.inputs:
        return {name: ctx.input_path(name) for name in request.inputs}
    out = ctx.work_dir / "out.txt"
    out.write_text(f"{request.key}\n")
    return {"out": out}


STAGE = StageDefinition(
    name="noop",
    handle=handle,
    setup=setup,
    describe_model=lambda resources: "none",
    cacheable=False,  # its params script faults (sleep, crash): every request must really run
)
