"""Speaker diarization on recorded human voices: DER, speaker count, speed and memory per model.

    python benchmarks/diarization.py [--media short long30] [--embedders campplus resemblyzer dvector]
                                     [--vad silero segmentation-3.0 segmentation oracle] [--speakers auto]
                                     [--threads 1] [--save-windows DIR] [--json FILE]

Media (tests/speakers_media.py: the Dutch and Czech voice actors of Fish Fillets NG, four
speakers, turns with no gap, a speaker continuing after a pause):
  short       ~70 s, the integration test's dialogue (seed 0)
  dev         ~5 min, seed 7, plain: what core.AUTO_SETTINGS were chosen on (the rest are unseen)
  music       ~5 min, seed 11, with a music bed (peak 0.1, speech peaks at 0.5)
  three       ~5 min, seed 5, three speakers (nl-small, nl-big, cs-big)
  long30      ~30 min, seed 3, four speakers
Regions: `silero` is the vad stage itself (its handler, default params), what the diarization
stage reads in a workflow; `segmentation-3.0` / `segmentation` the pyannote models
(models.speech_scores); `oracle` the reference turns (isolates the speaker part). They are made
once per media in a process of their own (the vad stage is a service of its own) and kept beside
the media. Then each configuration runs the diarization stage's handler (stage.handle, blocks of
BLOCK_S, as a worker runs it) in a fresh process of the `diarization` env, so its RSS is its own.

Each configuration prints three rows, side by side on the same windows: `captionbus` (the stage's
clustering, core.cluster) and two baselines, pyannote.audio's own AgglomerativeClustering
(min_cluster_size 12) then the same turns step: `pyannote-3.1` with the linkage and threshold of
pyannote/speaker-diarization-3.1 (centroid, 0.7046; tuned for its WeSpeaker embeddings of 10 s
chunks, not CAM++ windows), `pyannote-avg` with average linkage at 0.7, the best on `dev`
(BASELINES). (senko's pipeline, the other offline baseline, dies with SIGILL on these CPUs;
pyannote's full pipeline needs weights that are not available offline: docs/speakers.md.)

DER is pyannote.metrics' DiarizationErrorRate with the NIST collar of 0.25 s on each side of every
reference boundary (pyannote's `collar=0.5`, the total width), overlap scored (the media have
none); it prints missed speech, false alarm and confusion as shares of the scored reference
speech; DER0 is the same with no collar. RTF = wall time of the handler / audio duration (model
load apart; the baseline's: embedding + its clustering); CPU/s = CPU seconds of the process per
second of audio. On this shared machine wall time follows the load, and CPU time too when torch
runs more threads than it gets cores (OpenMP threads spin while they wait): the 1-minute load
average is printed on each row. setup MB = ru_maxrss after the model is loaded, peak MB = at the
end of the handler (the baselines' clustering runs after it). Under each group: windows, embedding
and clustering seconds, RSS after embedding, and the seconds of speech per speaker found.

    --save-windows DIR   keep each run's windows (times, vectors) and regions as .npz, to study
                         the clustering without embedding again
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


REGIONS = r"""
import json, sys
from pathlib import Path
import numpy as np
wav, rttm, vad, models_dir, out, threads = sys.argv[1:]
from captionbus.services.audio import read_wav
from captionbus.contracts.speech import SpeechRegion, SpeechRegions
if vad == "silero":  # the vad stage itself, as in a workflow
    import structlog
    from captionbus.services.runtime import SetupContext
    from captionbus.services.runtime.testing import make_fake_context
    from captionbus.services.vad.stage import STAGE as VAD
    resources = VAD.setup(SetupContext(stage="vad", env="diarization", models_dir=Path(models_dir),
                                       log=structlog.get_logger(), options={"threads": int(threads)}))
    ctx = make_fake_context(Path(out).parent / "vad-work", "vad", inputs={"audio": Path(wav)}, resources=resources)
    Path(out).write_text(VAD.handle(ctx.request, ctx)["regions"].read_text())
    sys.exit(0)
samples = read_wav(Path(wav))
duration = len(samples) / 16000
if vad == "oracle":
    regions = sorted((float(f[3]), float(f[3]) + float(f[4])) for f in (ln.split() for ln in Path(rttm).read_text().splitlines()))
else:
    from captionbus.services.diarization import models
    from captionbus.services.vad.regions import FrameScores, binarize, bridge_short_gaps, drop_short
    seg = models.load_segmentation(Path(models_dir) / models.DEFAULT_FILES[vad])
    probs, step, start = models.speech_scores(seg, samples)
    regions = drop_short(bridge_short_gaps(binarize(FrameScores(probs, step, start), 0.5, 0.35), 0.3), 0.25)
Path(out).write_text(SpeechRegions(backend=vad, duration=duration,
                                   regions=[SpeechRegion(start=a, end=b) for a, b in regions]).model_dump_json())
"""

# pyannote.audio's AgglomerativeClustering (min_cluster_size 12, as in pyannote/speaker-diarization-3.1):
# with 3.1's own linkage and threshold, and with average linkage at the threshold that is best on
# the `dev` dialogue (a sweep of 0.5-1.4 on its windows: 0.55-0.75 give 4/4, DER 1.6-1.7 %, except
# 0.65 with 5 speakers; centroid linkage was never better than 3 of 4 there).
BASELINES = [("pyannote-3.1", "centroid", 0.7045654963945799), ("pyannote-avg", "average", 0.7)]

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
wav, rttm, regions_file, embedder_name, speakers, models_dir, threads, work, save = sys.argv[1:]
import structlog
from pyannote.core import Annotation, Segment
from pyannote.metrics.diarization import DiarizationErrorRate
from captionbus.services.runtime import SetupContext
from captionbus.services.runtime.testing import make_fake_context
from captionbus.services.diarization import core, stage

rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
reference = Annotation()
for line in Path(rttm).read_text().splitlines():
    f = line.split()
    reference[Segment(float(f[3]), float(f[3]) + float(f[4]))] = f[7]
t0 = time.monotonic()
resources = stage.STAGE.setup(SetupContext(stage="diarization", env="diarization", models_dir=Path(models_dir),
                                           log=structlog.get_logger(), options={"threads": int(threads)}))
resources.get(embedder_name)
load_s, setup_rss = time.monotonic() - t0, rss()
captured = {}
diarize = core.diarize_windows
def capture(windows, regions, count, settings):  # keep the windows for the baseline clustering
    captured.update(windows=windows, regions=regions, count=count, embedded=time.monotonic(), rss=rss())
    return diarize(windows, regions, count, settings)
core.diarize_windows = capture
ctx = make_fake_context(Path(work), "diarization", inputs={"audio": Path(wav), "regions": Path(regions_file)},
                        params={"speakers": speakers, "embedder": embedder_name}, resources=resources)
c1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
turns = json.loads(stage.STAGE.handle(ctx.request, ctx)["turns"].read_text())["turns"]
t2, c2 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
peak = rss()
duration = ctx.metrics["audio_duration_s"]
if save:  # the windows, to study the clustering without embedding again
    w = captured["windows"]
    np.savez(save, starts=w.starts, ends=w.ends, vectors=w.vectors, regions=np.array(captured["regions"]))
cpu = lambda a, b: b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime

def score(turns):
    hyp = Annotation()
    for start, end, who in turns:
        hyp[Segment(start, end)] = who
    d = DiarizationErrorRate(collar=0.5, skip_overlap=False)(reference, hyp, detailed=True)
    total = d["total"]
    per = {}
    for start, end, who in turns:
        per[who] = per.get(who, 0.0) + end - start
    return {"der": d["diarization error rate"], "missed": d["missed detection"] / total,
            "false_alarm": d["false alarm"] / total, "confusion": d["confusion"] / total,
            "der_nocollar": DiarizationErrorRate(collar=0.0)(reference, hyp),
            "speakers_true": len(reference.labels()), "speakers_found": len(hyp.labels()),
            "speaker_seconds": {k: round(v, 1) for k, v in sorted(per.items())}}

result = {"duration": duration, **score([(t["start"], t["end"], t["speaker"]) for t in turns]),
          "load_s": load_s, "embed_s": captured["embedded"] - t1, "cluster_s": t2 - captured["embedded"],
          "windows": len(captured["windows"]), "rtf": (t2 - t1) / duration, "cpu_per_s": cpu(c1, c2) / duration,
          "setup_rss_mb": setup_rss, "embedded_rss_mb": captured["rss"], "peak_rss_mb": peak}
# baselines: pyannote.audio's own clustering on the same windows (BASELINES), then the same turns step
from pyannote.audio.pipelines.clustering import AgglomerativeClustering
count = captured["count"]
result["baselines"] = {}
for name, method, threshold in %s:
    ahc = AgglomerativeClustering(metric="cosine")
    ahc.instantiate({"method": method, "threshold": threshold, "min_cluster_size": 12})
    t3 = time.monotonic()
    labels = ahc.cluster(np.array(captured["windows"].vectors, dtype=np.float64), min_clusters=count.min,
                         max_clusters=count.max, num_clusters=count.fixed)
    base = core.turns_from_windows(captured["windows"], np.asarray(labels), captured["regions"])
    result["baselines"][name] = {**score([(t.start, t.end, t.speaker) for t in base]),
                                 "rtf": (captured["embedded"] - t1 + time.monotonic() - t3) / duration}
print("RESULT " + json.dumps(result))
""" % repr(BASELINES)


def run_child(python: str, script: str, *args: str) -> str:
    done = subprocess.run([python, "-c", script, *args], cwd=REPO, capture_output=True, text=True, timeout=7200,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PYANNOTE_METRICS_ENABLED": "false"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def regions_for(python: str, wav: Path, vad: str, models_dir: Path, threads: int) -> Path:
    """The speech regions of `wav` by `vad`, made once per media (a separate process, as the vad
    stage is a separate service: its memory and time are not the diarization stage's)."""
    out = wav.with_name(f"{wav.stem}.{vad}.regions.json")
    if not out.is_file() or out.stat().st_mtime < wav.stat().st_mtime:
        run_child(python, REGIONS, str(wav), str(wav.with_suffix(".rttm")), vad, str(models_dir), str(out),
                  str(threads))
    return out


def run_one(python: str, wav: Path, embedder: str, vad: str, speakers: str, models_dir: Path, threads: int,
            save: Path | None = None) -> dict:
    regions = regions_for(python, wav, vad, models_dir, threads)
    with tempfile.TemporaryDirectory(prefix="diarization-bench-") as work:
        stdout = run_child(python, CHILD, str(wav), str(wav.with_suffix(".rttm")), str(regions), embedder, speakers,
                           str(models_dir), str(threads), work,
                           str(save / f"{wav.stem}.{embedder}.{vad}.npz") if save else "")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{embedder}/{vad} on {wav.name}: no result:\n{stdout[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--media", nargs="+", default=["short", "dev", "music", "three"], choices=list(MEDIA))
    parser.add_argument("--embedders", nargs="+", default=["campplus", "resemblyzer", "dvector"])
    parser.add_argument("--vad", nargs="+", default=["silero"],
                        choices=["silero", "segmentation-3.0", "segmentation", "oracle"])
    parser.add_argument("--speakers", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="the service default (threads=1)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/captionbus-diarization-bench"))
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    parser.add_argument("--save-windows", type=Path, default=None,
                        help="write each run's windows (times, vectors) and regions here as .npz")
    args = parser.parse_args()

    from captionbus.envs import env_python
    from captionbus.core import settings

    python = str(env_python("diarization"))
    models_dir = settings.load().models_dir
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"# {os.cpu_count()} CPUs, {args.threads} torch threads; load = the 1-minute load average as each row ended")
    print(f"{'media':7} {'embedder':11} {'vad':9} {'clustering':12} {'DER':>6} {'miss':>6} {'FA':>6} {'conf':>6} "
          f"{'DER0':>6} {'spk':>5} {'RTF':>6} {'CPU/s':>6} {'setup MB':>8} {'peak MB':>7} {'load':>5}")
    for media in args.media:
        started = time.monotonic()
        wav = make_media(media, args.work)
        made = time.monotonic() - started
        if made > 1:
            print(f"# made {wav.name} in {made:.0f} s")
        for embedder in args.embedders:
            for vad in args.vad:
                r = run_one(python, wav, embedder, vad, args.speakers, models_dir, args.threads, args.save_windows)
                load = os.getloadavg()[0]
                results.append({"media": media, "embedder": embedder, "vad": vad, "load": load, **r})
                for name, row in (("captionbus", r), *r["baselines"].items()):
                    print(f"{media:7} {embedder:11} {vad:9} {name:12} {row['der']:6.1%} {row['missed']:6.1%} "
                          f"{row['false_alarm']:6.1%} {row['confusion']:6.1%} {row['der_nocollar']:6.1%} "
                          f"{row['speakers_found']:>2}/{row['speakers_true']:<2} {row['rtf']:6.3f} "
                          f"{r['cpu_per_s'] if row is r else float('nan'):6.3f} {r['setup_rss_mb']:8.0f} "
                          f"{r['peak_rss_mb']:7.0f} {load:5.1f}", flush=True)
                print(f"#   {r['duration']:.0f} s, {r['windows']} windows: embedded in {r['embed_s']:.1f} s, "
                      f"clustered in {r['cluster_s']:.1f} s, RSS {r['embedded_rss_mb']:.0f} MB after embedding; "
                      f"seconds per speaker found: {r['speaker_seconds']}", flush=True)
                for name, row in r["baselines"].items():
                    print(f"#   {name}: {row['speaker_seconds']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
