"""Hardware detection and its cache (no torch, nvidia-smi faked)."""
from __future__ import annotations

import json
import os
import socket
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from captionbus.core import hardware

SMI = "0, NVIDIA H200, 143771, 570.133.20\n1, NVIDIA H200, 143771, 570.133.20\n"


def test_parse_nvidia_smi():
    gpus = hardware.parse_nvidia_smi(SMI + "garbage line\n")
    assert [g.name for g in gpus] == ["NVIDIA H200", "NVIDIA H200"]
    assert gpus[0].memory_mb == 143771 and gpus[1].index == 1 and gpus[0].driver == "570.133.20"
    assert hardware.parse_nvidia_smi("") == ()


def test_detect_finds_cuda_through_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncat <<'EOF'\n" + SMI + "EOF\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    hw = hardware.detect()
    assert hw.cuda and len(hw.gpus) == 2
    assert hw.kinds()[0] == "cuda" and hw.kinds()[-1] == "cpu"
    assert "H200" in hw.summary()["gpus"]


def test_detect_basics():
    hw = hardware.detect()
    assert hw.cpu_count >= 1 and hw.memory_bytes > 0 and hw.cpu_model
    assert hw.kinds()[-1] == "cpu"
    assert all(isinstance(v, str) for v in hw.summary().values())


def test_cache_round_trip_and_refresh(tmp_path: Path):
    cache = tmp_path / "hardware.json"
    first = hardware.load(cache=cache)
    assert cache.is_file()
    # A cached value is used as-is (it is not re-detected on every call) ...
    marked = replace(first, cpu_model="cached marker")
    hardware.write_cache(marked, cache)
    assert hardware.load(cache=cache).cpu_model == "cached marker"
    # ... until asked to refresh.
    assert hardware.load(refresh=True, cache=cache).cpu_model == first.cpu_model


def test_cache_from_another_host_or_version_is_ignored(tmp_path: Path):
    cache = tmp_path / "hardware.json"
    other = replace(hardware.detect(), hostname=socket.gethostname() + "-elsewhere", cpu_model="theirs")
    hardware.write_cache(other, cache)
    assert hardware.load(cache=cache).cpu_model != "theirs"
    cache.write_text(json.dumps({"version": 0}))
    assert hardware.load(cache=cache).hostname == socket.gethostname()
    cache.write_text("not json")
    assert hardware.load(cache=cache).hostname == socket.gethostname()


def test_apple_silicon_prefers_mlx(tmp_path: Path):
    mac = replace(hardware.detect(), gpus=(), mps=True, mlx=True)
    assert mac.kinds() == ["mlx", "mps", "cpu"]
