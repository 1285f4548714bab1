"""Stage output cache: same stage inputs + parameters + model + environment -> reuse the outputs.

Artifacts are content-addressed, so a finished stage is fully described by the hashes of what
went in and the settings it ran with. The key is a sha256 over: stage name and its
`cache_version`, the worker's env and package versions, the loaded model (describe_model), the
input artifacts (content hash and name: mux reads languages from names) and the request
params except `target_languages` (the job-wide list every node receives; branch nodes get
their own `target_language`). An entry is {outputs, metrics}; a hit is used only while every
output artifact can still be read. Only completions are cached, never failures.

Where entries live follows where artifacts live: with the object store (a fleet) in the KV
bucket `cb_stage_cache` (subjects.STAGE_CACHE_BUCKET); with local artifacts (one host) as files
under `$CAPTIONBUS_HOME/stage-cache/`, next to the artifacts, so they outlive the private bus
of one `captionbus run` and the next run of the same job reuses them.

Off per request with the param `cache: false` (`-o asr.cache=false`), per worker with
CAPTIONBUS_STAGE_CACHE=off, per stage with StageDefinition(cacheable=False).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from contracts import ArtifactRef, StageRequest, WorkerInfo, subjects

IGNORED_PARAMS = frozenset({"target_languages", "cache"})
_FALSE = {"false", "0", "no", "off"}


def cache_enabled_for(request: StageRequest) -> bool:
    value = request.params.get("cache", True)
    return str(value).strip().lower() not in _FALSE


def worker_cache_enabled() -> bool:
    return os.environ.get("CAPTIONBUS_STAGE_CACHE", "on").strip().lower() not in _FALSE


def cache_key(request: StageRequest, *, cache_version: str, info: WorkerInfo) -> str:
    material = {
        "stage": request.stage,
        "cache_version": cache_version,
        "env": info.env,
        "packages": info.packages,
        "model": info.model,
        "inputs": {name: [ref.key, ref.name] for name, ref in sorted(request.inputs.items())},
        "input_lists": {
            name: [[ref.key, ref.name] for ref in refs] for name, refs in sorted(request.input_lists.items())
        },
        "params": {k: v for k, v in sorted(request.params.items()) if k not in IGNORED_PARAMS},
    }
    blob = json.dumps(material, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class StageCache:
    """KV-backed lookups and records; every failure here is a miss, never a failed request."""

    def __init__(self, js: Any, store: Any, log: Any, local_dir: Path | None = None):
        self.js = js
        self.store = store
        self.log = log
        self.local_dir = local_dir  # None: the KV bucket
        self._kv = None

    async def _bucket(self):
        if self._kv is None:
            self._kv = await self.js.key_value(subjects.STAGE_CACHE_BUCKET)
        return self._kv

    async def _read(self, key: str) -> bytes:
        if self.local_dir is not None:
            return (self.local_dir / f"{key}.json").read_bytes()
        return (await (await self._bucket()).get(key)).value

    async def _write(self, key: str, value: bytes) -> None:
        if self.local_dir is None:
            await (await self._bucket()).put(key, value)
            return
        self.local_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.local_dir / f".{key}.{os.getpid()}.tmp"
        tmp.write_bytes(value)
        os.replace(tmp, self.local_dir / f"{key}.json")  # readers never see half an entry

    async def lookup(self, key: str) -> tuple[dict[str, ArtifactRef], dict[str, float]] | None:
        try:
            data = json.loads(await self._read(key))
            outputs = {name: ArtifactRef.model_validate(ref) for name, ref in data["outputs"].items()}
        except Exception as e:  # missing key, missing bucket (older bus), unreadable entry
            if type(e).__name__ not in ("KeyNotFoundError", "KeyDeletedError", "FileNotFoundError"):
                self.log.debug("stage cache lookup failed; running the stage", error=str(e)[:200])
            return None
        for ref in outputs.values():
            if not await self.store.exists(ref):
                self.log.info("stage cache entry's artifact is gone; running the stage", artifact=ref.key[:16])
                return None
        return outputs, {k: float(v) for k, v in data.get("metrics", {}).items()}

    async def record(self, key: str, outputs: dict[str, ArtifactRef], metrics: dict[str, float]) -> None:
        value = json.dumps({"outputs": {n: r.model_dump(mode="json") for n, r in outputs.items()}, "metrics": metrics})
        try:
            await self._write(key, value.encode())
        except Exception as e:
            self.log.warning("stage cache record failed", error=str(e)[:200])
