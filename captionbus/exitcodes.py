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

TABLE: tuple[tuple[int, str], ...] = (
    (OK, "done: the job completed, the check passed, the command did what it said"),
    (JOB_FAILED, "the job failed or was cancelled, a check found problems, a job is in a failed state, "
                 "or an internal error"),
    (USAGE, "refused before anything started: a bad argument, option, file, workflow, language, "
            "stage or job id, or environments not built"),
    (PARTIAL, "the job completed without some target languages (each is named with its reason)"),
    (BUS, "cannot reach the NATS server, or not authorised on it"),
    (INTERRUPTED, "interrupted (Ctrl-C or SIGTERM); what was started is stopped"),
)


def markdown_table() -> str:
    rows = ["| exit | meaning |", "|---|---|"]
    rows += [f"| {code} | {meaning} |" for code, meaning in TABLE]
    return "\n".join(rows)
