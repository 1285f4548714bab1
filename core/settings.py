"""Where things live and which bus to use. Environment variables override defaults.

CAPTIONBUS_HOME   data dir: embedded NATS data, env venvs, artifacts, models (default ~/.captionbus)
NATS_URL          join this server/cluster instead of starting the embedded one
CAPTIONBUS_ARTIFACTS  auto | local | object  (auto: local with the embedded bus, object with NATS_URL)
CAPTIONBUS_MODELS model cache dir (default $CAPTIONBUS_HOME/models)
CAPTIONBUS_ENVS   stage environment venvs (default $CAPTIONBUS_HOME/envs)
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(os.environ.get("CAPTIONBUS_CONFIG", PROJECT_ROOT / "config"))
ENVS_SPEC_DIR = PROJECT_ROOT / "envs"


def _host_id() -> str:
    raw = os.environ.get("CAPTIONBUS_HOST_ID") or socket.gethostname()
    token = "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)[:64]
    return token or "host"


@dataclass
class Settings:
    home: Path = field(
        default_factory=lambda: Path(
            os.environ.get("CAPTIONBUS_HOME", Path.home() / ".captionbus")
        ).expanduser()
    )
    nats_url: str | None = field(default_factory=lambda: os.environ.get("NATS_URL") or None)
    artifacts_mode: str = field(default_factory=lambda: os.environ.get("CAPTIONBUS_ARTIFACTS", "auto"))
    host_id: str = field(default_factory=_host_id)

    @property
    def nats_dir(self) -> Path:
        return self.home / "nats"

    @property
    def envs_dir(self) -> Path:
        # Separate override: venvs are gigabytes, and tests want a fresh home but shared venvs.
        return Path(os.environ.get("CAPTIONBUS_ENVS", self.home / "envs")).expanduser()

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def models_dir(self) -> Path:
        return Path(os.environ.get("CAPTIONBUS_MODELS", self.home / "models")).expanduser()

    @property
    def hardware_cache(self) -> Path:
        return self.home / "hardware.json"

    @property
    def embedded_url_file(self) -> Path:
        # Written by a running embedded server so other commands on this host can find it.
        return self.nats_dir / "url"

    def use_object_store(self) -> bool:
        if self.artifacts_mode == "object":
            return True
        if self.artifacts_mode == "local":
            return False
        return self.nats_url is not None


def load() -> Settings:
    return Settings()
