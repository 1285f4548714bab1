"""Service options: how an operator sets up one stage service (`serve STAGE --option k=v`,
`CAPTIONBUS_OPTION_<KEY>`, or the stage's own environment variable, e.g. CAPTIONBUS_ASR_MODEL).
One pydantic model per stage, in the stage's declaration (`services/<folder>/declaration.py`,
copied to contracts/declarations/ so the launcher checks and prints them without a stage's
environment); `ServiceOptions.load` merges the sources and validates. The stage's setup()
receives the parsed model as `SetupContext.options`.

Sources, first wins: the command line / CAPTIONBUS_OPTION_<KEY> (`options`), then the field's
environment variable (`env_var`: the model's `env_prefix` + the upper-cased name unless the field
names its own under json_schema_extra "env"), then the default. An empty value counts as unset.
Unknown keys and bad values are refused with the allowed ones (e.g. `backend: Input should be
'whisperx' or 'mlx'`). Defaults that depend on the host (a GPU, the number of cores, the models
folder) are None here and resolved by the stage; the description says how.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

Device = Literal["cpu", "cuda"]
DEVICE = "cpu | cuda; unset: cuda where the hardware cache found a GPU this env's torch can use"
THREADS = "CPU threads; unset: all cores"


class ServiceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    env_prefix: ClassVar[str] = ""

    @classmethod
    def env_var(cls, name: str) -> str | None:
        extra = cls.model_fields[name].json_schema_extra
        if isinstance(extra, dict) and "env" in extra:
            return str(extra["env"]) or None
        return f"{cls.env_prefix}{name.upper()}" if cls.env_prefix else None

    @classmethod
    def raw_values(cls, options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            env = cls.env_var(name)
            if env and environ.get(env, "") != "":
                values[name] = environ[env]
        values.update({k: v for k, v in options.items() if v not in (None, "")})
        return values

    @classmethod
    def load(cls, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None):
        """The options of one service process; raises pydantic.ValidationError."""
        return cls.model_validate(cls.raw_values(options or {}, environ or {}))


class NoOptions(ServiceOptions):
    """The stage has no service options."""
