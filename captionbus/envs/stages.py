"""Stage -> environment map (`config/stages.yaml`) and the submit-time environment gate."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from captionbus.envs.manager import quick_state
from captionbus.envs.paths import create_command, env_python
from captionbus.envs.spec import SpecError, load_specs
from captionbus.contracts import ArtifactRef, JobSpec
from captionbus.contracts.stage_declaration import HARDWARE_KINDS, explain
from captionbus.coordinator.graph import WorkflowError, load_workflow
from captionbus.core import hardware as hw
from captionbus.core import settings


class EnvsMissing(RuntimeError):
    """Raised when stages need environments that are not built, or not built from today's spec.

    `str(err)` is exactly the command that fixes it, e.g. `captionbus envs create whisperx`, so the
    CLI can print it as-is. `err.envs` lists the environment names, `err.states` their states
    (missing / broken / stale).
    """

    def __init__(self, envs: list[str], states: dict[str, str] | None = None):
        self.envs = list(envs)
        self.states = dict(states or {})
        super().__init__(create_command(self.envs))



class StageRoute(BaseModel):
    """One stage's entry in config/stages.yaml (generated from its declaration's env/backends)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str
    backends: dict[Literal[HARDWARE_KINDS], str] = Field(default_factory=dict)  # hardware kind -> env


class StageMap(BaseModel):
    """config/stages.yaml: `stages: {stage: {env: NAME, backends: {kind: NAME}}}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: dict[str, StageRoute]


def stages_config_path() -> Path:
    return settings.config_path("stages.yaml")


def load_stage_map(path: Path | None = None) -> dict[str, StageRoute]:
    path = path or stages_config_path()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError(f"cannot read the stage map {path}: {e}") from e
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return dict(StageMap.model_validate(data).stages)
    except ValidationError as error:
        raise SpecError(f"{path}: {explain(error, 'key')} (a top-level `stages:` mapping of stage -> "
                        "{env: NAME, backends: {KIND: NAME}}; python -m captionbus.stagegen writes it)") from None


def validate_config(stage_map=None, specs=None) -> list[str]:
    """Disagreements between config/stages.yaml and envs/*.toml (empty when consistent).

    The map is what routing uses; a spec's `stages` says what its env is built for. A default env
    must have a spec that lists the stage; a backend env, once it has a spec, must list it too.
    """
    stage_map = stage_map if stage_map is not None else load_stage_map()
    specs = specs if specs is not None else load_specs()
    problems = []
    for stage, route in stage_map.items():
        if route.env not in specs:
            problems.append(f"stage {stage!r} -> env {route.env!r}, which has no envs/{route.env}.toml")
        for env in [route.env, *route.backends.values()]:
            if env in specs and stage not in specs[env].stages:
                problems.append(f"stage {stage!r} -> env {env!r}, but envs/{env}.toml does not list it")
    for spec in specs.values():
        for stage in spec.stages:
            if stage not in stage_map:
                problems.append(f"envs/{spec.name}.toml serves {stage!r}, missing from stages.yaml")
    return problems


def _hardware_kinds(hardware) -> list[str]:
    if hardware is None:
        return hw.load().kinds()
    if isinstance(hardware, str):
        return [hardware, "cpu"]
    return list(hardware.kinds())


def env_for_stage(stage: str, hardware=None, *, stage_map=None, specs=None) -> str:
    """The environment that runs `stage` on `hardware`.

    `hardware` is a `captionbus.core.hardware.Hardware`, a kind ("cuda", "mlx", "mps", "cpu"), or None
    for this host (cached detection). A backend entry wins only when its env has a spec, so a
    backend can be listed in config before its environment exists.
    """
    stage_map = stage_map if stage_map is not None else load_stage_map()
    if stage not in stage_map:
        raise SpecError(
            f"stage {stage!r} has no environment in {stages_config_path()} "
            f"(known stages: {', '.join(sorted(stage_map))})"
        )
    route = stage_map[stage]
    if route.backends:
        specs = specs if specs is not None else load_specs()
        for kind in _hardware_kinds(hardware):
            env = route.backends.get(kind)
            if env and env in specs:
                return env
    return route.env


def interpreter_for_stage(stage: str, hardware=None) -> Path:
    """Where `<python> -m captionbus.services serve <stage>` runs from on this host."""
    return env_python(env_for_stage(stage, hardware))


def envs_for_stages(stages: Iterable[str], hardware=None) -> list[str]:
    """Distinct environments the stages need, in first-use order."""
    stage_map, specs = load_stage_map(), load_specs()
    out: list[str] = []
    for stage in stages:
        env = env_for_stage(stage, hardware, stage_map=stage_map, specs=specs)
        if env not in out:
            out.append(env)
    return out


ALL_OPTIONAL = "all"


def _graph(workflow: str):
    path = settings.config_path(f"workflows/{workflow}.yaml")
    if not path.is_file():
        known = list(settings.config_files("workflows"))
        raise SpecError(f"no workflow {workflow!r} ({path} missing; known: {', '.join(known) or 'none'})")
    try:
        return load_workflow(path)
    except WorkflowError as e:
        raise SpecError(str(e)) from None


def _opt_in(node) -> bool:
    """A node a job runs only when its options ask (`when: options.diarization.speakers`,
    `options.vad == pyannote`, `options.separate_sources`): its condition reads the job's options
    and does not hold without them. A condition on the languages (`not source_language`) is no
    opt-in: a job without -s runs that node."""
    condition = node.condition()
    if condition is None or condition.path[0] != "options":
        return False
    return not condition.holds(JobSpec(job_id="jdefault", input=ArtifactRef(key="0" * 64, name="input", size=0)))


def optional_stages(workflow: str) -> list[str]:
    """Stages only opt-in nodes of `workflow` run (diarization behind --speakers, ...), in node order."""
    graph = _graph(workflow)
    default = set(workflow_stages(workflow))
    return list(dict.fromkeys(s for name, node in graph.nodes.items() if _opt_in(node)
                              for s in node.possible_stages(name) if s not in default))


def workflow_stages(workflow: str, with_optional: Iterable[str] = ()) -> list[str]:
    """Stages of `config/workflows/<workflow>.yaml`, in node order, without repeats: those of
    the nodes a job runs by default, and of the opt-in nodes (`_opt_in`) whose stage is in
    `with_optional` (ALL_OPTIONAL: every node).

    `up -w transcribe` and `envs create --for transcribe` used to count every node, so `up`
    started a diarization service (~1 GB RSS) wherever that env was built, for jobs that never ask
    for speakers; both now take opt-in stages by name (`--with diarization`). A job that asks for
    one on a stack without its worker ends with "no worker serves diarization" (the coordinator's
    unserved timeout). Callers that know the job pass its active stages to `require_envs` instead.
    """
    graph = _graph(workflow)
    wanted = set(with_optional)
    # The nodes one switch turns on come together: `speech` with --speakers runs vad and a
    # speaker_assign node (transcript_join) beside diarization, under the same `when:`.
    switches = {node.when for name, node in graph.nodes.items()
                if _opt_in(node) and (ALL_OPTIONAL in wanted or wanted & set(node.possible_stages(name)))}
    return list(dict.fromkeys(
        s for name, node in graph.nodes.items() for s in node.possible_stages(name)
        if not _opt_in(node) or node.when in switches))


def check_optional(workflows: Iterable[str], with_optional: Iterable[str]) -> None:
    """SpecError (one line) for a `--with` stage no opt-in node of these workflows runs."""
    offered = list(dict.fromkeys(s for w in workflows for s in optional_stages(w)))
    unknown = [s for s in with_optional if s != ALL_OPTIONAL and s not in offered]
    if unknown:
        raise SpecError(f"--with {', '.join(unknown)}: not an optional stage of {', '.join(workflows)} "
                        f"(optional: {', '.join(offered) or 'none'}; or --with all)")


def env_states(stages: list[str], hardware=None) -> dict[str, str]:
    """State (ok / stale / broken / missing) of each environment the stages need, from files only."""
    specs = load_specs()
    return {env: quick_state(specs[env]) if env in specs else "missing"
            for env in envs_for_stages(stages, hardware)}


def missing_envs_for_workflow(workflow_stages: list[str], hardware=None) -> list[str]:
    """Environments the stages need that are not ready on this host: missing, broken (a build
    that never finished) or stale (built from an older spec or project dependency list; its
    packages may not import today's code).

    A cheap filesystem check, fit for every submit; `captionbus envs check` does the thorough
    import check.
    """
    return [env for env, state in env_states(workflow_stages, hardware).items() if state != "ok"]


def require_envs(stages: list[str], hardware=None) -> None:
    """Raise EnvsMissing (message: the fixing command) unless every needed env is ready."""
    states = env_states(stages, hardware)
    missing = [env for env, state in states.items() if state != "ok"]
    if missing:
        raise EnvsMissing(missing, {env: states[env] for env in missing})
