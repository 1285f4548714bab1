"""The same subtitle job run twice on one machine: the second run completes every stage from the
stage cache. Both runs start the bus and the services (that cost is in both); the ratio says what
the cache saves of a whole `captionbus run`, and the per-stage table says where.

    python benchmarks/stage_cache.py [--seconds 20] [--workflow subtitle|transcribe]

With `--workflow transcribe` every stage of the rerun is a hit that needs no model: asr and vad
declare their model before loading it (StageDefinition.declare_model), so the rerun no longer
waits for whisperx to load. Measured December 2026 on the shared 2-core machine (load high,
7 s clip, one run each, so rough): rerun 60.4 s before this change (main; first run 89.1 s),
14.4 s after (first run 109.2 s; a second run after: 9.2 s, first 52.6 s); the lead reruns it on
a quiet machine.

Uses the locally built test models (tests/model_factory): the translation/alignment numbers are
for tiny random models, so stage times are plumbing-dominated except asr (real Whisper base).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.media import ENGLISH_SENTENCE, speech_video  # noqa: E402


def model_env() -> dict[str, str]:
    from captionbus.models import ensure_silero_vad, ensure_whisper_base
    from tests.envtools import built_env, test_models_root
    from tests.model_factory.indictrans2 import ensure_indictrans2
    from tests.model_factory.nllb import ensure_nllb
    from tests.model_factory.wav2vec2 import ensure_wav2vec2

    for env in ("common", "whisperx", "indictrans2", "nllb"):
        built_env(env)
    ensure_whisper_base(), ensure_silero_vad()
    root = test_models_root()
    indictrans2 = ensure_indictrans2(root)
    return {
        "CAPTIONBUS_INDICTRANS2_EN_INDIC_MODEL": str(indictrans2["en-indic"]),
        "CAPTIONBUS_NLLB_MODEL": str(ensure_nllb(root)),
        "CAPTIONBUS_ALIGN_MODEL_EN": str(ensure_wav2vec2(root, "en")),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the spoken clip (repeats the sentence)")
    parser.add_argument("--workflow", default="subtitle", choices=("subtitle", "transcribe"),
                        help="transcribe: every stage of the rerun can be answered before its model loads")
    args = parser.parse_args()
    from captionbus.core.settings import Settings

    real = Settings()  # envs and models are shared with the real data dir; the bus data is not
    env = {"CAPTIONBUS_ENVS": str(real.envs_dir), "CAPTIONBUS_MODELS": str(real.models_dir),
           **os.environ, **model_env()}
    env.pop("NATS_URL", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        repeats = max(1, round(args.seconds / 7))
        video, _ = speech_video(tmp_path / "talk.mp4", " ".join([ENGLISH_SENTENCE] * repeats))
        env["CAPTIONBUS_HOME"] = str(tmp_path / "home")
        runs = []
        for n in range(2):
            out = tmp_path / f"out{n}"
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "captionbus", "run", str(video), "-w", args.workflow, "-s", "en",
                 *(["-t", "hi,fr"] if args.workflow == "subtitle" else []), "--out", str(out)],
                env=env, capture_output=True, text=True,
            )
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            runs.append((time.perf_counter() - started, json.loads((out / "talk.job.json").read_text())))
    (first_s, first), (second_s, second) = runs
    print(f"{'node':28s} {'first run':>10s} {'rerun':>10s}")
    for node_id, node in first["nodes"].items():
        again = second["nodes"][node_id]
        if node["status"] == "skipped":
            continue  # an optional stage this job does not use
        cached = "cache hit" if again["worker"].get("cache") == "hit" else f"{again['metrics'].get('handle_s', 0):.2f} s"
        print(f"{node_id:28s} {node['metrics'].get('handle_s', 0):9.2f}s {cached:>10s}")
    print(f"whole run (incl. starting the bus and {len(first['nodes'])} nodes' services): first {first_s:.1f} s, "
          f"rerun {second_s:.1f} s, ratio {first_s / second_s:.2f}x")


if __name__ == "__main__":
    main()
