"""Export JSON Schema for every contract: `python -m captionbus.contracts.schema_export [--check]`.

Non-Python consumers (dashboards, other languages) read captionbus/contracts/schema/*.json; each stage's
request params are in `params_<stage>.json` (captionbus.contracts.stage_specs.STAGES).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel, TypeAdapter

from captionbus.contracts import ArtifactRef, JobSpec, JobState, StageRequest, WorkerInfo, WorkerState
from captionbus.contracts.events import JobEvent
from captionbus.contracts.speech import SpeakerTurns, SpeechRegions
from captionbus.contracts.stage_specs import STAGES
from captionbus.contracts.transcript import Transcript
from captionbus.contracts.version import SCHEMA_VERSION

SCHEMA_DIR = Path(__file__).parent / "schema"

MODELS: dict[str, object] = {
    "artifact_ref": ArtifactRef,
    "job_spec": JobSpec,
    "job_state": JobState,
    "stage_request": StageRequest,
    "worker_info": WorkerInfo,
    "worker_state": WorkerState,
    "job_event": JobEvent,
    "transcript": Transcript,
    "speech_regions": SpeechRegions,
    "speaker_turns": SpeakerTurns,
    **{f"params_{name}": spec.params for name, spec in STAGES.items()},
}


def render() -> dict[str, str]:
    out = {}
    for name, model in MODELS.items():
        if isinstance(model, type) and issubclass(model, BaseModel):
            schema = model.model_json_schema()
        else:
            schema = TypeAdapter(model).json_schema()
        schema["$id"] = f"https://captionbus.dev/schema/v{SCHEMA_VERSION}/{name}.json"
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def stale_files() -> list[str]:
    return [
        name
        for name, text in render().items()
        if not (SCHEMA_DIR / name).exists() or (SCHEMA_DIR / name).read_text() != text
    ]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = stale_files()
        if stale:
            print(f"stale JSON Schema: {', '.join(stale)}; run python -m captionbus.contracts.schema_export")
            return 1
        return 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, text in render().items():
        (SCHEMA_DIR / name).write_text(text)
    print(f"wrote {len(MODELS)} schemas to {SCHEMA_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
