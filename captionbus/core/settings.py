"""Where things live and which bus to use: one typed model, read from environment variables.

Every process builds its `Settings` with `load()`; a bad value (e.g. `CAPTIONBUS_ARTIFACTS=objet`)
is refused with one line naming the variable and the allowed values (`SettingsError`, a
ValueError, which the CLI prints and exits 2 on) instead of silently meaning something else.
`captionbus stages` / README list the variables; the model below is the source.

Config files (workflows, the stage map, translation routes, subtitle rules, aligners) ship as
package data inside `core` (`captionbus/core/_data/config`, a link to the checkout's top-level `config/`
that the wheel build copies in), read with `importlib.resources`, so a non-editable install on a
fleet host has them. `CAPTIONBUS_CONFIG=DIR` points at a user's own config dir: a file there
overrides the packaged file of the same name (`config_path`), and the user's workflows are
listed beside the packaged ones.
"""
from __future__ import annotations

import os
import socket
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The directory holding the project's packages (a checkout's root, or site-packages).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The packaged defaults (a Path: `core` is a regular package on the file system).
DEFAULT_CONFIG_DIR = Path(str(resources.files("captionbus.core").joinpath("_data", "config")))
# The user's own config dir, whose files override the packaged ones; None when not set.
USER_CONFIG_DIR: Path | None = (
    Path(os.environ["CAPTIONBUS_CONFIG"]).expanduser() if os.environ.get("CAPTIONBUS_CONFIG") else None
)


def config_path(relative: str) -> Path:
    """The config file `relative` (e.g. "translation.yaml", "workflows/subtitle.yaml"): the user's
    copy when CAPTIONBUS_CONFIG has one, else the packaged default (which may not exist)."""
    if USER_CONFIG_DIR is not None:
        mine = USER_CONFIG_DIR / relative
        if mine.exists():
            return mine
    return DEFAULT_CONFIG_DIR / relative


def config_files(subdir: str, pattern: str = "*.yaml") -> dict[str, Path]:
    """Config files in `subdir` by stem, packaged ones overridden by the user's of the same name."""
    found = {p.stem: p for p in sorted((DEFAULT_CONFIG_DIR / subdir).glob(pattern))}
    if USER_CONFIG_DIR is not None:
        found.update({p.stem: p for p in sorted((USER_CONFIG_DIR / subdir).glob(pattern))})
    return dict(sorted(found.items()))


def config_dirs() -> list[Path]:
    """Every directory config is read from, defaults first (for fingerprints of what a worker read)."""
    return [DEFAULT_CONFIG_DIR, *([USER_CONFIG_DIR] if USER_CONFIG_DIR is not None else [])]


DAY = 24 * 3600.0
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY, "w": 7 * DAY}
_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_duration(text: str) -> float:
    """Seconds from "3600", "90m", "12h", "7d", "2w"; a bad value is left for the model to refuse."""
    raw = text.strip().lower()
    if raw and raw[-1] in _DURATION_UNITS:
        try:
            return float(raw[:-1]) * _DURATION_UNITS[raw[-1]]
        except ValueError:
            return text  # type: ignore[return-value]
    return raw  # type: ignore[return-value]


def parse_bytes(text: str) -> int:
    """Bytes from "1048576", "500M", "10G", "2GiB", "1.5T" (powers of 1024)."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b") if text.strip().lower() not in ("", "b") else text
    unit = raw[-1] if raw and raw[-1] in _BYTE_UNITS else ""
    try:
        return int(float(raw[:-1] if unit else raw) * _BYTE_UNITS[unit])
    except ValueError:
        return text  # type: ignore[return-value]


# CAPTIONBUS_EVENT_ACK_WAIT's lower bound (Settings.event_ack_wait says why).
EVENT_ACK_WAIT_MIN_S = 1.0


class SettingsError(ValueError):
    """A setting has a value captionbus cannot use; the message names the variable and the fix."""


def _host_token(raw: str) -> str:
    token = "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)[:64]
    return token or "host"


class Settings(BaseSettings):
    """The settings every process shares. Field names map to `CAPTIONBUS_<NAME>` variables, except
    `nats_url` (NATS_URL, the convention of NATS tools)."""

    # populate_by_name: code builds Settings(nats_url=..., artifacts_mode=...) by field name.
    model_config = SettingsConfigDict(env_prefix="CAPTIONBUS_", extra="ignore", validate_default=True,
                                      populate_by_name=True)

    home: Path = Field(default_factory=lambda: Path.home() / ".captionbus",
                       description="data dir: embedded NATS data, artifacts, logs, hardware cache")
    nats_url: str | None = Field(default=None, validation_alias="NATS_URL",
                                 description="join this server or cluster instead of starting the embedded one")
    artifacts_mode: Literal["auto", "local", "object"] = Field(
        default="auto", validation_alias="CAPTIONBUS_ARTIFACTS",
        description="auto: local files with the embedded bus, the object store with NATS_URL")
    host_id: str = Field(default_factory=socket.gethostname, description="names this host in worker info and artifacts")
    envs: Path | None = Field(default=None, description="stage environment venvs (default HOME/envs)")
    models: Path | None = Field(default=None, description="model cache (default HOME/models)")
    ffmpeg: Path | None = Field(default=None, description=(
        "the ffmpeg binary (default: ffmpeg on PATH, else the imageio-ffmpeg wheel's; captionbus/core/mediatools.py)"))
    ffprobe: Path | None = Field(default=None, description=(
        "the ffprobe binary (default: ffprobe on PATH, else probe through PyAV)"))
    # How to reach a secured bus (deploy/): at most one way to authenticate, and a CA for TLS.
    nats_creds: Path | None = Field(default=None, description="NATS credentials file (JWT + nkey seed, `.creds`)")
    nats_nkey: Path | None = Field(default=None, description="NATS nkey seed file")
    nats_user: str | None = Field(default=None, description="NATS user name (with CAPTIONBUS_NATS_PASSWORD)")
    nats_password: str | None = Field(default=None, description="NATS password for CAPTIONBUS_NATS_USER")
    nats_ca: Path | None = Field(default=None, description="CA file that signed the NATS servers' certificates (turns TLS on)")
    nats_cert: Path | None = Field(default=None, description="client certificate for TLS (with CAPTIONBUS_NATS_KEY)")
    nats_key: Path | None = Field(default=None, description="client private key for CAPTIONBUS_NATS_CERT")
    nats_inbox_prefix: str | None = Field(default=None, description=(
        "reply-subject prefix of this process's connections (default `_INBOX_<user>` when a user is set: "
        "deploy/nats/roles.conf lets each role read its own replies only)"))
    nats_auth_callout: bool = Field(default=False, description=(
        "the bus authenticates through `captionbus auth-callout`: log in with the user and password and "
        "a key made for each connection, which gets a reply prefix of its own (deploy/README.md)"))
    reconnect_attempts: int = Field(default=60, ge=0, description=(
        "reconnects to each server after the connection is lost, 0.5 s apart, before the process gives up"))
    ping_interval: float = Field(default=5.0, gt=0, description=(
        "seconds between a client's pings to its server; two unanswered in a row drop the connection "
        "and reconnect (a network cut without a reset is noticed in about 3 intervals)"))
    result_secret: str | None = Field(default=None, repr=False, description=(
        "the coordinators' shared key for request tokens (default: HOME/coordinator.secret)"))
    unserved_timeout: float = Field(default=600.0, ge=0, description=(
        "seconds a requested stage may go without any worker before the coordinator fails its node (0: never)"))
    setup_attempts: int = Field(default=3, ge=1, description=(
        "tries of a stage's setup (model loading) before its replica fails requests with the reason"))
    insecure: bool = Field(default=False, description=(
        "allow a non-loopback NATS_URL without credentials and TLS (coordinator, serve, up)"))
    # How JetStream hands out stage requests (captionbus.core.bus.StagePolicy) and how streams are created.
    ack_wait: float = Field(default=30.0, gt=0, description=(
        "seconds a delivered stage request may go without a heartbeat before JetStream redelivers it"))
    max_deliver: int = Field(default=5, ge=1, description=(
        "deliveries of one stage request before the coordinator fails its node"))
    # The coordinator's events consumer (captionbus.coordinator.service.events_consumer_config).
    # At least 1 s: an early stage result, put back every 2 s for 4 ack waits
    # (coordinator/service.EARLY_RESULT_RETRY_S), is dropped at its first delivery under 0.5 s instead
    # of waiting for the event that explains it, and the shorter the wait, the likelier JetStream
    # hands an event a live coordinator is still applying (a KV write and a publish, each a round
    # trip to the server) to another. Tests that wait for a killed coordinator's events set 2-6 s.
    event_ack_wait: float = Field(default=30.0, ge=EVENT_ACK_WAIT_MIN_S, description=(
        "seconds a job event handed to a coordinator may go unacknowledged (it stopped or died holding it) "
        "before JetStream hands it to another (at least 1); an early stage result is given up after 4 times "
        "this. A coordinator sets it on each partition's events consumer as it takes the partition: give the "
        "coordinators of a bus the same"))
    replicas: int = Field(default=1, ge=1, le=5, description=(
        "replicas of the streams, KV buckets and object store created now (3 in a cluster: deploy/)"))
    # Stage processes (captionbus/services/runtime).
    stage_cache: bool = Field(default=True, description=(
        "answer a repeated request (same input, params, model, env) from the stage cache (off: always compute)"))
    log_level: str = Field(default="INFO", description="log level of stage processes (DEBUG, INFO, WARNING, ERROR)")
    grace_s: float = Field(default=30.0, ge=0, description=(
        "seconds a running request may finish after a stage process gets SIGTERM"))
    env: str | None = Field(default=None, description=(
        "the stage environment a stage process reports (set by the launcher; else its venv's manifest)"))
    launcher: str | None = Field(default=None, max_length=16, description=(
        "who started a stage process, which it reports ($SRV metadata): `up` or `run` (set by them; none for "
        "`captionbus serve`). `run` joins a local `up` only through the workers it says are up's"))
    # The default workflows' chunk stage (captionbus/services/chunk): a film longer than this goes to every
    # asr worker in chunks, and no worker holds the whole film's audio; shorter audio is one chunk.
    chunk_above_s: float = Field(default=120.0, ge=0, description=(
        "audio longer than this is cut into chunks at silences, one asr request each, by the chunk stage of "
        "the default workflows (shorter: one chunk; 0: always cut; a job's --chunk-s always applies)"))
    # The web services (captionbus/web): the dashboard's token off loopback, the gateway's webhook key.
    dashboard_token: str | None = Field(default=None, repr=False, description=(
        "token the dashboard requires when it listens off loopback"))
    dashboard_token_file: Path | None = Field(default=None, description=(
        "file holding the dashboard's token (wins over CAPTIONBUS_DASHBOARD_TOKEN)"))
    dashboard_operator_token: str | None = Field(default=None, repr=False, description=(
        "token that may cancel and retry jobs on the dashboard; set, the dashboard asks every browser "
        "for a token (give it the dashboard_operator NATS user)"))
    dashboard_operator_token_file: Path | None = Field(default=None, description=(
        "file holding the dashboard's operator token (wins over CAPTIONBUS_DASHBOARD_OPERATOR_TOKEN)"))
    webhook_secret: str | None = Field(default=None, repr=False, description=(
        "the HMAC key the gateway signs webhook deliveries with (receivers check it)"))
    # The CLI.
    debug: bool = Field(default=False, description="print the traceback of an internal error")
    # Retention, enforced by `captionbus gc` (captionbus/core/gc.py). Durations: seconds, or 90m / 12h / 7d.
    retention_outputs: float = Field(default=7 * DAY, ge=0, description=(
        "keep a finished job's artifacts (input, intermediates, outputs) this long after it finished"))
    retention_cache: float = Field(default=30 * DAY, ge=0, description=(
        "keep a stage cache entry (and the artifacts it references) this long after it was written"))
    retention_events: float = Field(default=30 * DAY, ge=0, description=(
        "keep a finished job's event history this long after it finished (its job record: until "
        "this and CAPTIONBUS_RETENTION_OUTPUTS have both passed)"))
    retention_grace: float = Field(default=3600.0, ge=0, description=(
        "keep an artifact that no job or cache entry references (an input whose job is being "
        "submitted, an output being reported) this long after it was written"))
    gc_interval: float = Field(default=3600.0, ge=0, description=(
        "`up` on its embedded bus runs the GC this often (0: never); a fleet runs `captionbus gc` "
        "from a timer (deploy/systemd/captionbus-gc.timer)"))
    artifacts_max_bytes: int = Field(default=0, ge=0, description=(
        "after the age rules, gc deletes the oldest artifacts no unfinished job needs until each store "
        "(object store, local root) holds at most this many bytes (0: no size limit; 10G, 500M accepted)"))

    @field_validator("retention_outputs", "retention_cache", "retention_events", "retention_grace", "gc_interval",
                     mode="before")
    @classmethod
    def _duration(cls, value):
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("artifacts_max_bytes", mode="before")
    @classmethod
    def _bytes(cls, value):
        return parse_bytes(value) if isinstance(value, str) else value

    @field_validator("home", "envs", "models", "ffmpeg", "ffprobe", "nats_creds", "nats_nkey", "nats_ca", "nats_cert", "nats_key",
                     "dashboard_token_file", "dashboard_operator_token_file", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("ffmpeg", "ffprobe", mode="before")
    @classmethod
    def _blank_path_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="after")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("nats_url", "nats_user", "nats_password", "env", "nats_inbox_prefix", "dashboard_token",
                     "dashboard_operator_token",
                     "webhook_secret", mode="after")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("host_id", mode="after")
    @classmethod
    def _token(cls, value: str) -> str:
        return _host_token(value)

    @property
    def nats_dir(self) -> Path:
        return self.home / "nats"

    @property
    def envs_dir(self) -> Path:
        # Separate override: venvs are gigabytes, and tests want a fresh home but shared venvs.
        return self.envs or self.home / "envs"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def models_dir(self) -> Path:
        return self.models or self.home / "models"

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


def _variable(model: type[BaseSettings], field: str) -> str:
    info = model.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, str):
        return alias
    return f"{model.model_config.get('env_prefix', '')}{field}".upper()


def describe_error(model: type[BaseSettings], error: ValidationError) -> str:
    """One line for the first problem: which variable, what it holds, what it may hold."""
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    name = _variable(model, field) if field in model.model_fields else field
    value = first.get("input")
    expected = first.get("ctx", {}).get("expected")
    allowed = f"; allowed: {expected}" if expected else f" ({first['msg']})"
    return f"{name}={value!r} is not a valid setting{allowed}"


def load() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        raise SettingsError(describe_error(Settings, e)) from None


# Read before any Settings exists (config files load at import), so not a field; listed with them.
_MODULE_VARIABLES = {
    "CAPTIONBUS_CONFIG": ("", "a directory whose config files (workflows/, stages.yaml, subtitles.yaml …) "
                              "override the packaged ones of the same name"),
}


def settings_markdown() -> str:
    """docs/settings.md: every process-wide variable, from this model (a test keeps the file
    current: `python -m captionbus.core.settings > docs/settings.md`). Stage service options (model paths,
    devices, threads) are per stage: `captionbus stages STAGE` lists them."""
    rows = []
    for field, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=False) if info.default_factory is None else None
        shown = "" if default is None else f"`{default}`"
        if field == "home":
            shown = "`~/.captionbus`"
        elif field == "host_id":
            shown = "the host name"
        rows.append((_variable(Settings, field), shown, (info.description or "").replace("|", "\\|")))
    rows += [(name, default, text) for name, (default, text) in _MODULE_VARIABLES.items()]
    lines = [
        "# Settings",
        "",
        "Every process-wide setting of captionbus, one environment variable each, from one model:",
        "`captionbus/core/settings.py` (`Settings`, pydantic-settings). A bad value is refused with one line naming",
        "the variable. Stage service options (model paths, devices, threads: `CAPTIONBUS_<STAGE>_<OPTION>`)",
        "are per stage: `captionbus stages STAGE` lists them. Generated: `python -m captionbus.core.settings > docs/settings.md`.",
        "",
        "| variable | default | what |",
        "|---|---|---|",
        *[f"| `{name}` | {default} | {text} |" for name, default, text in rows],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_markdown(), end="")
