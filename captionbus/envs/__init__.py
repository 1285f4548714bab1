"""Stage environments: specs (`envs/*.toml`), the stage -> env map (`config/stages.yaml`), uv builds.

Cheap to import (no subprocess, no ML libraries): the coordinator and the CLI call
`require_envs` on every submit.
"""
from captionbus.envs.manager import (
    BROKEN,
    MISSING,
    OK,
    STALE,
    EnvCreateError,
    EnvStatus,
    check,
    create,
    is_built,
    quick_state,
    read_manifest,
)
from captionbus.envs.spec import EnvSpec, SpecError, get_spec, load_specs
from captionbus.envs.stages import (
    EnvsMissing,
    check_optional,
    env_for_stage,
    env_python,
    env_states,
    envs_for_stages,
    interpreter_for_stage,
    load_stage_map,
    missing_envs_for_workflow,
    require_envs,
    validate_config,
    workflow_stages,
)
from captionbus.core.envinfo import current_env, report_packages

__all__ = [
    "BROKEN", "MISSING", "OK", "STALE",
    "EnvCreateError", "EnvSpec", "EnvStatus", "EnvsMissing", "SpecError",
    "check", "check_optional", "create", "env_for_stage", "env_python", "env_states", "envs_for_stages", "get_spec",
    "interpreter_for_stage", "is_built", "load_specs", "load_stage_map",
    "missing_envs_for_workflow", "quick_state", "read_manifest", "require_envs",
    "report_packages", "current_env", "validate_config", "workflow_stages",
]
