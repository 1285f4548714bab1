"""Where the asr stage's time goes against a bare whisperx loop, per clip, in one process: the
backlog benchmark (benchmarks/backlog.py) measures whole sides, whose walls follow the load of a
shared machine; this one alternates the two paths clip by clip on one loaded model, so both see
the same load, and times the stage's word timing apart.

    nice -n 19 python benchmarks/asr_word_timing.py              # 8 clips of 20-60 s
    nice -n 19 python benchmarks/asr_word_timing.py --clips 16

Per clip (the backlog benchmark's clips, another seed), in the whisperx env:
- bare: whisperx's `pipeline.transcribe(audio, batch_size=4)` with the Silero VAD faster-whisper
  bundles (backlog.SILERO_VAD), the language detected: what the bare loop does per clip.
- stage: the language request's work (`detect_language` on the first 30 s of the regions'
  speech), then `whisperx_backend.transcribe` on the regions (batched decode of the same
  windows, the decoder statistics, word times), with `time_words` (a second encoder pass per
  window and Whisper's cross-attention `find_alignment`) timed apart. The regions come from the
  same Silero VAD here; the vad stage's own parameters differ a little.
Wall and CPU seconds (the process's, all threads) of each; the clip order of the two paths
alternates, so a load drift favours neither. 2 threads (the usable cores), int8, Whisper base.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backlog import ROOT, SILERO_VAD, load_average, make_clips  # noqa: E402
from captionbus.core.hardware import usable_cores  # noqa: E402
from captionbus.core.settings import load  # noqa: E402
from captionbus.envs import interpreter_for_stage  # noqa: E402

SPLIT = r'''
import json, sys, time
args = json.loads(sys.argv[1])
sys.path.insert(0, args["root"])
import torch, whisperx
from captionbus.services.asr import whisperx_backend as wb

class Log:
    def info(self, *a, **k):
        pass

model = wb.load(args["model"], Log(), device="cpu", compute_type="int8", threads=args["threads"], batch_size=4)
''' + SILERO_VAD + r'''
pyannote = model.pipeline.vad_model
spent = [0.0]
time_words = wb.time_words

def timed_time_words(*a, **k):
    t = time.perf_counter()
    try:
        return time_words(*a, **k)
    finally:
        spent[0] += time.perf_counter() - t

wb.time_words = timed_time_words

def bare(audio):
    model.pipeline.vad_model = Silero()
    try:
        t, c = time.perf_counter(), time.process_time()
        model.pipeline.transcribe(audio, batch_size=4, language=None)
        return {"bare_s": time.perf_counter() - t, "bare_cpu_s": time.process_time() - c}
    finally:
        model.pipeline.vad_model = pyannote

def stage(audio):
    found = get_speech_timestamps(audio, VadOptions(max_speech_duration_s=30))
    regions = [(s["start"] / 16000, s["end"] / 16000) for s in found]
    spent[0] = 0.0
    t, c = time.perf_counter(), time.process_time()
    language, _, _ = model.whisper.detect_language(audio=wb.speech_sample(audio, regions))
    wb.transcribe(model, audio, language, regions, lambda *a: None)
    return {"stage_s": time.perf_counter() - t, "stage_cpu_s": time.process_time() - c, "time_words_s": spent[0]}

for i, clip in enumerate(args["clips"]):
    audio = whisperx.load_audio(clip)
    first, second = (bare, stage) if i % 2 == 0 else (stage, bare)
    print(json.dumps({"clip": clip, "audio_s": len(audio) / 16000, **first(audio), **second(audio)}), flush=True)
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seed", type=int, default=23)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores ({usable_cores()} usable), nice {os.nice(0)}; load average {load_average()}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        clips = [m[0] for m in make_clips(Path(tmp), args.clips, args.seed, 20.0, 60.0)]
        job = {"clips": [str(c) for c in clips], "root": str(ROOT), "threads": usable_cores(),
               "model": str(load().models_dir / "whisper-base-ct2")}
        done = subprocess.run([str(interpreter_for_stage("asr")), "-c", SPLIT, json.dumps(job)], capture_output=True,
                              text=True, check=False, cwd=tmp)
    if done.returncode != 0:
        raise SystemExit(f"the whisperx process failed (rc {done.returncode}): {done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    print(f"{'clip s':>7}{'bare s':>9}{'CPU':>7}{'stage s':>10}{'CPU':>7}{'time_words s':>14}")
    for r in rows:
        print(f"{r['audio_s']:>7.1f}{r['bare_s']:>9.2f}{r['bare_cpu_s']:>7.2f}{r['stage_s']:>10.2f}"
              f"{r['stage_cpu_s']:>7.2f}{r['time_words_s']:>14.2f}")
    total = {k: sum(r[k] for r in rows) for k in ("bare_s", "bare_cpu_s", "stage_s", "stage_cpu_s", "time_words_s")}
    print(f"all {len(rows)}: bare {total['bare_s']:.1f} s ({total['bare_cpu_s']:.1f} CPU s), stage "
          f"{total['stage_s']:.1f} s ({total['stage_cpu_s']:.1f} CPU s): {total['stage_s'] / total['bare_s']:.2f}x wall, "
          f"{total['stage_cpu_s'] / total['bare_cpu_s']:.2f}x CPU; time_words {total['time_words_s']:.1f} s, the stage "
          f"without it {(total['stage_s'] - total['time_words_s']) / total['bare_s']:.2f}x the bare wall; "
          f"load average {load_average()}")


if __name__ == "__main__":
    main()
