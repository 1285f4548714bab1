"""Stage output cache: same stage inputs + parameters + model + environment -> reuse the outputs.

Artifacts are content-addressed, so a finished stage is fully described by the hashes of what
went in and the settings it ran with. The key is `<stage>.` (so per-stage NATS users may write
only their own stage's entries) followed by a sha256 over: stage name and its
`cache_version`, the worker's env and package versions, the model (the stage's declaration made
before loading it, StageDefinition.declare_model, so a hit is answered while the model loads;
else the loaded model's describe_model, and lookups wait for setup()), the
worker's fingerprint (`worker_fingerprint`: its service options and CAPTIONBUS_* settings, a
size/mtime stamp of every file or folder they name — model folders, glossaries —, the config
files and the source of every project module the process loaded, so a code fix is a miss),
the input artifacts (content hash and name: mux reads languages from names) and the request
params except `target_languages` (the job-wide list every node receives; branch nodes get
their own `target_language`). An entry is {outputs, metrics, warnings, speaker_turns} (the last:
StageCompleted.speaker_turns, so a hit puts the same turns on the node's record); a hit is used only
while every output artifact can still be read, and its warnings are published again. Only
completions are cached, never failures, nor results a stage marked with `ctx.skip_cache()`
(fallbacks a rerun may improve).

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
import sys
from pathlib import Path
from typing import Any, NamedTuple

from captionbus.contracts import NO_TENANT, ArtifactRef, StageRequest, WorkerInfo, subjects, tenant_of
from captionbus.contracts.speech import TurnSummary

IGNORED_PARAMS = frozenset({"target_languages", "cache"})
ITEMS_PREFIX = "items:"  # a cached entry keeps StageCompleted.items among its metrics under this prefix
# Settings that say where this host keeps things or how it talks to the bus, not what a stage computes.
HOST_SETTINGS = frozenset({
    "CAPTIONBUS_HOME", "CAPTIONBUS_ENVS", "CAPTIONBUS_ENV", "CAPTIONBUS_HOST_ID", "CAPTIONBUS_ARTIFACTS",
    "CAPTIONBUS_ACK_WAIT", "CAPTIONBUS_MAX_DELIVER", "CAPTIONBUS_REPLICAS", "CAPTIONBUS_STAGE_CACHE",
})
MAX_STAMPED_FILES = 5000
_FALSE = {"false", "0", "no", "off"}


class CacheHit(NamedTuple):
    outputs: dict[str, ArtifactRef]
    metrics: dict[str, float]
    warnings: list[str]
    speaker_turns: TurnSummary | None = None


def cache_enabled_for(request: StageRequest) -> bool:
    value = request.params.get("cache", True)
    return str(value).strip().lower() not in _FALSE


def path_stamp(path: Path) -> list:
    """Size and modification time of a file, or of every file under a folder (not their bytes:
    model folders are gigabytes). A rebuilt model at the same path changes its stamp."""
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    stamps = []
    for n, file in enumerate(sorted(p for p in path.rglob("*") if p.is_file())):
        if n >= MAX_STAMPED_FILES:
            break
        st = file.stat()
        stamps.append([str(file.relative_to(path)), st.st_size, st.st_mtime_ns])
    return stamps


def _existing_path(value: str) -> Path | None:
    if not value or len(value) > 4096 or "\n" in value:
        return None
    try:
        path = Path(value).expanduser()
        return path if path.is_absolute() and path.exists() else None
    except OSError:
        return None


def worker_fingerprint(options: dict[str, Any], config_dirs: list[Path], project_root: Path,
                       extra_sources: list[Path] = ()) -> str:
    """What this worker process computes with beyond its model: its settings and the files they
    name, config, and the project's sources loaded so far plus `extra_sources` (the stage's own
    package, whose modules setup() may import later). Computed before setup(), so that a cache
    lookup need not wait for the model."""
    settings = {k: v for k, v in os.environ.items() if k.startswith("CAPTIONBUS_") and k not in HOST_SETTINGS}
    settings.update({f"option:{k}": str(v) for k, v in options.items()})
    paths = {v: path_stamp(p) for v in settings.values() if (p := _existing_path(v)) is not None}
    digest = hashlib.sha256()
    for config_dir in config_dirs:
        for file in sorted(config_dir.glob("*.yaml")):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    # Resolved: stage environments import the project through links (captionbus/envs/code.py).
    project_root = project_root.resolve()
    loaded = [Path(module.__file__) for module in list(sys.modules.values())
              if getattr(module, "__file__", None) and Path(module.__file__).suffix == ".py"]
    sources = sorted({file.resolve() for file in [*loaded, *extra_sources]
                      if file.resolve().is_relative_to(project_root)})
    for file in sources:
        digest.update(str(file.relative_to(project_root)).encode() + b"\0" + file.read_bytes())
    blob = json.dumps({"settings": settings, "paths": paths, "files": digest.hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(request: StageRequest, *, cache_version: str, info: WorkerInfo, fingerprint: str = "",
              ignores: tuple[str, ...] = (), inputs: dict[str, str] | None = None, model: str | None = None) -> str:
    """`inputs`: the stage's own digests of what it reads (StageDefinition.cache_inputs), in place
    of the inputs' content hashes. `model`: the model's identity, known before loading
    (StageDefinition.declare_model), in place of the loaded model's description (info.model)."""
    material = {
        "stage": request.stage,
        "cache_version": cache_version,
        "worker": fingerprint,
        "env": info.env,
        "packages": info.packages,
        "model": model if model is not None else info.model,
        "inputs": ({name: [ref.key, ref.name] for name, ref in sorted(request.inputs.items())}
                   if inputs is None else {"digests": dict(sorted(inputs.items()))}),
        "input_lists": {
            name: [[ref.key, ref.name] for ref in refs] for name, refs in sorted(request.input_lists.items())
        },
        "params": {k: v for k, v in sorted(request.params.items()) if k not in IGNORED_PARAMS and k not in ignores},
    }
    if (tenant := tenant_of(request.job_id)) != NO_TENANT:
        # A tenant's entries are its own: its artifacts are in its namespace, out of other tenants'
        # reach, and a hit across tenants would tell one that another processed the same input.
        material["tenant"] = tenant
    blob = json.dumps(material, sort_keys=True, default=str, separators=(",", ":"))
    # The stage name leads the key (KV subject $KV.cb_stage_cache.<stage>.<sha256>), so a
    # per-stage worker user may write only its own stage's entries (roles.conf WORKER_ASR):
    # without it, an asr credential could plant an entry that a demux worker would answer from.
    return f"{request.stage}.{hashlib.sha256(blob.encode()).hexdigest()}"


class StageCache:
    """Lookups and records (KV or local files); every failure here is a miss, never a failed request."""

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

    async def lookup(self, key: str, store: Any = None) -> CacheHit | None:
        """`store`: where the request's job keeps its artifacts (its tenant's namespace); default this cache's."""
        store = store or self.store
        try:
            data = json.loads(await self._read(key))
            outputs = {name: ArtifactRef.model_validate(ref) for name, ref in data["outputs"].items()}
            turns = data.get("speaker_turns")
            speaker_turns = TurnSummary.model_validate(turns) if turns is not None else None
        except Exception as e:  # missing key, missing bucket (older bus), unreadable entry
            if type(e).__name__ not in ("KeyNotFoundError", "KeyDeletedError", "FileNotFoundError"):
                self.log.debug("stage cache lookup failed; running the stage", error=str(e)[:200])
            return None
        for ref in outputs.values():
            if not await store.exists(ref):
                self.log.info("stage cache entry's artifact is gone; running the stage", artifact=ref.key[:16])
                return None
        return CacheHit(outputs, {k: float(v) for k, v in data.get("metrics", {}).items()},
                        list(data.get("warnings", [])), speaker_turns)

    async def record(self, key: str, outputs: dict[str, ArtifactRef], metrics: dict[str, float],
                     warnings: list[str], speaker_turns: TurnSummary | None = None) -> None:
        value = json.dumps({"outputs": {n: r.model_dump(mode="json") for n, r in outputs.items()},
                            "metrics": metrics, "warnings": warnings,
                            **({"speaker_turns": speaker_turns.model_dump(mode="json")} if speaker_turns else {})})
        try:
            await self._write(key, value.encode())
        except Exception as e:
            self.log.warning("stage cache record failed", error=str(e)[:200])


def model_identity(kind: str, source: str | Path) -> str:
    """A model's identity before it is loaded (StageDefinition.declare_model): `kind` (backend,
    library), the configured source and, when the source is a local file or folder, a digest of
    its size/mtime stamp, so a model rebuilt or replaced at the same path is a new identity.
    A hub id (not a local path) is its own identity: the library resolves it from its cache."""
    text = str(source)
    path = _existing_path(str(Path(text).expanduser().resolve())) if text else None
    if path is None:
        return f"{kind}|{text}"
    stamp = hashlib.sha256(json.dumps(path_stamp(path)).encode()).hexdigest()[:16]
    return f"{kind}|{path}|{stamp}"
