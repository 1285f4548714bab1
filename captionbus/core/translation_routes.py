"""Which translation backend serves a language pair, and the FLORES-200 codes its model wants.

Pure data from `config/translation.yaml`: the coordinator routes fan-out branches with it and
refuses unsupported pairs at submit; the translation services read their code tables from it.
No ML library here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from captionbus.core.settings import config_path


class UnsupportedPair(ValueError):
    """No configured backend translates this pair; the message says what would."""


@dataclass(frozen=True)
class ModelSlot:
    model: str  # Hugging Face id or local dir
    model_env: str | None = None  # env var that overrides `model`


@dataclass(frozen=True)
class Backend:
    name: str
    stage: str
    languages: dict[str, str]  # ISO 639-1 -> FLORES-200
    models: dict[str, ModelSlot] = field(default_factory=dict)
    needs: str | None = None  # "at_least_one_indic": one side must not be English

    def knows(self, source: str, target: str) -> bool:
        if source not in self.languages or target not in self.languages:
            return False
        if self.needs == "at_least_one_indic":
            return source != "en" or target != "en"
        return True

    def flores(self, code: str) -> str:
        try:
            return self.languages[code]
        except KeyError:
            raise UnsupportedPair(f"{self.name} has no FLORES code for {code!r}") from None


@dataclass(frozen=True)
class RouteTable:
    order: tuple[str, ...]
    backends: dict[str, Backend]

    def route(self, source: str | None, target: str) -> Backend:
        if not source:
            raise UnsupportedPair(
                f"translating into {target!r} needs the source language: pass -s (detection "
                "happens too late to pick a translation model)"
            )
        if source == target:
            raise UnsupportedPair(f"source and target are both {source!r}: nothing to translate")
        for name in self.order:
            backend = self.backends[name]
            if backend.knows(source, target):
                return backend
        known = sorted({code for b in self.backends.values() for code in b.languages})
        raise UnsupportedPair(
            f"no translation backend for {source} -> {target} (config/translation.yaml knows: {', '.join(known)})"
        )


def load_routes(path: Path | None = None) -> RouteTable:
    path = path or config_path("translation.yaml")
    return _load(str(path))


@lru_cache(maxsize=4)
def _load(path: str) -> RouteTable:
    data = yaml.safe_load(Path(path).read_text())
    backends = {}
    for name, raw in data["backends"].items():
        bad = [code for code in raw["languages"] if not isinstance(code, str)]
        if bad:
            raise ValueError(f"{path}: backend {name}: language keys {bad} are not strings (quote them: YAML reads no/on/yes as booleans)")
        models = {k: ModelSlot(**v) for k, v in (raw.get("models") or {}).items()}
        backends[name] = Backend(
            name=name, stage=raw["stage"], languages=dict(raw["languages"]), models=models, needs=raw.get("needs")
        )
    order = tuple(data.get("route_order") or backends)
    unknown = [n for n in order if n not in backends]
    if unknown:
        raise ValueError(f"{path}: route_order names unknown backends {unknown}")
    return RouteTable(order, backends)


def backend_for_stage(stage: str) -> Backend:
    """The backend a translation service serves (its stage name), for its code table."""
    for backend in load_routes().backends.values():
        if backend.stage == stage:
            return backend
    raise KeyError(f"no backend in config/translation.yaml has stage {stage!r}")
