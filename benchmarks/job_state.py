"""How big a job's record (its JobState, the value of its KV cb_jobs key) grows over a long
chunked film, and how many bytes the coordinator writes for it, event by event.

    python benchmarks/job_state.py [--chunks 240] [--asr-workers 8] [--no-speakers] [--rev REV] [--nats]

It drives `captionbus.coordinator.decide.decide` (pure: no bus) through one `chunked` job with
`--speakers auto` (the diarization node's TurnSummary at its 2000-turn cap): submit, demux, vad,
chunk (`--chunks` items), language, every chunk's asr (completed in request order by
`--asr-workers` simulated replicas, each with a real-sized worker summary: id, env, interpreter,
python, host, pid and seven package versions), diarization after a quarter of the chunks, then
transcript_join, subtitle_gen, mux. Results carry their request's token (the coordinator's result
secret is on, as in every deployment). Each decision that changes the state is one write of
`state.model_dump_json()` with the outbox the coordinator writes with it (the decision's requests
and events: `service.Coordinator._commit`, the previous ones taken as published), plus the
final write that clears the outbox: the same bytes `_write_state` puts.

It prints the writes (a part of the record written once under a key of its own counts as one:
since fde4d86's successor each completed node, before it the speaker summary only), the record's
size at the end (and its parts: node worker summaries, the speaker summary on the record, parts
under keys of their own, applied event ids, every node) and the bytes written in all. `--rev REV`
runs the same simulation on the code of git revision REV too (exported to a temporary directory),
side by side in one run.

Measured on the 2-core machine, `--rev fde4d86 --nats` (the head plus parts against the whole
record; README, "A small head plus parts written once"):
    10 minutes (20 chunks): record 22.1 -> 3.5 KB, 0.49 -> 0.18 MB written, nats-server peak RSS
        19.4 -> 17.9 MB, KV 0.15 -> 0.09 MB
    2 hours (240 chunks):   record 130.8 -> 18.3 KB, 21.63 -> 4.46 MB written (251 writes -> 251
        heads + 248 parts), nats-server peak RSS 43.0 -> 29.5 MB, KV 0.73 -> 0.40 MB
The nats-server figures above predate GOGC=25 (captionbus.server.server_environment, which the
EmbeddedServer used here starts with since e22be86): `--nats` on the same code with GOGC 100 -> 25
gave a peak RSS of 27.5 -> 25.0 MB at 2 hours and 40.4 -> 28.1 MB at 4 hours (480 chunks).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__" and os.environ.get("JOB_STATE_TREE"):
    sys.path.insert(0, os.environ["JOB_STATE_TREE"])
elif str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

SECRET = b"benchmark-result-secret"
PACKAGES = {"captionbus": "0.25.0", "pydantic": "2.11.7", "nats-py": "2.11.0", "whisperx": "3.4.2",
            "faster-whisper": "1.1.1", "ctranslate2": "4.6.0", "torch": "2.7.1"}


def worker_summary(stage: str, replica: int) -> dict[str, str]:
    """What services.runtime.info.worker_summary gives for a worker of a GPU host."""
    host, pid = f"gpu-node-{replica % 4:02d}", 41000 + replica
    env = "whisperx" if stage == "asr" else "diarization" if stage == "diarization" else "common"
    summary = {"worker_id": f"{host}/{stage}/{replica}/{pid}", "stage": stage, "replica": str(replica), "env": env,
               "interpreter": f"/home/captionbus/.captionbus/envs/{env}-3f9a1c27/bin/python", "python": "3.11.13",
               "host": host, "pid": str(pid)}
    return summary | {f"pkg.{name}": version for name, version in PACKAGES.items()}


def stored(state) -> bytes:
    """What Coordinator._write_state puts (JobState.stored(); a whole dump before it)."""
    return state.stored() if hasattr(state, "stored") else state.model_dump_json().encode()


def simulate(chunks: int, asr_workers: int, speakers: bool) -> dict:
    import hashlib

    from captionbus.contracts import JobSpec, JobSubmitted, StageCompleted
    from captionbus.contracts.artifacts import ArtifactRef
    from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns, TurnSummary
    from captionbus.coordinator.decide import Policy, decide, result_token
    from captionbus.coordinator.graph import DEFAULT_WORKFLOWS_DIR, load_workflow
    from captionbus.coordinator.service import request_entry

    graph = load_workflow(DEFAULT_WORKFLOWS_DIR / "chunked.yaml")
    policy = Policy(result_secret=SECRET)
    job_id = "j19a3c5e7f01-4b2d9e6a"
    outputs = {name: node.outputs for name, node in graph.nodes.items()}
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    film_s = chunks * 30.0

    def ref(name: str) -> ArtifactRef:
        return ArtifactRef(key=hashlib.sha256(name.encode()).hexdigest(), name=f"{name}.json", size=48213,
                           media_type="application/json", in_object_store=True)

    turns = SpeakerTurns(duration=film_s, speakers=[f"SPEAKER_{n:02d}" for n in range(6)], turns=[
        SpeakerTurn(start=round(i * 3.6, 3), end=round(i * 3.6 + 3.1, 3), speaker=f"SPEAKER_{i * 7 % 6:02d}")
        for i in range(2400)])
    summary = TurnSummary.of(turns)

    writes, total, sizes, part_bytes = 0, 0, [], 0
    values: list[tuple[str, bytes]] = []  # (key, value) in the order written
    state, replica = None, 0

    def apply(event) -> None:
        nonlocal state, writes, total, now, part_bytes
        now += timedelta(seconds=1)
        decision = decide(state, event, graph, now, policy, {"asr": asr_workers})
        assert decision.changed, decision.note
        entries = [request_entry(r) for r in decision.requests] + [e.model_dump(mode="json") for e in decision.events]
        for part in getattr(decision, "parts", ()):  # a part of the record under its own key, once
            writes, total, part_bytes = writes + 1, total + len(part.value), part_bytes + len(part.value)
            values.append((part.key, part.value))
        value = stored(decision.state.model_copy(update={"outbox": entries}))
        writes, total = writes + 1, total + len(value)
        sizes.append(len(value))
        values.append((job_id, value))
        state = decision.state
        pending.extend(decision.requests)

    def complete(request) -> None:
        nonlocal replica
        name = request.node.rpartition("-")[0] if request.node.startswith("asr-") else request.node
        replica = (replica + 1) % asr_workers if request.stage == "asr" else replica
        extra = {}
        if name == "chunk":
            extra["items"] = {"chunks": chunks}
        if name == "diarization":
            extra["speaker_turns"] = summary
        apply(StageCompleted(
            job_id=job_id, stage=request.stage, node=request.node, attempt=request.attempt,
            outputs={o: ref(f"{request.node}.{o}") for o in outputs[name]},
            metrics={"seconds": 1.5, "audio_seconds": 30.0}, worker=worker_summary(request.stage, replica),
            token=result_token(SECRET, job_id, request.node, request.attempt), **extra))

    pending: list = []
    spec = JobSpec(job_id=job_id, workflow="chunked", input=ref("film.mp4"),
                   options={"diarization": {"speakers": "auto"}} if speakers else {})
    apply(JobSubmitted(event_id=f"{job_id}.submitted", job_id=job_id, time=now, spec=spec))
    held, done_chunks = None, 0
    while pending:
        request = pending.pop(0)
        if request.stage == "diarization" and done_chunks < chunks // 4:
            held = request  # diarization of a whole film finishes while the chunks decode
            continue
        complete(request)
        done_chunks += request.node.startswith("asr-")
        if held is not None and done_chunks >= chunks // 4:
            complete(held)
            held = None
    assert state.status.value == "completed", state.status
    final = stored(state)
    writes, total = writes + 1, total + len(final)  # the write that clears the outbox
    values.append((job_id, final))
    record = json.loads(final)
    inline = [n for n in record["nodes"].values() if isinstance(n, dict)]  # the rest: a part's name
    node_workers = sum(len(json.dumps(n.get("worker", {}), separators=(",", ":"))) for n in inline)
    table = len(json.dumps(record.get("workers", {}), separators=(",", ":")))
    turns_bytes = sum(len(json.dumps(n.get("speaker_turns"), separators=(",", ":"))) for n in inline
                      if n.get("speaker_turns") is not None)
    return {"values": values, "state": state, "chunks": chunks, "writes": writes, "record_bytes": len(final), "max_write_bytes": max(sizes),
            "mean_write_bytes": round(total / writes), "bytes_written": total,
            "parts": {"worker summaries": node_workers + table, "speaker summary": turns_bytes,
                      "under keys of their own": part_bytes,
                      "applied ids": len(json.dumps(record["applied"], separators=(",", ":"))),
                      "nodes (all)": len(json.dumps(record["nodes"], separators=(",", ":")))}}


def export_tree(rev: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(PROJECT_ROOT), "archive", rev, "captionbus", "config"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def show(label: str, result: dict) -> None:
    print(f"{label}: {result['chunks']} chunks, {result['writes']} writes, record {result['record_bytes'] / 1000:.1f} KB "
          f"at the end (largest write {result['max_write_bytes'] / 1000:.1f} KB, mean {result['mean_write_bytes'] / 1000:.1f} KB), "
          f"{result['bytes_written'] / 1e6:.2f} MB written")
    print("    " + ", ".join(f"{part} {size / 1000:.1f} KB" for part, size in result["parts"].items()))


def rss_kb(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def on_nats(values: list[tuple[str, bytes]]) -> dict:
    """Write `values` in order into KV cb_jobs of a fresh nats-server (provisioned as the
    coordinator provisions it: file storage, history 5), as fast as it stores them; its memory
    (VmRSS, peak VmHWM) after provisioning and after the writes, and the bucket's bytes."""
    import asyncio
    import logging

    import structlog

    from captionbus.contracts import subjects
    from captionbus.core.bus import connect, provision
    from captionbus.server import EmbeddedServer

    async def write(url: str, pid: int) -> dict:
        nc = await connect(url, "job-state-bench")
        js = nc.jetstream()
        await provision(js)
        await asyncio.sleep(1)
        before = rss_kb(pid)
        kv = await js.key_value(subjects.JOBS_BUCKET)
        for key, value in values:
            await kv.put(key, value)
        await asyncio.sleep(1)
        after = rss_kb(pid)
        info = await js.stream_info(f"KV_{subjects.JOBS_BUCKET}")
        await nc.close()
        return {"rss_before_kb": before["VmRSS"], "rss_after_kb": after["VmRSS"], "hwm_kb": after["VmHWM"],
                "kv_bytes": info.state.bytes}

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        url = server.start()
        try:
            return asyncio.run(write(url, server.process.pid))
        finally:
            server.stop()


def show_nats(label: str, got: dict) -> None:
    print(f"{label}: nats-server RSS {got['rss_before_kb'] / 1024:.1f} MB provisioned -> {got['rss_after_kb'] / 1024:.1f} MB "
          f"after the writes (peak {got['hwm_kb'] / 1024:.1f} MB); KV cb_jobs holds {got['kv_bytes'] / 1e6:.2f} MB")


def main() -> None:
    import pickle

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=240, help="30 s chunks: 240 is a 2-hour film")
    parser.add_argument("--asr-workers", type=int, default=8)
    parser.add_argument("--no-speakers", action="store_true", help="no diarization node")
    parser.add_argument("--rev", help="also run the code of this git revision, side by side")
    parser.add_argument("--nats", action="store_true",
                        help="also write the values into a fresh nats-server each and print its memory")
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    result = simulate(args.chunks, args.asr_workers, not args.no_speakers)
    values = result.pop("values")
    result.pop("state")
    if args.dump:
        Path(args.dump).write_bytes(pickle.dumps((result, values)))
        return
    runs = []
    if args.rev:
        with tempfile.TemporaryDirectory() as tmp:
            tree = export_tree(args.rev, Path(tmp) / "tree")
            dump = Path(tmp) / "values.pickle"
            argv = [sys.executable, __file__, "--dump", str(dump), "--chunks", str(args.chunks),
                    "--asr-workers", str(args.asr_workers), *(["--no-speakers"] if args.no_speakers else [])]
            env = {**os.environ, "JOB_STATE_TREE": str(tree), "PYTHONPATH": str(tree)}
            subprocess.run(argv, env=env, check=True)
            runs.append((f"at {args.rev}", *pickle.loads(dump.read_bytes())))
    runs.append(("this tree" if args.rev else "job state", result, values))
    for label, got, _ in runs:
        show(label, got)
    if args.rev:
        before = runs[0][1]
        print(f"record {result['record_bytes'] / before['record_bytes']:.2f}x, "
              f"bytes written {result['bytes_written'] / before['bytes_written']:.2f}x")
    if args.nats:
        for label, _, written in runs:
            show_nats(label, on_nats(written))


if __name__ == "__main__":
    main()
