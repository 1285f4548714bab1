"""A publisher's backlog: N distinct clips of 20-60 s submitted at once to one warm `captionbus up`
stack, against a bare whisperx loop over the same clips with the model loaded once. Side by side
in one run (bare first, then the stack), on the same cores, the same model, threads, compute type
and batch size (issue 22, item 5: the stack's wall within 1.05x the bare loop's).

    nice -n 10 python benchmarks/backlog.py                 # 100 clips (the issue's size)
    nice -n 10 python benchmarks/backlog.py --clips 12      # reduced
    python benchmarks/backlog.py --language en              # -s en on the stack, language=en bare

What each side does, per clip (the default: the language is detected on both sides):
- bare whisperx (the whisperx env's interpreter, one process, the model loaded once before the
  clock starts): `whisperx.load_audio` (ffmpeg to 16 kHz), `pipeline.transcribe(audio,
  batch_size=4)`: language detection (one encoder pass over the file's first 30 s), the VAD
  (whisperx's pyannote, or the Silero model faster-whisper bundles, the one the stack's vad stage
  runs: --bare-vad, default both loops), batched decode of the speech windows. Segments with
  their times; no word times (whisperx's `align` needs a wav2vec2 model, and none exists
  offline; captionbus's `transcribe` workflow does not align either). Then what a publisher
  needs of it, the stack's deliverables (--no-bare-outputs leaves them out): SRT and VTT by
  whisperx's own writers, and the clip muxed with the SRT into an mp4 (mov_text) and an mkv
  (srt) by ffmpeg, streams copied, as the mux stage does. Timed apart, so each loop gives two
  rows: with the deliverables and transcribe only (the figure of the runs before they existed).
- warm stack (`captionbus up -w transcribe --no-dashboard`, its services ready before the clock
  starts; all N uploaded and submitted at once, as N `captionbus submit` would, then every job
  followed to its end): demux (ffprobe, ffmpeg to a 16 kHz WAV), Silero VAD, chunk (one chunk
  for a clip under CAPTIONBUS_CHUNK_ABOVE_S), asr (one request: the language heard in the
  decode's first window, whose encoder pass the decode reuses, or given with --language; the
  same whisperx pipeline and batched decode, on the VAD's regions instead of pyannote's; word
  times by Whisper's cross-attention alignment on the decode's own encoder output: no second
  encoder pass on the CPU), transcript_join, subtitle_gen (SRT + VTT), mux (ffprobe, then
  mp4 + mkv with the subtitles). So beyond the bare loop with its deliverables, the stack adds
  word times (and subtitle cues cut at them), a probe per clip and the bus.
The stage cache is off (every number is work). Clips: eSpeak NG sentences drawn from a
combinatorial pool (seeded; no two clips share their text), six English voices, 135-175 words a
minute, pauses of 0.3-1.2 s, a 160x120 test-pattern video, AAC audio.

It prints each side's wall and CPU seconds, the ratios, per-clip speech totals, and for the
stack where the time went: per stage, the summed handler time, the summed queue wait (requested
-> handler started) and the requests; the CPU seconds of each of its processes (a stage's
ffmpeg counted to the stage); the asr worker's busy share of the wall; and per job the fixed
costs around asr. The load average is printed with each side: the machine is shared, and a ratio is only as
good as the cores were free during both halves.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captionbus.client import submit  # noqa: E402
from captionbus.contracts import subjects  # noqa: E402
from captionbus.contracts.events import TERMINAL_KINDS, parse_event  # noqa: E402
from captionbus.core.artifacts import ArtifactStore  # noqa: E402
from captionbus.core.bus import connect  # noqa: E402
from captionbus.core.hardware import usable_cores  # noqa: E402
from captionbus.core.settings import load  # noqa: E402
from captionbus.envs import interpreter_for_stage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOICES = ("en", "en-us", "en+f3", "en-us+m3", "en-gb-scotland", "en+f2")
SUBJECTS = ("The old fisherman", "Our new neighbour", "A tired nurse", "The youngest pilot", "My clever sister",
            "The village baker", "A quiet student", "The river guide", "Her grandfather", "The night porter",
            "A travelling painter", "The school librarian", "Their football coach", "The city mayor",
            "A curious reporter", "The ship's cook")
VERBS = ("carried", "painted", "repaired", "borrowed", "counted", "described", "found", "polished", "sold",
         "measured", "planted", "wrapped", "cleaned", "photographed")
OBJECTS = ("a wooden chair", "the broken lantern", "seven silver spoons", "an enormous map", "the green bicycle",
           "a basket of apples", "the heavy suitcase", "two paper kites", "the kitchen clock", "a box of letters",
           "the garden gate", "a warm blanket")
ENDINGS = ("before the storm arrived.", "on a cold Monday morning.", "while the children were asleep.",
           "near the harbour wall.", "after the long meeting.", "for the summer festival.",
           "without saying a single word.", "under the bright street lamps.", "in the middle of the market.",
           "just before midnight.")
SILERO_VAD = r'''
# The Silero VAD model faster-whisper bundles (ONNX), its defaults but speech cut at 30 s,
# handed to whisperx's pipeline in place of pyannote's (whisperx's "silero" needs torch.hub).
from collections import namedtuple
from faster_whisper.vad import VadOptions, get_speech_timestamps
from whisperx.vads import Vad
span = namedtuple("span", "start end speaker")

class Silero(Vad):
    def __init__(self):
        super().__init__(0.5)

    def __call__(self, audio, **kwargs):
        found = get_speech_timestamps(audio["waveform"].numpy()[0] if hasattr(audio["waveform"], "numpy")
                                      else audio["waveform"], VadOptions(max_speech_duration_s=30))
        return [span(s["start"] / 16000, s["end"] / 16000, None) for s in found]

    @staticmethod
    def preprocess_audio(audio):
        return audio

    @staticmethod
    def merge_chunks(segments, chunk_size, onset=None, offset=None):
        return Vad.merge_chunks(segments, chunk_size, onset=0.5, offset=None)

'''
BARE = r'''
import json, os, sys, time
args = json.loads(sys.argv[1])
import torch, whisperx
torch.set_num_threads(args["threads"])
t = time.perf_counter()
model = whisperx.load_model(args["model"], device="cpu", compute_type="int8", language=args["language"],
                            vad_method="pyannote", threads=args["threads"], local_files_only=True)
''' + SILERO_VAD + r'''
if args["vad"] == "silero":
    model.vad_model = Silero()
print(json.dumps({"load_s": time.perf_counter() - t}), flush=True)
from whisperx.utils import get_writer
import subprocess, tempfile
out_dir = tempfile.mkdtemp()
writers = [get_writer(f, out_dir) for f in ("srt", "vtt")]
options = {"max_line_width": None, "max_line_count": None, "highlight_words": False}


def deliver(clip, result):
    """What the stack's subtitle_gen and mux stages make of a transcript: SRT + VTT (whisperx's
    writers), the clip with its subtitles in an mp4 (mov_text) and an mkv (srt), streams copied."""
    for write in writers:
        write(result, clip, options)
    srt = os.path.join(out_dir, os.path.splitext(os.path.basename(clip))[0] + ".srt")
    for container, codec, ext in (("mp4", "mov_text", ".mp4"), ("matroska", "srt", ".mkv")):
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", clip, "-f", "srt", "-i", srt,
                        "-map", "0:V?", "-map", "0:a?", "-map", "1:s:0", "-c:v", "copy", "-c:a", "copy",
                        "-c:s", codec, "-metadata:s:s:0", f"language={result['language']}", "-f", container,
                        os.path.join(out_dir, "out" + ext)], check=True)


started, cpu = time.perf_counter(), sum(os.times()[:4])  # this process and its ffmpeg children
for clip in args["clips"]:
    a, cpu_a = time.perf_counter(), sum(os.times()[:4])
    audio = whisperx.load_audio(clip)
    b = time.perf_counter()
    result = model.transcribe(audio, batch_size=args["batch_size"], language=args["language"])
    c, cpu_c = time.perf_counter(), sum(os.times()[:4])
    if args["outputs"]:
        deliver(clip, result)
    d, cpu_d = time.perf_counter(), sum(os.times()[:4])
    print(json.dumps({"clip": clip, "load_audio_s": b - a, "transcribe_s": c - b, "outputs_s": d - c,
                      "cpu_s": cpu_c - cpu_a, "outputs_cpu_s": cpu_d - cpu_c, "language": result["language"],
                      "text": " ".join(s["text"].strip() for s in result["segments"])}), flush=True)
print(json.dumps({"wall_s": time.perf_counter() - started, "cpu_s": sum(os.times()[:4]) - cpu}), flush=True)
'''
SPEAK = r'''
import json, sys, wave
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.espeak import _Engine, _write_wav
engine = _Engine()
for out, text, voice, wpm in json.loads(sys.stdin.read()):
    _write_wav(Path(out), engine.speak(text, voice, wpm), engine.rate)
'''


def process_label(pid: int) -> str:
    """What a process of the stack is: its stage (`... serve <stage>`), nats-server, `up` (the
    coordinator runs in it), or its program's name (an ffmpeg still running)."""
    try:
        args = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if "serve" in args and args.index("serve") + 1 < len(args):
        return args[args.index("serve") + 1]
    if "up" in args and "captionbus" in args:
        return "up (coordinator)"
    return Path(args[0]).name or "?"


def tree_cpu(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds: user + system, with its reaped children's, so a stage's ffmpeg
    counts to the stage) for `root` and every process under it."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(proc.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    tree = {root}
    for _ in range(6):  # up -> services -> ffmpeg: a few levels
        tree |= {pid for pid, (ppid, _) in stats.items() if ppid in tree}
    return {pid: (process_label(pid), stats[pid][1]) for pid in tree if pid in stats}


def cpu_by_label(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each kind of process used between two tree_cpu snapshots (a process that
    ended in between is in its parent's reaped-children time by then)."""
    spent: dict[str, float] = defaultdict(float)
    for pid, (label, cpu) in after.items():
        if pid in before and before[pid][0] == label:
            spent[label] += cpu - before[pid][1]
        elif pid not in before:
            spent[label] += cpu
    return dict(spent)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- clips


def clip_plans(n: int, seed: int, min_s: float, max_s: float) -> list[dict]:
    """Per clip: a target length, a voice, a speaking rate and sentences no other clip uses."""
    rng = random.Random(seed)
    pool = [f"{s} {v} {o} {e}" for s in SUBJECTS for v in VERBS for o in OBJECTS for e in ENDINGS]
    rng.shuffle(pool)
    plans = []
    for i in range(n):
        wpm = rng.randint(135, 175)
        target = rng.uniform(min_s, max_s)
        # ~9 words a sentence and a pause of ~0.75 s: sentences for the target, a little short
        # (speak_clips tops up or trims to land in [min_s, max_s]).
        count = max(2, int(target / (9 * 60 / wpm + 0.75)))
        plans.append({"voice": VOICES[i % len(VOICES)], "wpm": wpm, "target": target,
                      "sentences": [pool.pop() for _ in range(count + 4)], "count": count,
                      "pauses": [rng.uniform(0.3, 1.2) for _ in range(count + 4)]})
    return plans


def read_pcm16k(path: Path, scratch: Path) -> bytes:
    raw = scratch / (path.stem + ".raw")
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", "16000",
                    "-f", "s16le", str(raw)], check=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


def make_clips(root: Path, n: int, seed: int, min_s: float, max_s: float) -> list[tuple[Path, float, str]]:
    """(mp4, seconds, spoken text) per clip; every sentence spoken by one eSpeak NG process."""
    plans = clip_plans(n, seed, min_s, max_s)
    work = root / "speech"
    work.mkdir()
    lines = [(str(work / f"c{i}-s{k}.wav"), text, plan["voice"], plan["wpm"])
             for i, plan in enumerate(plans) for k, text in enumerate(plan["sentences"])]
    subprocess.run([sys.executable, "-c", SPEAK, str(ROOT)], input=json.dumps(lines), text=True, check=True)

    def one(i: int) -> tuple[Path, float, str]:
        plan = plans[i]
        pcm = [read_pcm16k(work / f"c{i}-s{k}.wav", work) for k in range(len(plan["sentences"]))]
        rate = 16000
        # sentences until the clip is at least min_s and its target; never past max_s
        audio, used = bytearray(b"\0\0" * int(0.5 * rate)), []
        for k, data in enumerate(pcm):
            gap = b"\0\0" * int(plan["pauses"][k] * rate)
            if used and (len(audio) + len(data) + len(gap)) / (2 * rate) > max_s:
                break
            audio += data + gap
            used.append(plan["sentences"][k])
            if len(audio) / (2 * rate) >= max(min_s, plan["target"]):
                break
        seconds = len(audio) / (2 * rate)
        wav = work / f"clip{i:03d}.wav"
        with wave.open(str(wav), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes(bytes(audio))
        mp4 = root / f"clip{i:03d}.mp4"
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        "testsrc=size=160x120:rate=10", "-i", str(wav), "-map", "0:v", "-map", "1:a", "-shortest",
                        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a",
                        "48k", str(mp4)], check=True)
        wav.unlink()
        return mp4, seconds, " ".join(used)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, range(n)))


# ---------------------------------------------------------------- bare whisperx


def bare(clips: list[Path], language: str | None, threads: int, model: Path, vad: str, outputs: bool) -> dict:
    """The bare loop in the whisperx env: model load, then one line per clip, then the wall."""
    args = {"clips": [str(c) for c in clips], "language": language, "threads": threads, "model": str(model),
            "batch_size": 4, "vad": vad, "outputs": outputs}
    done = subprocess.run([str(interpreter_for_stage("asr")), "-c", BARE, json.dumps(args)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bare whisperx failed (rc {done.returncode}): {done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    per_clip = [line for line in lines if "clip" in line]
    return {"load_s": lines[0]["load_s"], "wall_s": lines[-1]["wall_s"], "cpu_s": lines[-1]["cpu_s"], "clips": per_clip}


# ---------------------------------------------------------------- the warm stack


class Up:
    """`captionbus up -w transcribe --no-dashboard` with its own home (the shared envs and models),
    the stage cache off; ready when it prints its `serving:` line."""

    def __init__(self, root: Path):
        self.home = root / "up-home"
        self.env = {**os.environ, "CAPTIONBUS_HOME": str(self.home), "CAPTIONBUS_STAGE_CACHE": "off",
                    "CAPTIONBUS_MODELS": str(load().models_dir), "CAPTIONBUS_ENVS": str(load().envs_dir),
                    "PYTHONPATH": str(ROOT)}
        self.env.pop("NATS_URL", None)
        self.log = root / "up.log"

    def __enter__(self) -> "Up":
        started = time.perf_counter()
        self.file = open(self.log, "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "captionbus", "up", "-w", "transcribe", "--no-dashboard",
                                      "--log-format", "json"], env=self.env, stdout=self.file,
                                     stderr=subprocess.STDOUT, text=True)
        while "serving:" not in self.log.read_text():
            if self.proc.poll() is not None or time.perf_counter() - started > 900:
                raise SystemExit(f"captionbus up did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - started
        os.environ["CAPTIONBUS_HOME"] = str(self.home)  # this process's client: the same bus and store
        self.settings = load()
        self.url = self.settings.embedded_url_file.read_text().strip()
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.file.close()


async def backlog(up: Up, clips: list[Path], language: str | None) -> dict:
    """Every clip uploaded and submitted at once; one subscription on every job's events until
    all N are terminal. Returns the wall (first submit -> last terminal event) and the events."""
    nc = await connect(up.url, "backlog-bench", up.settings)
    js = nc.jetstream()
    store = ArtifactStore(up.settings, js)
    events: dict[str, list] = defaultdict(list)
    ended: dict[str, str] = {}
    all_done = asyncio.Event()
    wanted: set[str] = set()

    async def on_msg(msg) -> None:
        try:
            event = parse_event(msg.data)
        except ValueError:
            return
        events[event.job_id].append((time.time(), event))
        if event.kind in TERMINAL_KINDS:
            ended[event.job_id] = event.kind
            if wanted and wanted <= set(ended):
                all_done.set()

    sub = await nc.subscribe(subjects.EVENTS_WILDCARD, cb=on_msg)
    snapshot, own = tree_cpu(up.proc.pid), sum(os.times()[:2])
    started, started_wall = time.perf_counter(), time.time()
    specs = await asyncio.gather(*(submit(js, store, clip, source_language=language) for clip in clips))
    submitted = time.perf_counter() - started
    wanted.update(spec.job_id for spec in specs)
    if wanted <= set(ended):
        all_done.set()
    await all_done.wait()
    wall = time.perf_counter() - started
    by_label = cpu_by_label(snapshot, tree_cpu(up.proc.pid))
    by_label["this client"] = sum(os.times()[:2]) - own
    cpu = sum(by_label.values())
    await sub.unsubscribe()
    await nc.drain()
    failed = {job: kind for job, kind in ended.items() if job in wanted and kind != "completed"}
    if failed:
        reasons = [getattr(e, "reason", "") for job in failed for _, e in events[job] if e.kind == "failed"]
        raise SystemExit(f"{len(failed)} jobs did not complete: {reasons[:3]}")
    for job in wanted:
        for _, event in events[job]:
            if event.kind == "stage_completed" and event.metrics.get("cache_hit"):
                raise SystemExit(f"{event.node} came from the stage cache: this would measure nothing")
    return {"wall_s": wall, "cpu_s": cpu, "cpu_by": by_label, "submit_s": submitted, "start": started_wall,
            "events": {job: [e for _, e in events[job]] for job in wanted}}


def where_the_time_went(result: dict) -> None:
    """Per stage: requests, summed handler seconds, summed and median queue wait; the asr worker's
    busy share; per job the time from submit to its asr request and from asr done to its end."""
    per_stage: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    before_asr, after_asr, job_walls = [], [], []
    asr_spans = []
    for events in result["events"].values():
        submitted = next(e.time.timestamp() for e in events if e.kind == "submitted")
        end = next(e.time.timestamp() for e in events if e.kind in TERMINAL_KINDS)
        job_walls.append(end - submitted)
        # the coordinator publishes a request's event after the request: a fast stage's
        # completion can arrive first
        requested = {e.node: e.time.timestamp() for e in events if e.kind == "stage_requested"}
        for e in events:
            if e.kind == "stage_completed":
                m = e.metrics
                row = per_stage["language" if e.node == "language" else e.stage]
                row["handle"].append(m.get("handle_s", 0.0))
                row["wait"].append(m.get("started_at", requested.get(e.node, 0.0)) - requested.get(e.node, 0.0))
                row["after"].append(e.time.timestamp() - m.get("handled_at", e.time.timestamp()))
                if e.stage == "asr":
                    asr_spans.append((m["started_at"], m["handled_at"]))
                if e.node.startswith("asr-"):
                    before_asr.append(m["started_at"] - submitted)
                    after_asr.append(end - m["handled_at"])
    wall = result["wall_s"]
    print(f"\nwhere the stack's time went ({len(result['events'])} jobs, wall {wall:.1f} s; submit of all "
          f"{result['submit_s']:.1f} s):")
    print(f"  {'stage':<16}{'requests':>9}{'handler s':>11}{'per req s':>11}{'queue wait p50/max s':>23}"
          f"{'result->event s':>17}")
    for stage, row in sorted(per_stage.items(), key=lambda kv: -sum(kv[1]["handle"])):
        print(f"  {stage:<16}{len(row['handle']):>9}{sum(row['handle']):>11.1f}"
              f"{statistics.mean(row['handle']):>11.2f}"
              f"{statistics.median(row['wait']):>14.1f} / {max(row['wait']):>6.1f}"
              f"{statistics.median(row['after']):>17.3f}")
    jobs = len(result["events"])
    print(f"  CPU s by process ({result['cpu_s']:.1f} in all, {result['cpu_s'] / jobs:.2f} a clip; a stage's "
          "ffmpeg/ffprobe in its stage's): " + ", ".join(
              f"{label} {cpu:.1f} ({cpu / jobs:.2f})" for label, cpu in sorted(result["cpu_by"].items(),
                                                                               key=lambda kv: -kv[1])))
    busy = sum(b - a for a, b in asr_spans)
    first = min(a for a, _ in asr_spans) - result["start"]
    last = result["start"] + wall - max(b for _, b in asr_spans)
    print(f"  asr worker busy {busy:.1f} s of {wall:.1f} s ({busy / wall:.0%}); first asr request started "
          f"{first:.1f} s after the first submit; {last:.1f} s from the last asr result to the last job's end")
    print(f"  per job: submit -> its asr started p50 {statistics.median(before_asr):.1f} s; asr done -> job end "
          f"p50 {statistics.median(after_asr):.1f} s, max {max(after_asr):.1f} s; job wall p50 "
          f"{statistics.median(job_walls):.1f} s")


def words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c == "'" else " " for c in text).split()


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


async def stack_texts(up: Up, result: dict) -> dict[str, str]:
    """Each job's transcript text, by its input's name."""
    from captionbus.contracts.transcript import Transcript

    nc = await connect(up.url, "backlog-bench-read", up.settings)
    js = nc.jetstream()
    store = ArtifactStore(up.settings, js)
    texts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for job, events in result["events"].items():
            spec = next(e.spec for e in events if e.kind == "submitted")
            done = next(e for e in events if e.kind == "completed")
            path = await store.get(done.outputs["transcript"], Path(tmp) / job)
            transcript = Transcript.model_validate_json(path.read_text())
            texts[spec.input.name] = " ".join(s.text for s in transcript.segments)
    await nc.drain()
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--min-s", type=float, default=20.0)
    parser.add_argument("--max-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--language", default=None, help="give the language to both sides (default: both detect)")
    parser.add_argument("--bare-vad", choices=["silero", "pyannote", "both"], default="both",
                        help="the bare loop's VAD: silero (the model the stack's vad stage runs, faster-whisper's "
                             "copy), pyannote (whisperx's default), or both loops (default)")
    parser.add_argument("--bare-outputs", action=argparse.BooleanOptionalAction, default=True,
                        help="the bare loop also writes what the stack delivers: SRT + VTT and the clip muxed "
                             "with them into mp4 and mkv (default; its rows then show it with and without)")
    args = parser.parse_args()
    settings = load()
    model = settings.models_dir / "whisper-base-ct2"
    threads = usable_cores()
    print(f"{os.cpu_count()} cores ({threads} usable), nice {os.nice(0)}; load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        made = make_clips(root, args.clips, args.seed, args.min_s, args.max_s)
        clips = [m[0] for m in made]
        audio_s = sum(m[1] for m in made)
        print(f"{len(clips)} clips, {min(m[1] for m in made):.1f}-{max(m[1] for m in made):.1f} s, "
              f"{audio_s / 60:.1f} min of speech in all, made in {time.perf_counter() - t:.0f} s", flush=True)

        bares = {}
        for vad in (["silero", "pyannote"] if args.bare_vad == "both" else [args.bare_vad]):
            print(f"bare whisperx ({vad} VAD): load average before {load_average()}", flush=True)
            b = bares[vad] = bare(clips, args.language, threads, model, vad, args.bare_outputs)
            print(f"bare whisperx ({vad} VAD): {b['wall_s']:.1f} s for {len(clips)} clips (model load "
                  f"{b['load_s']:.1f} s, not counted; ffmpeg load_audio {sum(c['load_audio_s'] for c in b['clips']):.1f} "
                  f"s, transcribe {sum(c['transcribe_s'] for c in b['clips']):.1f} s, SRT + VTT + mux "
                  f"{sum(c['outputs_s'] for c in b['clips']):.1f} s / {sum(c['outputs_cpu_s'] for c in b['clips']):.1f} "
                  f"CPU s); load average after {load_average()}", flush=True)

        with Up(root) as up:
            print(f"stack up in {up.startup_s:.0f} s (not counted); load average before {load_average()}", flush=True)
            w = asyncio.run(backlog(up, clips, args.language))
            print(f"warm stack: {w['wall_s']:.1f} s for {len(clips)} clips; load average after {load_average()}",
                  flush=True)
            texts = asyncio.run(stack_texts(up, w))
        where_the_time_went(w)
        spoken = {m[0].name: m[2] for m in made}
        print("\nWER against the spoken text, mean over clips: "
              + ", ".join(f"bare ({vad}) {statistics.mean(wer(spoken[Path(c['clip']).name], c['text']) for c in b['clips']):.3f}"
                          for vad, b in bares.items())
              + f", stack {statistics.mean(wer(spoken[name], text) for name, text in texts.items()):.3f}")
    # CPU seconds beside the wall: on a shared machine a side's wall follows the load while it
    # ran; its CPU seconds much less so (the bare loop's process and its ffmpeg children; every
    # process of the stack, nats-server and ffmpeg included, and this client).
    print(f"\n{'side':<48}{'wall s':>9}{'per clip s':>12}{'x realtime':>12}{'stack / it':>12}{'CPU s':>9}"
          f"{'stack / it':>12}")
    rows = []
    for vad, b in bares.items():
        if args.bare_outputs:
            rows.append((f"bare loop, {vad} VAD, + SRT/VTT/mp4/mkv", b["wall_s"], b["cpu_s"]))
        rows.append((f"bare loop, {vad} VAD, transcribe only", b["wall_s"] - sum(c["outputs_s"] for c in b["clips"]),
                     b["cpu_s"] - sum(c["outputs_cpu_s"] for c in b["clips"])))
    for name, wall, cpu in rows:
        print(f"{name:<48}{wall:>9.1f}{wall / len(clips):>12.2f}{audio_s / wall:>12.1f}{w['wall_s'] / wall:>11.2f}x"
              f"{cpu:>9.1f}{w['cpu_s'] / cpu:>11.2f}x")
    print(f"{'warm captionbus up, all submitted at once':<48}{w['wall_s']:>9.1f}{w['wall_s'] / len(clips):>12.2f}"
          f"{audio_s / w['wall_s']:>12.1f}{'':>12}{w['cpu_s']:>9.1f}")
    print(f"issue 22 asks the stack <= 1.05x the bare loop; language: {args.language or 'detected per clip on both sides'}; "
          f"load average at the end {load_average()}")


if __name__ == "__main__":
    main()
