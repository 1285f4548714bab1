"""Service options as pydantic-settings loads them (the launcher and the stage runtime alike).

`load_options(Model, options, environ)` is how a stage's ServiceOptions (a plain pydantic model in
its declaration; captionbus.contracts.stage_options says what it declares) become one process's settings:
the model as a pydantic-settings `BaseSettings` subclass, so the environment variables
(`env_prefix` + field name, or a field's `validation_alias`), their precedence (init arguments,
i.e. `--option` / CAPTIONBUS_OPTION_<KEY>, over the environment over the default), empty values
as unset and case-insensitive names are pydantic-settings' rules, not ours. The result is an
instance of that subclass, so `isinstance(options, AsrOptions)` holds in the stage.

Why in core: `run`/`up` (the launcher) check options before any stage starts and the runtime
parses them in the stage's process; core is what both import (and it never reaches an ML library).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, TypeVar

from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from captionbus.contracts.stage_options import ServiceOptions

O = TypeVar("O", bound=ServiceOptions)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, over a given mapping instead of os.environ (the
    launcher plans for an environment it is handed; tests). The one method replaced is where
    EnvSettingsSource reads os.environ (pydantic-settings 2.16)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def settings_class(model: type[O], environ: Mapping[str, str] | None = None) -> type[O]:
    """`model` as a BaseSettings subclass reading `environ` (None: os.environ). A model without an
    env_prefix, or an open one (extra="allow"), reads no environment: with an empty prefix every
    variable (PATH, THREADS ...) would be a candidate."""
    reads_environment = bool(model.env_prefix) and model.model_config.get("extra") != "allow"

    def sources(cls, settings_cls, init_settings: PydanticBaseSettingsSource, env_settings: PydanticBaseSettingsSource,
                dotenv_settings, file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        if not reads_environment:
            return (init_settings,)
        return (init_settings, env_settings if environ is None else _MappingEnvSource(settings_cls, environ))

    config = SettingsConfigDict(**{
        **BaseSettings.model_config, **model.model_config,  # the model's extra/frozen win over BaseSettings'
        "env_prefix": model.env_prefix,
        "env_ignore_empty": True,  # CAPTIONBUS_ASR_DEVICE= is unset, not ""
        "enable_decoding": False,  # a variable is text: lists are comma-separated (captionbus.contracts.stage_options.comma_list)
    })
    return type(model.__name__, (model, BaseSettings), {
        "model_config": config, "settings_customise_sources": classmethod(sources), "__module__": model.__module__,
        "__doc__": model.__doc__, "__qualname__": model.__qualname__})


def load_options(model: type[O], options: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None) -> O:
    """One service process's options: `options` (--option, CAPTIONBUS_OPTION_<KEY>) over the
    environment (`environ`, default os.environ) over the defaults; raises pydantic.ValidationError."""
    init = model.prepare(options or {}, os.environ if environ is None else environ)
    return settings_class(model, environ)(**init)
