"""Service options: how an operator sets up one stage service (`serve STAGE --option k=v`,
`CAPTIONBUS_OPTION_<KEY>`, or the stage's own environment variable, e.g. CAPTIONBUS_ASR_MODEL).
One pydantic model per stage, in the stage's declaration (`captionbus/contracts/declarations/<folder>.py`,
so the launcher checks and prints them without a stage's environment); `ServiceOptions.load` merges the sources and validates. The stage's setup()
receives the parsed model as `SetupContext.options`.

How they load (captionbus/services/runtime/options.py `load_options`): pydantic-settings, on a BaseSettings
subclass of the stage's model made at load, with its own precedence: the command line /
CAPTIONBUS_OPTION_<KEY> (init arguments) over the field's environment variable over the default.
A model names its variables with its `env_prefix` class variable (the upper-cased field name
follows it) or, for one field, `validation_alias="CAPTIONBUS_..."`; a model without a prefix reads
no environment (a bare `THREADS` must not configure a stage). An empty value counts as unset;
a list option is comma-separated text. Unknown keys and bad values are refused with the allowed
ones (e.g. `backend: Input should be 'whisperx' or 'mlx'`). The models stay plain pydantic here
(contracts depend on pydantic only): `env_prefix` is data the loader hands to pydantic-settings.
Defaults that depend on the host (a GPU, the number of cores, the models folder) are None here
and resolved by the stage; the description says how.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict

Device = Literal["cpu", "cuda"]
DEVICE = "cpu | cuda; unset: cuda where the hardware cache found a GPU this env's torch can use"
THREADS = "CPU threads; unset: the cores this process may use (CPU affinity, cgroup quota)"


def comma_list(value: Any) -> Any:
    """A BeforeValidator for list options: "en-indic, indic-en" (an env var, --option) -> a list."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


class ServiceOptions(BaseModel):
    # populate_by_name: a field whose alias is its environment variable is still set by name
    # (`--option mlx_openblas=false`).
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    env_prefix: ClassVar[str] = ""  # e.g. CAPTIONBUS_ASR_: the variables of this model's fields

    @classmethod
    def env_var(cls, name: str) -> str | None:
        """The environment variable that sets field `name` (None: none does)."""
        alias = cls.model_fields[name].validation_alias
        if isinstance(alias, str):
            return alias
        return f"{cls.env_prefix}{name.upper()}" if cls.env_prefix else None

    @classmethod
    def model_json_schema(cls, by_alias: bool = False, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Keyed by the names an operator types (`--option mlx_openblas=false`), not by the
        environment variables some fields take as their alias."""
        return super().model_json_schema(by_alias, *args, **kwargs)

    @classmethod
    def prepare(cls, options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
        """The given options as the loader's init arguments; an empty value counts as unset. A
        model may gather keys here that no single field or variable names (alignment's
        model_<lang>)."""
        return {k: v for k, v in options.items() if v not in (None, "")}


class NoOptions(ServiceOptions):
    """The stage has no service options."""
