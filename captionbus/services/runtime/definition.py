"""What a stage author writes: one handler function with a typed body, plus optional setup.

A stage's name, env, params model, outputs and service options are its declaration's StageSpec
(`captionbus/contracts/declarations/<folder>.py`, which the coordinator and the CLI read too); its
StageDefinition takes them from `spec=`. The runtime validates every request's params against
`params` before the handler runs (a bad one is BadInput) and hands the parsed model over as
`ctx.params`; setup() gets the parsed service options as `SetupContext.options`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from captionbus.contracts import ArtifactRef, StageRequest
from captionbus.contracts.speech import TurnSummary
from captionbus.contracts.stage_declaration import StageSpec, explain
from captionbus.contracts.stage_options import ServiceOptions
from captionbus.contracts.stage_specs import STAGES
from captionbus.core.service_options import load_options
from captionbus.services.runtime.errors import BadInput

M = TypeVar("M", bound=BaseModel)


class OpenParams(BaseModel):
    """Params of a stage that declares none (ad-hoc test stages): anything goes, unchecked."""

    model_config = ConfigDict(extra="allow", frozen=True)


class OpenOptions(ServiceOptions):
    """Service options of a stage that declares none: kept as given."""

    model_config = ConfigDict(extra="allow", frozen=True)


def parse_params(model: type[BaseModel], raw: Mapping[str, Any], stage: str) -> Any:
    """`raw` request params as `model`, or BadInput with one line naming the stage's keys."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        keys = model.own_fields() if hasattr(model, "own_fields") else sorted(model.model_fields)
        raise BadInput(f"bad {stage} params: {explain(error)} ({stage} params: {', '.join(keys)})") from None


def declared_spec(stage: str) -> StageSpec | None:
    """The stage's declaration (captionbus/contracts/declarations/<folder>.py); None for an ad-hoc test stage."""
    return STAGES.get(stage)


def options_model(stage: str) -> type[ServiceOptions]:
    spec = declared_spec(stage)
    return spec.options if spec is not None else OpenOptions


class StageContext(Protocol):
    """Handed to a handler for one request. Handlers run in a worker thread; every method here
    is safe to call from it."""

    request: StageRequest
    params: Any  # request.params parsed with the stage's params model (StageDefinition.params)
    work_dir: Path  # private to this (job, node, attempt); removed afterwards
    resources: Any  # whatever setup() returned: the warm model
    log: structlog.typing.FilteringBoundLogger  # bound to job / stage / node / attempt / env
    metrics: dict[str, float]  # filled by the handler, published with the result
    items: dict[str, int]  # a list output's item count, for workflows that fan out over it
    speaker_turns: TurnSummary | None  # who speaks when, bounded: put on the node's record (diarization sets it)
    delivery: int  # 1 on the first delivery of this request, 2 on its first redelivery ...

    def input_path(self, name: str) -> Path:
        """A local file with the bytes of request.inputs[name] (fetched over the bus if needed)."""

    def input_paths(self, name: str) -> list[Path]:
        """Local files for request.input_lists[name], in order."""

    def artifact(self, slot: str, ref: ArtifactRef) -> Path:
        """A local file with the bytes of an artifact named in the params (e.g. the diarization
        stage's reference clips), fetched over the bus like an input."""

    def input(self, name: str, model: type[M]) -> M:
        """request.inputs[name], a JSON document, parsed as `model` (e.g. Transcript). Raises
        BadInput with one line naming the input, the model and what is wrong."""

    def input_list(self, name: str, model: type[M]) -> list[M]:
        """request.input_lists[name], each parsed as `model`, in order (BadInput as for input)."""

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
    # The stage's ServiceOptions (its declaration's model). Given a dict (`serve --option k=v`),
    # it is loaded here (captionbus.core.service_options.load_options), the stage's environment variables
    # filling in what the dict leaves unset; raises pydantic.ValidationError on a bad one.
    options: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.options, BaseModel):
            self.options = load_options(options_model(self.stage), self.options or {}, os.environ)


# handler(request, ctx) -> {output name: local file}. The runtime stores each file as an
# artifact and publishes StageCompleted; raising BadInput / Retryable / anything else decides
# between term, nak-with-delay and (after max_deliver) a failed job.
Handler = Callable[[StageRequest, StageContext], dict[str, Path]]


@dataclass
class StageDefinition:
    handle: Handler
    # The stage's declaration (captionbus/contracts/declarations/<folder>.py); name, params, outputs and
    # options come from it. Ad-hoc test stages leave it out and give a name (and may give the
    # rest).
    spec: StageSpec | None = None
    name: str = ""
    setup: Callable[[SetupContext], Any] | None = None
    # The request params model, the outputs the handler may return (empty: not checked, e.g.
    # noop returns its inputs) and the service options model.
    params: type[BaseModel] = OpenParams
    outputs: tuple[str, ...] = ()
    options: type[ServiceOptions] = OpenOptions
    # Package versions to report in worker info ($SRV metadata); importlib.metadata names.
    report_packages: tuple[str, ...] = ()
    # Describes the loaded model for worker info, given what setup() returned.
    describe_model: Callable[[Any], str | None] | None = None
    # The model's identity known before setup() loads it, given the SetupContext: e.g. the
    # configured model path and a size/mtime stamp of its files (runtime.cache.path_stamp).
    # With it the stage cache keys on this instead of describe_model's result and answers a hit
    # while the model still loads; without it (or when it raises) lookups wait for setup().
    # It must change whenever the loaded model would: changing the model must be a miss.
    declare_model: Callable[[SetupContext], str | None] | None = None
    slots: int = 1  # requests one process works on at once
    # A service option that sets `slots` per process instead (asr: `workers`, its decoders that
    # share one model load); the worker advertises them (WorkerInfo.slots) for the coordinator.
    slots_option: str | None = None
    # Reuse outputs of an identical earlier request (captionbus/services/runtime/cache.py). Bump
    # cache_version when a code change alters what the stage produces for the same inputs.
    cacheable: bool = True
    cache_version: str = "1"
    # Request params this stage never reads (e.g. the job's source_language for demux): left out
    # of the cache key so a job that differs only there reuses the output. List only what is
    # certainly unread: a param wrongly listed here serves stale results.
    cache_ignores: tuple[str, ...] = ()
    # What a request really reads, as digests that replace its `inputs` in the cache key, or None
    # for the default (every input's content hash). The asr stage on one chunk of a film gives the
    # chunk's samples: a film with one changed scene redoes only that scene's chunk.
    cache_inputs: Callable[[Any, Any], dict[str, str] | None] | None = None

    def __post_init__(self) -> None:
        if self.spec is None:
            if not self.name:
                raise ValueError("a StageDefinition needs spec= (its declaration) or, for a test stage, name=")
            return
        # What is left at its default comes from the declaration. A value given beside the spec
        # wins: tests derive stages from a real one (dataclasses.replace(NOOP, name="probe",
        # outputs=...)); tests/unit/test_stage_declarations.py holds every real stage to its spec.
        self.name = self.name or self.spec.name
        if self.params is OpenParams:
            self.params = self.spec.params
        if not self.outputs:
            self.outputs = self.spec.outputs
        if self.options is OpenOptions:
            self.options = self.spec.options

    def parse_params(self, raw: Mapping[str, Any]) -> Any:
        """The request params as this stage's model; BadInput when they do not fit it."""
        return parse_params(self.params, raw, self.name)
