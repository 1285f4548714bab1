"""Speaker diarization on recorded human voices: DER, speaker count, speed and memory per model.

    python benchmarks/diarization.py [--media short long30] [--embedders campplus resemblyzer dvector]
                                     [--vad silero segmentation-3.0 segmentation oracle] [--speakers auto]

Media (tests/speakers_media.py: the Dutch and Czech voice actors of Fish Fillets NG, four
speakers, turns with no gap, a speaker continuing after a pause):
  short       ~70 s, the integration test's dialogue (seed 0)
  dev         ~5 min, seed 7, plain: what core.AUTO_SETTINGS were chosen on (the rest are unseen)
  music       ~5 min, seed 11, with a music bed (peak 0.1, speech peaks at 0.5)
  three       ~5 min, seed 5, three speakers (nl-small, nl-big, cs-big)
  long30      ~30 min, seed 3, four speakers
Each configuration runs in a fresh process of the `diarization` env (so peak RSS is its own):
VAD regions -> windows -> embeddings -> clustering -> turns. VAD: `silero` is the vad stage's
(captionbus/services/vad/stage.py with its default params), what the diarization stage will read in a
workflow; `segmentation-3.0` / `segmentation` the pyannote models (models.speech_scores);
`oracle` the reference turns (isolates the speaker part). DER is pyannote.metrics' DiarizationErrorRate with the NIST collar of
0.25 s on each side of every reference boundary (pyannote's `collar=0.5`, the total width),
overlap scored (the media have none); it prints missed speech, false alarm and confusion as
shares of the scored reference speech; DER0 is the same with no collar. RTF = wall time after
the models are loaded / audio duration (load time apart); CPU/s = CPU seconds of the process per
second of audio (the same on an idle or a loaded machine, where wall time is not). Peak RSS = the
process's ru_maxrss. The machine's load average is printed with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MEDIA = {  # name: (seed, plan maker args, music level)
    "short": (0, None, None),
    "dev": (7, {"minutes": 5, "seed": 7}, None),
    "music": (11, {"minutes": 5, "seed": 11}, 0.1),
    "three": (5, {"minutes": 5, "seed": 5, "speakers": ("nl-small", "nl-big", "cs-big")}, None),
    "long30": (3, {"minutes": 30, "seed": 3}, None),
}


def make_media(name: str, folder: Path) -> Path:
    from tests import speakers_media as sm

    path = folder / f"{name}.wav"
    if path.is_file() and path.with_suffix(".rttm").is_file():
        return path
    seed, plan_args, music = MEDIA[name]
    plan = sm.short_plan() if plan_args is None else sm.long_plan(**plan_args)
    sm.make(path, plan, seed=seed, music_level=music)
    return path


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
wav, rttm, embedder_name, vad, speakers, models_dir, threads = sys.argv[1:]
import torch
torch.set_num_threads(int(threads))
from captionbus.services.audio import read_wav
from captionbus.services.diarization import core, models
from pyannote.core import Annotation, Segment
from pyannote.metrics.diarization import DiarizationErrorRate

samples = read_wav(Path(wav))
duration = len(samples) / 16000
reference = Annotation()
ref_turns = []
for line in Path(rttm).read_text().splitlines():
    f = line.split()
    start, dur, who = float(f[3]), float(f[4]), f[7]
    reference[Segment(start, start + dur)] = who
    ref_turns.append((start, start + dur))
t0 = time.monotonic()
embedder = models.load_embedder(embedder_name, Path(models_dir), threads=int(threads))
if vad == "silero":
    import onnxruntime
    from captionbus.contracts.stage_params import VadParams
    from captionbus.services.vad.regions import FrameScores, speech_regions
    from captionbus.services.vad.stage import FRAME_SAMPLES, SileroStream
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads)
    session = onnxruntime.InferenceSession(str(Path(models_dir) / "silero-vad" / "silero_vad.onnx"), options,
                                           providers=["CPUExecutionProvider"])
elif vad != "oracle":
    seg = models.load_segmentation(Path(models_dir) / models.DEFAULT_FILES[vad])
load_s = time.monotonic() - t0
t1 = time.monotonic()
c1 = resource.getrusage(resource.RUSAGE_SELF)
if vad == "oracle":
    regions = sorted(ref_turns)
elif vad == "silero":
    probs = SileroStream(session).probabilities(samples)
    regions = speech_regions(FrameScores(probs, FRAME_SAMPLES / 16000), duration, VadParams())
else:
    from captionbus.services.vad.regions import FrameScores, binarize, bridge_short_gaps, drop_short
    probs, step, start = models.speech_scores(seg, samples)
    regions = drop_short(bridge_short_gaps(binarize(FrameScores(probs, step, start), 0.5, 0.35), 0.3), 0.25)
t2 = time.monotonic()
c2 = resource.getrusage(resource.RUSAGE_SELF)
windows = models.embed_regions(embedder, samples, regions)
t3 = time.monotonic()
count = core.SpeakerCount.parse(speakers)
turns = core.diarize_windows(windows, regions, count, core.AUTO_SETTINGS[embedder_name])
t4 = time.monotonic()
c4 = resource.getrusage(resource.RUSAGE_SELF)
cpu = lambda a, b: b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime
hyp = Annotation()
for t in turns:
    hyp[Segment(t.start, t.end)] = t.speaker
metric = DiarizationErrorRate(collar=0.5, skip_overlap=False)
d = metric(reference, hyp, detailed=True)
total = d["total"]
d0 = DiarizationErrorRate(collar=0.0)(reference, hyp)
print("RESULT " + json.dumps({
    "duration": duration, "der": d["diarization error rate"], "missed": d["missed detection"] / total,
    "false_alarm": d["false alarm"] / total, "confusion": d["confusion"] / total, "der_nocollar": d0,
    "speakers_true": len(reference.labels()), "speakers_found": len(hyp.labels()),
    "load_s": load_s, "vad_s": t2 - t1, "embed_s": t3 - t2, "cluster_s": t4 - t3, "windows": len(windows),
    "rtf": (t4 - t1) / duration, "cpu_per_s": cpu(c1, c4) / duration, "vad_cpu_per_s": cpu(c1, c2) / duration, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "turns": [[t.start, t.end, t.speaker] for t in turns] if len(turns) < 200 else len(turns),
}))
"""


def run_one(python: str, wav: Path, embedder: str, vad: str, speakers: str, models_dir: Path, threads: int) -> dict:
    done = subprocess.run(
        [python, "-c", CHILD, str(wav), str(wav.with_suffix(".rttm")), embedder, vad, speakers,
         str(models_dir), str(threads)],
        cwd=REPO, capture_output=True, text=True, timeout=7200,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYANNOTE_METRICS_ENABLED": "false"})
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{embedder}/{vad} on {wav.name} failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--media", nargs="+", default=["short", "dev", "music", "three"], choices=list(MEDIA))
    parser.add_argument("--embedders", nargs="+", default=["campplus", "resemblyzer", "dvector"])
    parser.add_argument("--vad", nargs="+", default=["silero"],
                        choices=["silero", "segmentation-3.0", "segmentation", "oracle"])
    parser.add_argument("--speakers", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/captionbus-diarization-bench"))
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = parser.parse_args()

    from captionbus.envs import env_python
    from captionbus.core import settings

    python = str(env_python("diarization"))
    models_dir = settings.load().models_dir
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {args.threads} torch threads")
    print(f"{'media':7} {'embedder':11} {'vad':16} {'DER':>6} {'miss':>6} {'FA':>6} {'conf':>6} "
          f"{'DER0':>6} {'spk':>5} {'RTF':>6} {'CPU/s':>6} {'load':>5} {'RSS MB':>7}")
    for media in args.media:
        started = time.monotonic()
        wav = make_media(media, args.work)
        made = time.monotonic() - started
        if made > 1:
            print(f"# made {wav.name} in {made:.0f} s")
        for embedder in args.embedders:
            for vad in args.vad:
                r = run_one(python, wav, embedder, vad, args.speakers, models_dir, args.threads)
                results.append({"media": media, "embedder": embedder, "vad": vad, **r})
                print(f"{media:7} {embedder:11} {vad:16} {r['der']:6.1%} {r['missed']:6.1%} "
                      f"{r['false_alarm']:6.1%} {r['confusion']:6.1%} {r['der_nocollar']:6.1%} "
                      f"{r['speakers_found']:>2}/{r['speakers_true']:<2} {r['rtf']:6.3f} {r['cpu_per_s']:6.3f} "
                      f"{r['load_s']:5.1f} {r['peak_rss_mb']:7.0f}", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
