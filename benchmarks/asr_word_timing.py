"""Where the asr stage's time goes against a bare whisperx loop, per clip, in one process: the
backlog benchmark (benchmarks/backlog.py) measures whole sides, whose walls follow the load of a
shared machine; this one rotates the paths clip by clip on one loaded model, so all see the
same load, and times the stage's word timing apart: word times from the decode's own encoder
output (the stage's default on the CPU, "reuse") against a second encoder pass per window
("re-encode", what the stage did before; `WhisperX.reuse_encoder = False`).

    nice -n 19 python benchmarks/asr_word_timing.py              # 8 clips of 20-60 s
    nice -n 19 python benchmarks/asr_word_timing.py --clips 16

Per clip (the backlog benchmark's clips, another seed), in the whisperx env:
- bare: whisperx's `pipeline.transcribe(audio, batch_size=4)` with the Silero VAD faster-whisper
  bundles (backlog.SILERO_VAD), the language detected: what the bare loop does per clip.
- stage, twice (re-encode, reuse): the language request's work (`detect_language` on the first
  30 s of the regions' speech), then `whisperx_backend.transcribe` on the regions (batched
  decode of the same windows, the decoder statistics, word times), with `time_words` (re-encode:
  a second encoder pass per window and Whisper's cross-attention `find_alignment`; reuse: the
  rest of the word timing, the alignment having run inside the decode) timed apart. The regions
  come from the same Silero VAD here; the vad stage's own parameters differ a little. Both give
  the same words and word times (checked per clip: `same` in the table).
- stage, first window (the stage's path since the language is heard in the decode's first
  window): `whisperx_backend.transcribe` given no language, so it detects on the first window
  and the decode reuses that encoder pass (detect_on_regions, first_window_reused), word times
  as in reuse. `same` (the second one): the same language, words and word times as reuse, which
  detects on its own pass over the first 30 s of speech; `p`: the first window's probability.
Wall and CPU seconds (the process's, all threads) of each; the order of the four paths rotates
from clip to clip, so a load drift favours none. 2 threads (the usable cores), int8, Whisper base.
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

words = {}

def stage(audio, reuse, inside=False):
    name = "first" if inside else "reuse" if reuse else "reencode"
    model.reuse_encoder = reuse
    found = get_speech_timestamps(audio, VadOptions(max_speech_duration_s=30))
    regions = [(s["start"] / 16000, s["end"] / 16000) for s in found]
    spent[0] = 0.0
    t, c = time.perf_counter(), time.process_time()
    language = None  # inside: transcribe hears it in the first window (wb.detect_on_regions)
    if not inside:
        language, _, _ = model.whisper.detect_language(audio=wb.speech_sample(audio, regions))
    language, probability, segments = wb.transcribe(model, audio, language, regions, lambda *a: None)
    out = {f"{name}_s": time.perf_counter() - t, f"{name}_cpu_s": time.process_time() - c,
           f"{name}_time_words_s": spent[0]}
    if inside:
        out["first_probability"] = probability
    words[name] = (language, [(w.text, w.start, w.end) for s in segments for w in s.words])
    return out

paths = [bare, lambda audio: stage(audio, False), lambda audio: stage(audio, True),
         lambda audio: stage(audio, True, inside=True)]
for i, clip in enumerate(args["clips"]):
    audio = whisperx.load_audio(clip)
    row = {"clip": clip, "audio_s": len(audio) / 16000}
    for k in range(len(paths)):
        row.update(paths[(i + k) % len(paths)](audio))
    row["same"] = words["reuse"] == words["reencode"]
    row["same_first"] = words["first"] == words["reuse"]
    print(json.dumps(row), flush=True)
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
    print(f"{'clip s':>7}{'bare s':>9}{'CPU':>7}{'re-encode s':>13}{'CPU':>7}{'time_words':>12}"
          f"{'reuse s':>10}{'CPU':>7}{'time_words':>12}{'same':>6}{'first window s':>16}{'CPU':>7}{'p':>6}{'same':>6}")
    for r in rows:
        print(f"{r['audio_s']:>7.1f}{r['bare_s']:>9.2f}{r['bare_cpu_s']:>7.2f}{r['reencode_s']:>13.2f}"
              f"{r['reencode_cpu_s']:>7.2f}{r['reencode_time_words_s']:>12.2f}{r['reuse_s']:>10.2f}"
              f"{r['reuse_cpu_s']:>7.2f}{r['reuse_time_words_s']:>12.2f}{'yes' if r['same'] else 'NO':>6}"
              f"{r['first_s']:>16.2f}{r['first_cpu_s']:>7.2f}{r['first_probability']:>6.2f}"
              f"{'yes' if r['same_first'] else 'NO':>6}")
    keys = ("bare_s", "bare_cpu_s", "reencode_s", "reencode_cpu_s", "reencode_time_words_s", "reuse_s", "reuse_cpu_s",
            "reuse_time_words_s", "first_s", "first_cpu_s", "first_time_words_s")
    total = {k: sum(r[k] for r in rows) for k in keys}
    for name, label in (("reencode", "stage, re-encode"), ("reuse", "stage, reuse"),
                        ("first", "stage, reuse, language from the first window")):
        print(f"{label}: {total[f'{name}_s']:.1f} s ({total[f'{name}_cpu_s']:.1f} CPU s): "
              f"{total[f'{name}_s'] / total['bare_s']:.2f}x the bare wall, "
              f"{total[f'{name}_cpu_s'] / total['bare_cpu_s']:.2f}x its CPU; "
              f"time_words {total[f'{name}_time_words_s']:.1f} s")
    print(f"all {len(rows)} clips: bare {total['bare_s']:.1f} s ({total['bare_cpu_s']:.1f} CPU s); reuse / re-encode "
          f"{total['reuse_s'] / total['reencode_s']:.2f}x wall, "
          f"{total['reuse_cpu_s'] / total['reencode_cpu_s']:.2f}x CPU; "
          f"same words and times on {sum(r['same'] for r in rows)}/{len(rows)}; first window / reuse "
          f"{total['first_s'] / total['reuse_s']:.2f}x wall, {total['first_cpu_s'] / total['reuse_cpu_s']:.2f}x CPU, "
          f"same language, words and times on {sum(r['same_first'] for r in rows)}/{len(rows)}; "
          f"load average {load_average()}")


if __name__ == "__main__":
    main()
