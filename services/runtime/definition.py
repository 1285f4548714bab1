"""What a stage author writes: one handler function with a typed body, plus optional setup."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import structlog

from contracts import StageRequest


class StageContext(Protocol):
    """Handed to a handler for one request. Handlers run in a worker thread; every method here
    is safe to call from it."""

    request: StageRequest
    work_dir: Path  # private to this (job, node, attempt); removed afterwards
    resources: Any  # whatever setup() returned: the warm model
    log: structlog.typing.FilteringBoundLogger  # bound to job / stage / node / attempt / env
    metrics: dict[str, float]  # filled by the handler, published with the result
    delivery: int  # 1 on the first delivery of this request, 2 on its first redelivery ...

    def input_path(self, name: str) -> Path:
        """A local file with the bytes of request.inputs[name] (fetched over the bus if needed)."""

    def input_paths(self, name: str) -> list[Path]:
        """Local files for request.input_lists[name], in order."""

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress 0..1; rate-limited, never blocks the handler for long.
        Raises Cancelled once the job has ended, so long work stops at its next report."""

    def check_cancelled(self) -> None:
        """Raise Cancelled if the job has ended (for loops that report no progress)."""

    def warn(self, message: str) -> None:
        """Publish a StageWarning event (e.g. a fallback was taken)."""

    def skip_cache(self, reason: str) -> None:
        """Keep this result out of the stage cache: it is a fallback that a rerun may improve
        (e.g. a model that failed to load this time)."""


@dataclass
class SetupContext:
    stage: str
    env: str
    models_dir: Path
    log: Any
    options: dict[str, Any] = field(default_factory=dict)  # from `serve --option k=v` / env vars


# handler(request, ctx) -> {output name: local file}. The runtime stores each file as an
# artifact and publishes StageCompleted; raising BadInput / Retryable / anything else decides
# between term, nak-with-delay and (after max_deliver) a failed job.
Handler = Callable[[StageRequest, StageContext], dict[str, Path]]


@dataclass
class StageDefinition:
    name: str
    handle: Handler
    setup: Callable[[SetupContext], Any] | None = None
    # Package versions to report in worker info ($SRV metadata); importlib.metadata names.
    report_packages: tuple[str, ...] = ()
    # Describes the loaded model for worker info, given what setup() returned.
    describe_model: Callable[[Any], str | None] | None = None
    slots: int = 1  # requests one process works on at once
    # Reuse outputs of an identical earlier request (services/runtime/cache.py). Bump
    # cache_version when a code change alters what the stage produces for the same inputs.
    cacheable: bool = True
    cache_version: str = "1"
    # Request params this stage never reads (e.g. the job's source_language for demux): left out
    # of the cache key so a job that differs only there reuses the output. List only what is
    # certainly unread: a param wrongly listed here serves stale results.
    cache_ignores: tuple[str, ...] = ()
