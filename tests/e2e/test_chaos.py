"""The small seeded chaos run (benchmarks/chaos.py --quick) as a CI test: a 3-node JetStream
cluster at R3, the coordinator and the transcribe workers (two asr) as real processes, 3 clips
run once without faults and once while the seeded schedule kill -9s an asr worker, the
coordinator and the NATS node leading the stage requests (each restarted), plus one poisoned job
(a truncated input). The full run (>= 20 jobs, pauses, a network cut) is the benchmark itself."""
from __future__ import annotations

import asyncio

from benchmarks.chaos import main_async, parse_args


def test_seeded_chaos_loses_and_duplicates_nothing(stage_envs, whisper_model, tmp_path):
    report = asyncio.run(main_async(parse_args(["--quick", "--seed", "9", "--workdir", str(tmp_path / "chaos")])))
    print(report.table())

    assert report.submitted == 4  # 3 clips + the poisoned one
    assert report.lost == 0, report.details
    assert report.duplicate_outputs == 0, report.details
    # Nothing the schedule did not kill died anyway (a worker starting mid-failover once did).
    assert report.unplanned_exits == []
    # Every job is terminal: the clips completed, the poisoned one failed with its reason.
    assert report.completed == 3 and report.failed_with_reason == 1, report.details
    assert "truncated or corrupt" in report.poison, report.poison
    # Faults changed nothing a user gets: the SRTs equal the no-fault pass's, byte for byte.
    assert report.compared == 3 and report.differing == 0, report.details
    kinds = sorted(f.kind for f in report.faults)
    assert kinds == ["kill-coord", "kill-leader", "kill-worker"]
    assert all(f.at and f.healed for f in report.faults), [(f.kind, f.at, f.healed) for f in report.faults]
    leader = next(f for f in report.faults if f.kind == "kill-leader")
    assert "leads CB_REQUESTS" in leader.target, leader.target
    # The killed asr worker's replacement came back into service (its model loaded).
    worker = next(f for f in report.faults if f.kind == "kill-worker")
    assert worker.recovery_s is not None and worker.recovery_s > 0
