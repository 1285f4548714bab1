"""The small seeded chaos run (benchmarks/chaos.py --quick) as a CI test: a 3-node JetStream
cluster at R3 whose users are deploy/nats/roles.conf's, the coordinator and the transcribe workers
(two asr) as real processes each logged in as its role, 3 clips run once without faults and once
while the seeded schedule kill -9s an asr worker, the coordinator and the NATS node leading the
stage requests (each restarted), plus one poisoned job (a truncated input). Between the faults
every attack of issue 18 is made with the ordinary credentials (rollups, tampering with completed
jobs' objects, inbox sniffing, a forged result, predictable ids taken first, gc right after a
fault heals), and every completed job's bytes are fetched again at the end. The full run
(>= 30 jobs, pauses, a network cut) is the benchmark itself."""
from __future__ import annotations

import asyncio
import re

from benchmarks.chaos import ATTACK_KINDS, main_async, parse_args


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
    # Every attack was made, none did harm, and no byte of a completed job changed or vanished.
    attacks = {a.kind: a for a in report.attacks}
    assert sorted(attacks) == sorted(ATTACK_KINDS)
    for a in report.attacks:
        assert a.tried > 0 and a.harmful == 0 and a.harmless == a.tried, (a.kind, a.notes)
    # The coordinator logged each forged result it refused (a restarted one may read them again).
    refusals = re.search(r"coordinator logged (\d+) refusals", attacks["forge"].notes[0])
    assert refusals and int(refusals.group(1)) >= 2, attacks["forge"].notes
    assert report.refs_compared >= 6 * 2 and report.bytes_compared > 0  # 6 jobs: input, srt, ...
    assert report.bytes_lost == 0, report.details
    assert report.ok()
