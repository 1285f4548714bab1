"""Rule violations of our subtitle engine vs WhisperX's own SRT writer, on the same word streams.

    python benchmarks/subtitle_rules.py --whisperx-python /path/to/whisperx-venv/bin/python

The word streams are realistic and deterministic (captionbus.core.subtitles.samples: English and Hindi
sentences timed like speech, with pauses and two speakers). For each stream:
  - ours: build_cues with the language's default rules, written as SRT;
  - whisperx: whisperx.utils.WriteSRT with max_line_width=42, max_line_count=2, run in the given
    interpreter (whisperx is not a control-plane dependency); skipped if no interpreter is given;
  - segments: one cue per ASR segment, what a naive writer does;
then `check_file` with the same rules on every SRT. Throughput is in-process (no interpreter start).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from captionbus.core.subtitles import Cue, build_cues, check_file, load_rules, write_subtitles
from captionbus.core.subtitles.check import RULE_NAMES
from captionbus.core.subtitles.samples import synthetic_transcript

WHISPERX_WRITER = r"""
import io, json, sys, time
from whisperx.utils import get_writer
import whisperx
result, out_dir, repeat = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
options = {"max_line_width": 42, "max_line_count": 2, "highlight_words": False}
writer = get_writer("srt", out_dir)
best = float("inf")
for _ in range(repeat):
    t = time.perf_counter()
    writer.write_result(result, io.StringIO(), options)
    best = min(best, time.perf_counter() - t)
writer(result, sys.argv[1], options)
from importlib.metadata import version
print(json.dumps({"seconds": best, "version": version("whisperx")}))
"""


def whisperx_input(transcript) -> dict:
    """The transcript as whisperx.align() returns it (no speaker keys: the writer would prefix them)."""
    return {"language": transcript.language, "segments": [
        {"start": s.start, "end": s.end, "text": s.text,
         "words": [{"word": w.text, "start": w.start, "end": w.end, "score": w.score} for w in s.words]}
        for s in transcript.segments]}


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_stream(language: str, sentences: int, out: Path, wx_python: str | None, repeat: int) -> dict:
    transcript = synthetic_transcript(language, sentences=sentences, seed=1)
    rules = load_rules(language=language)
    n_words = sum(len(s.words) for s in transcript.segments)
    columns: dict[str, dict] = {}

    seconds, result = best_time(lambda: build_cues(transcript, rules), repeat)
    ours = write_subtitles(result.cues, out / f"{language}.ours.srt")
    columns["ours"] = {"report": check_file(ours, rules), "words_per_s": n_words / seconds}

    if wx_python:
        src = out / f"{language}.json"
        src.write_text(json.dumps(whisperx_input(transcript), ensure_ascii=False), encoding="utf-8")
        proc = subprocess.run([wx_python, "-c", WHISPERX_WRITER, str(src), str(out), str(repeat)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"whisperx writer failed:\n{proc.stderr[-3000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        wx = out / f"{language}.whisperx.srt"
        (out / f"{language}.srt").rename(wx)
        columns[f"whisperx {info['version']}"] = {"report": check_file(wx, rules),
                                                   "words_per_s": n_words / info["seconds"]}

    naive = [Cue(round(s.start * 1000), round(s.end * 1000), [s.text.strip()]) for s in transcript.segments]
    seg = write_subtitles(naive, out / f"{language}.segments.srt")
    columns["segments"] = {"report": check_file(seg, rules), "words_per_s": None}
    return {"language": language, "words": n_words, "duration": transcript.duration, "columns": columns}


def table(stream: dict) -> str:
    names = list(stream["columns"])
    reports = [stream["columns"][n]["report"] for n in names]
    w = max(14, *(len(n) + 2 for n in names))
    rows = [f"{stream['language']}: {stream['words']} words, {stream['duration'] / 60:.1f} min of speech",
            f"{'':<22}" + "".join(f"{n:>{w}}" for n in names)]

    def row(label, values):
        rows.append(f"{label:<22}" + "".join(f"{v:>{w}}" for v in values))

    row("cues", [r.cues for r in reports])
    row("cues with violations", [r.cues_with_violations for r in reports])
    for rule in RULE_NAMES:
        row(f"  {rule}", [r.counts[rule] for r in reports])
    finite = [sorted(c for c in r.cps if c != float("inf")) for r in reports]
    row("median chars/s", [f"{median(c):.1f}" if c else "-" for c in finite])
    row("p90 chars/s", [f"{c[int(0.9 * (len(c) - 1))]:.1f}" if c else "-" for c in finite])
    row("words/s", [f"{stream['columns'][n]['words_per_s']:,.0f}" if stream["columns"][n]["words_per_s"] else "-"
                    for n in names])
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whisperx-python", help="python of a venv with whisperx installed")
    ap.add_argument("--sentences", type=int, default=300, help="sentences per stream")
    ap.add_argument("--repeat", type=int, default=3, help="timing runs (best is kept)")
    ap.add_argument("--out", type=Path, default=None, help="where the SRTs go (default: a temp dir)")
    args = ap.parse_args(argv)
    args.out = args.out or Path(tempfile.mkdtemp(prefix="subtitle_rules."))
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.whisperx_python:
        from captionbus.envs import env_python

        built = env_python("whisperx")
        args.whisperx_python = str(built) if built.exists() else None
    if not args.whisperx_python:
        print("no whisperx env (captionbus envs create whisperx) and no --whisperx-python: "
              "skipping the WhisperX column\n")
    rules = load_rules()
    print(f"rules: {rules.max_chars_per_line} chars x {rules.max_lines} lines, {rules.min_duration:g}-"
          f"{rules.max_duration:g} s, {rules.max_cps:g} chars/s, {rules.min_gap_frames} frames at "
          f"{rules.default_fps:g} fps; lengths in grapheme clusters. SRTs in {args.out}\n")
    for language in ("en", "hi"):
        print(table(run_stream(language, args.sentences, args.out, args.whisperx_python, args.repeat)))
        print()


if __name__ == "__main__":
    main()
