"""The exit codes of every `captionbus` command: one table, one meaning per number.

Scripts branch on these, so a number never means two things: 2 is only "you asked for something
that cannot work" (fix the command line or the set-up and rerun), never a failure found while a
job ran. README's "Exit codes" section is generated from `TABLE` (tests/unit/test_exitcodes.py
fails when the two differ).
"""
from __future__ import annotations

OK = 0
JOB_FAILED = 1
USAGE = 2
PARTIAL = 3
BUS = 4
INTERRUPTED = 130
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left

TABLE: tuple[tuple[int, str], ...] = (
    (OK, "done: the job completed, the check passed, the command did what it said"),
    (JOB_FAILED, "the job failed or was cancelled, a check found problems, a job is in a failed state, "
                 "or an internal error"),
    (USAGE, "refused before anything started: a bad argument, option, file, workflow, language, "
            "stage or job id, or environments not built"),
    (PARTIAL, "the job completed without some target languages (each is named with its reason)"),
    (BUS, "cannot reach the NATS server, not authorised on it, or it did not answer a read within the "
          "failover window (about 20 s); the server's reason is printed, never an empty answer"),
    (INTERRUPTED, "interrupted by Ctrl-C, or a job command (`run`, `submit --wait`, `events --follow`) by "
                  "SIGTERM; what was started is stopped, except the job `submit --wait` follows: it goes on, and "
                  "its id and the commands to follow or fetch it are printed. A service (`up`, `coordinator`, "
                  "`serve`, `dashboard`, `gateway`) stopped by SIGTERM, as systemd stops it, exits 0"),
    (BROKEN_PIPE, "the reader of the output went away (`captionbus jobs --json` piped into `head`); nothing "
                  "more is printed"),
)


def markdown_table() -> str:
    rows = ["| exit | meaning |", "|---|---|"]
    rows += [f"| {code} | {meaning} |" for code, meaning in TABLE]
    return "\n".join(rows)
