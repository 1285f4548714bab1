"""What this host can run on: CPU, memory, CUDA GPUs, Apple MPS / MLX.

Import-light on purpose (stdlib only, no torch): the coordinator and the CLI read it to pick
backends and environments, and workers put `Hardware.summary()` into their service info.

The result is cached as JSON in `settings.hardware_cache` (generated, machine-specific). It is
regenerated when missing, unreadable, written on another host, or on
`captionbus envs check --refresh-hardware`.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from captionbus.core import settings as _settings

CACHE_VERSION = 1


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mb: int
    driver: str = ""


@dataclass(frozen=True)
class Hardware:
    hostname: str
    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # platform.machine(): x86_64, arm64, aarch64
    cpu_model: str
    cpu_count: int
    memory_bytes: int
    gpus: tuple[Gpu, ...] = ()
    mps: bool = False  # PyTorch's Metal backend: Apple silicon
    mlx: bool = False  # Apple's MLX: Apple silicon
    detected_at: str = ""

    @property
    def cuda(self) -> bool:
        return bool(self.gpus)

    @property
    def memory_gb(self) -> float:
        return round(self.memory_bytes / 2**30, 1)

    def kinds(self) -> list[str]:
        """Backend kinds this host offers, most preferred first; always ends with "cpu"."""
        kinds = []
        if self.cuda:
            kinds.append("cuda")
        if self.mlx:
            kinds.append("mlx")
        if self.mps:
            kinds.append("mps")
        kinds.append("cpu")
        return kinds

    @property
    def best(self) -> str:
        return self.kinds()[0]

    def summary(self) -> dict[str, str]:
        """Flat strings for worker info / $SRV metadata."""
        out = {
            "kind": self.best,
            "cpu": f"{self.cpu_model} x{self.cpu_count}",
            "memory_gb": str(self.memory_gb),
            "platform": f"{self.system}-{self.machine}",
        }
        if self.gpus:
            out["gpus"] = ", ".join(f"{g.name} ({g.memory_mb} MiB)" for g in self.gpus)
        return out

    def to_json(self) -> dict:
        return {"version": CACHE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> Hardware:
        if data.get("version") != CACHE_VERSION:
            raise ValueError(f"hardware cache version {data.get('version')!r}, want {CACHE_VERSION}")
        data = {k: v for k, v in data.items() if k != "version"}
        data["gpus"] = tuple(Gpu(**g) for g in data.get("gpus", ()))
        return cls(**data)


def _run(cmd: list[str], timeout: float = 10) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _cpu_model() -> str:
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                # x86: "model name"; some ARM kernels only give "Hardware" or "Model".
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                    return value.strip()
        except OSError:
            pass
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out and out.strip():
            return out.strip()
    return platform.processor() or platform.machine() or "unknown"


def _memory_bytes() -> int:
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "hw.memsize"])
        if out and out.strip().isdigit():
            return int(out.strip())
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        try:
            memory = int(float(parts[2]))
        except ValueError:
            memory = 0
        gpus.append(Gpu(index=int(parts[0]), name=parts[1], memory_mb=memory, driver=parts[3]))
    return tuple(gpus)


def _cuda_gpus() -> tuple[Gpu, ...]:
    # nvidia-smi rather than torch: the control plane has no torch, and it answers in milliseconds.
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    out = _run([exe, "--query-gpu=index,name,memory.total,driver_version",
                "--format=csv,noheader,nounits"])
    return parse_nvidia_smi(out) if out else ()


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may really run on: os.cpu_count() counts the host's, but a CPU
    affinity mask (taskset, a container's cpuset) or a cgroup v2 quota (`docker --cpus 2`:
    cpu.max "200000 100000") gives it fewer, and threads beyond them only time-slice. At least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return max(1, cores)


def detect() -> Hardware:
    """Probe this host now (no cache)."""
    system, machine = platform.system(), platform.machine()
    apple_silicon = system == "Darwin" and machine == "arm64"
    return Hardware(
        hostname=socket.gethostname(),
        system=system,
        machine=machine,
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=_memory_bytes(),
        gpus=_cuda_gpus(),
        mps=apple_silicon,
        mlx=apple_silicon,
        detected_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def load(refresh: bool = False, cache: Path | None = None) -> Hardware:
    """The cached hardware of this host, detecting (and writing the cache) when needed."""
    cache = cache or _settings.load().hardware_cache
    if not refresh:
        try:
            hw = Hardware.from_json(json.loads(cache.read_text()))
            # A data dir copied or shared from another machine must not lend us its GPUs.
            if hw.hostname == socket.gethostname():
                return hw
        except (OSError, ValueError, TypeError, KeyError):
            pass
    hw = detect()
    write_cache(hw, cache)
    return hw


def write_cache(hw: Hardware, cache: Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(hw.to_json(), indent=2) + "\n")
    os.replace(tmp, cache)  # atomic: concurrent readers never see half a file
