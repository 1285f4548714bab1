"""The model-based test of the whole stack (tests/system/test_model.py), long: >= 300 seeded random
operations — submits through the CLI and the gateway, cancels and retries through both, kill -9
of workers, restarts of the coordinator, the gateway and the dashboard — on the local two-host
stack, with a quiet point every --check-every operations. Prints, per seed, the operations made
and the table of invariant checks and violations; exits 1 when any invariant was violated.

    python benchmarks/model.py                      # seed 1, 300 operations, a quiet point every 50
    python benchmarks/model.py --seeds 1,2,3 --ops 400 --check-every 40

It runs the test itself through pytest (its fixtures start the nats-server and the webhook
receiver), with CAPTIONBUS_MODEL_OPS / _SEEDS / _CHECK_EVERY / _REPORT set; CI runs the same
test with a few short seeds. Intermediate quiet points compare the histories of the jobs the
operations touched since the previous one (plus 3 others at random); the last compares every
job's, so the run stays linear in its jobs. Every check runs; a violation is counted, not raised,
until the end.

Measured (December 2026, 2-core machine shared at load average 12-17; seed 7, 300 operations,
a quiet point every 100; 1429 s, ~4.8 s an operation):
  300 operations: submit cli 60, submit gateway 53, cancel gateway 16, cancel cli 7, retry gateway 20,
  retry cli 18 (56 cancels/retries accepted), kill -9 26, restart-coordinator 30, restart-gateway 27,
  restart-dashboard 18, pause 25; 113 jobs (82 completed, 25 failed, 6 cancelled)
  invariant    checks violations
  deadline          3          0
  webhooks          3          0
  job lists         3          0
  workers           3          0
  history         198          0   (every job's at the last quiet point, touched ones before)
  model           198          0
An earlier run of the same seed, cut at operation ~210 by pytest-timeout, had 0 violations at its
four quiet points (50-200 operations, 71 jobs)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1", help="comma-separated seeds (default 1)")
    parser.add_argument("--ops", type=int, default=300, help="operations per seed (default 300)")
    parser.add_argument("--check-every", type=int, default=50, help="operations between quiet points (default 50)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.txt"
        env = {**os.environ, "CAPTIONBUS_MODEL_SEEDS": args.seeds, "CAPTIONBUS_MODEL_OPS": str(args.ops),
               "CAPTIONBUS_MODEL_CHECK_EVERY": str(args.check_every), "CAPTIONBUS_MODEL_REPORT": str(report),
               "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--timeout=0",
                                 str(ROOT / "tests" / "system" / "test_model.py")], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in proc.stdout:  # the quiet points as they pass; the rest kept for a failure
            if "quiet point" in line:
                print(line.rstrip(), flush=True)
            tail = (tail + [line])[-200:]
        proc.wait()
        print()
        print(report.read_text() if report.exists() else "".join(tail))
        return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
