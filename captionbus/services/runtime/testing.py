"""A stand-in for the runtime's StageContext, for stage authors' unit tests: call a handler
directly (also from a stage's own interpreter, e.g. the whisperx env in the asr test) with
`make_fake_context(work_dir, "mystage", inputs={"audio": wav}, params={...})`.

This is not the bus: just the argument a handler receives, with inputs mapped straight to
local files, progress and warnings recorded for assertions. Params are parsed with the stage's
declared model and JSON inputs with `ctx.input(name, Model)` exactly as the runtime does (the
same code: captionbus.services.runtime.context), so a BadInput a handler's unit test sees is the one a job
would fail with."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from captionbus.contracts import ArtifactRef, StageRequest
from captionbus.contracts.speech import TurnSummary
from captionbus.services.runtime.context import TypedInputs
from captionbus.services.runtime.definition import OpenParams, declared_spec, parse_params


@dataclass
class FakeStageContext(TypedInputs):
    request: StageRequest
    work_dir: Path
    files: dict[str, Path]
    file_lists: dict[str, list[Path]] = field(default_factory=dict)
    resources: Any = None
    log: Any = field(default_factory=lambda: structlog.get_logger("test-stage"))
    metrics: dict[str, float] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    speaker_turns: TurnSummary | None = None
    progress_events: list[tuple[float, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cache_blockers: list[str] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)  # key -> file, for ctx.artifact

    @property
    def params(self) -> Any:
        """request.params parsed with the stage's model, as the runtime hands them over
        (BadInput when they do not fit it)."""
        spec = declared_spec(self.request.stage)
        return parse_params(spec.params if spec else OpenParams, self.request.params, self.request.stage)

    def input_path(self, name: str) -> Path:
        return self.files[name]

    def input_paths(self, name: str) -> list[Path]:
        return self.file_lists[name]

    def artifact(self, slot: str, ref: ArtifactRef) -> Path:
        """An artifact the params name, from `artifacts` (its key -> a local file)."""
        if ref.key not in self.artifacts:
            raise KeyError(f"{slot}: no artifact {ref.key[:12]}... given to make_fake_context(artifacts=...)")
        return self.artifacts[ref.key]

    def progress(self, fraction: float, message: str = "") -> None:
        assert 0.0 <= fraction <= 1.0, fraction
        self.progress_events.append((fraction, message))

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def skip_cache(self, reason: str) -> None:
        self.cache_blockers.append(reason)

    def check_cancelled(self) -> None:
        pass  # a test's job is never cancelled


def artifact_ref(path: Path, name: str | None = None) -> ArtifactRef:
    return ArtifactRef(
        key=hashlib.sha256(path.read_bytes()).hexdigest(),
        name=name or path.name,
        size=path.stat().st_size,
    )


def make_fake_context(
    work_dir: Path,
    stage: str,
    inputs: dict[str, Path] | None = None,
    input_lists: dict[str, list[Path]] | None = None,
    params: dict[str, Any] | None = None,
    resources: Any = None,
) -> FakeStageContext:
    inputs = inputs or {}
    input_lists = input_lists or {}
    request = StageRequest(
        job_id="jtest-0001",
        stage=stage,
        node=stage,
        attempt=1,
        inputs={k: artifact_ref(p) for k, p in inputs.items()},
        input_lists={k: [artifact_ref(p) for p in ps] for k, ps in input_lists.items()},
        params=params or {},
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    return FakeStageContext(
        request=request, work_dir=work_dir, files=dict(inputs), file_lists=dict(input_lists), resources=resources
    )
