"""A tiny randomly initialised HTDemucs (two stems: vocals, other) in a local demucs model repo,
laid out as demucs's own repos are: `<sig>-<sha256[:8]>.th` (the package `demucs.states`
saves: klass/args/kwargs/state, written by `save_with_checksum`) plus a bag `<name>.yaml`
naming the signature, like demucs's `remote/htdemucs.yaml`. So the stage loads it the normal
way, `demucs.pretrained.get_model(DEMUCS_TEST_MODEL, repo=<dir>)`.

Random weights separate nothing useful; the model keeps htdemucs's real structure (44.1 kHz
stereo, 4096-point STFT, hybrid time/frequency branches, a cross-transformer) at a fraction of
its width, so resampling, upmixing, segmenting and streaming all run for real, fast on 2 cores.

Point the service at it with `demucs_service_env(ensure_demucs(root))`:
CAPTIONBUS_DEMUCS_REPO=<dir>, CAPTIONBUS_DEMUCS_MODEL=tiny_htdemucs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.envtools import run_in_env, test_models_root

DEMUCS_TEST_MODEL = "tiny_htdemucs"  # the bag name (yaml) in the repo
SIGNATURE = "0a1b2c3d"  # the single model's signature inside the bag
FACTORY_VERSION = 1  # bump when the recipe changes, so cached repos are rebuilt
MODEL_KWARGS = {
    "sources": ["vocals", "other"],
    "audio_channels": 2,
    "samplerate": 44100,
    "segment": 4,
    "channels": 8,
    "depth": 4,
    "dconv_mode": 0,
    "t_layers": 1,
    "t_heads": 2,
    "t_hidden_scale": 1.0,
}

BUILD = r"""
import json, sys
from pathlib import Path
import torch, yaml
from demucs.htdemucs import HTDemucs
from demucs.states import get_state, save_with_checksum

out, sig, name, kwargs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
torch.manual_seed(0)
model = HTDemucs(**kwargs).eval()
args, init_kwargs = model._init_args_kwargs  # recorded by demucs's @capture_init
# What demucs.states.serialize_model writes, minus the training config (it needs omegaconf).
package = {"klass": model.__class__, "args": args, "kwargs": init_kwargs,
           "state": get_state(model, None, half=False), "training_args": {}}
save_with_checksum(package, out / f"{sig}.th")
(out / f"{name}.yaml").write_text(yaml.safe_dump({"models": [sig]}))
params = sum(p.numel() for p in model.parameters())
print("RESULT " + json.dumps({"params": params, "files": sorted(p.name for p in out.iterdir())}))
"""


def ensure_demucs(root: Path | None = None) -> Path:
    """The repo folder holding the tiny model, built (inside env `demucs`) unless cached."""
    root = Path(root) if root is not None else test_models_root()
    repo = root / f"demucs-tiny-v{FACTORY_VERSION}"
    marker = repo / "factory.json"
    if marker.exists():
        return repo
    building = root / f".{repo.name}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    built = run_in_env("demucs", BUILD, str(building), SIGNATURE, DEMUCS_TEST_MODEL, json.dumps(MODEL_KWARGS), timeout=300)
    (building / "factory.json").write_text(json.dumps({"model": DEMUCS_TEST_MODEL, "signature": SIGNATURE, **built}, indent=1))
    shutil.rmtree(repo, ignore_errors=True)
    building.rename(repo)
    return repo


def demucs_service_env(repo: Path) -> dict[str, str]:
    """Environment variables that point the source_separation service at `repo`'s test model."""
    return {"CAPTIONBUS_DEMUCS_REPO": str(repo), "CAPTIONBUS_DEMUCS_MODEL": DEMUCS_TEST_MODEL}
