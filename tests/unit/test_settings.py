"""Global settings are one typed model; config files are package data a user's dir can override."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from captionbus.coordinator.graph import load_workflows
from captionbus.core import settings
from captionbus.core.settings import Settings, SettingsError, config_files, config_path, load


def test_settings_come_from_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("CAPTIONBUS_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("NATS_URL", "nats://10.0.0.5:4222")
    monkeypatch.setenv("CAPTIONBUS_HOST_ID", "gpu box/1")
    monkeypatch.setenv("CAPTIONBUS_MODELS", str(tmp_path / "m"))
    monkeypatch.delenv("CAPTIONBUS_ARTIFACTS", raising=False)
    monkeypatch.delenv("CAPTIONBUS_ENVS", raising=False)
    s = load()
    assert s.home == tmp_path / "h" and s.nats_url == "nats://10.0.0.5:4222"
    assert s.host_id == "gpu-box-1"  # a token: it names subjects and folders
    assert s.models_dir == tmp_path / "m" and s.envs_dir == tmp_path / "h" / "envs"
    assert s.artifacts_mode == "auto" and s.use_object_store()  # auto + NATS_URL -> object store


def test_a_bad_enum_value_is_refused_with_the_allowed_values(monkeypatch):
    monkeypatch.setenv("CAPTIONBUS_ARTIFACTS", "objet")
    with pytest.raises(SettingsError) as err:
        load()
    message = str(err.value)
    assert "CAPTIONBUS_ARTIFACTS='objet'" in message
    assert "'auto', 'local' or 'object'" in message
    assert "\n" not in message


def test_the_cli_refuses_a_bad_setting_in_one_line(tmp_path: Path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CAPTIONBUS_ARTIFACTS": "objet"}
    done = subprocess.run([sys.executable, "-m", "captionbus", "jobs"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "CAPTIONBUS_ARTIFACTS" in lines[0] and "object" in lines[0], lines


@pytest.mark.parametrize("value", ["0.5", "0", "-3"])
def test_an_events_ack_wait_under_a_second_is_refused_in_one_line_naming_the_bound(monkeypatch, value: str):
    """Under 1 s a live coordinator's events go to another while it applies them, and early stage
    results are dropped at once (Settings.event_ack_wait); `gt=0` let 0.001 through."""
    monkeypatch.setenv("CAPTIONBUS_EVENT_ACK_WAIT", value)
    with pytest.raises(SettingsError) as err:
        load()
    message = str(err.value)
    assert f"CAPTIONBUS_EVENT_ACK_WAIT={value!r}" in message and "greater than or equal to 1" in message, message
    assert "\n" not in message
    for fine in ("1", "2", "30"):  # the bound itself, test_coordinators' 2 s, the default
        monkeypatch.setenv("CAPTIONBUS_EVENT_ACK_WAIT", fine)
        assert load().event_ack_wait == float(fine)


def test_settings_built_by_name_keep_working(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("NATS_URL", "nats://elsewhere:4222")
    monkeypatch.setenv("CAPTIONBUS_ARTIFACTS", "local")
    s = Settings(home=tmp_path, nats_url=None, artifacts_mode="local", host_id="h")
    assert s.artifacts_dir == tmp_path / "artifacts" and not s.use_object_store()
    assert s.nats_url is None  # an argument wins over the environment
    s = Settings(home=tmp_path, nats_url="nats://a:4222", artifacts_mode="object", host_id="h")
    assert (s.nats_url, s.artifacts_mode, s.use_object_store()) == ("nats://a:4222", "object", True)


def test_config_is_package_data():
    # The packaged config is found through importlib.resources, not relative to a checkout.
    assert config_path("stages.yaml").is_file()
    assert {"transcribe", "translate", "subtitle"} <= set(config_files("workflows"))
    assert "core" in config_path("stages.yaml").parts


def test_a_users_config_dir_overrides_file_by_file(tmp_path: Path, monkeypatch):
    (tmp_path / "workflows").mkdir()
    packaged = config_files("workflows")["transcribe"].read_text()
    (tmp_path / "workflows" / "quick.yaml").write_text(packaged.replace("name: transcribe", "name: quick"))
    # (a valid file: workflows that route by language pair are checked against its stages at load)
    (tmp_path / "translation.yaml").write_text(config_path("translation.yaml").read_text() + "# mine\n")
    monkeypatch.setattr(settings, "USER_CONFIG_DIR", tmp_path)
    assert config_path("translation.yaml") == tmp_path / "translation.yaml"
    assert config_path("stages.yaml") == settings.DEFAULT_CONFIG_DIR / "stages.yaml"  # not overridden
    workflows = load_workflows()
    assert {"quick", "transcribe", "translate", "subtitle"} <= set(workflows)


def test_retention_settings_take_durations_and_sizes(monkeypatch):
    monkeypatch.setenv("CAPTIONBUS_RETENTION_OUTPUTS", "2d")
    monkeypatch.setenv("CAPTIONBUS_RETENTION_CACHE", "90m")
    monkeypatch.setenv("CAPTIONBUS_RETENTION_EVENTS", "3600")
    monkeypatch.setenv("CAPTIONBUS_RETENTION_GRACE", "1.5h")
    monkeypatch.setenv("CAPTIONBUS_ARTIFACTS_MAX_BYTES", "500MiB")
    monkeypatch.setenv("CAPTIONBUS_GC_INTERVAL", "0")
    s = load()
    assert (s.retention_outputs, s.retention_cache, s.retention_events, s.retention_grace) == (
        2 * 86400, 90 * 60, 3600, 5400)
    assert s.artifacts_max_bytes == 500 * 1024**2 and s.gc_interval == 0
    monkeypatch.setenv("CAPTIONBUS_ARTIFACTS_MAX_BYTES", "10G")
    assert load().artifacts_max_bytes == 10 * 1024**3
    monkeypatch.setenv("CAPTIONBUS_RETENTION_OUTPUTS", "a week")
    with pytest.raises(SettingsError, match="CAPTIONBUS_RETENTION_OUTPUTS='a week'"):
        load()
    monkeypatch.setenv("CAPTIONBUS_RETENTION_OUTPUTS", "-1d")
    with pytest.raises(SettingsError, match="CAPTIONBUS_RETENTION_OUTPUTS"):
        load()
