"""What an API key is shown of a job's error lines: the workers' filesystem paths cut to their
last part (core.text.without_paths). A stage's failure reason names what the worker saw: its
artifact root, its work folder, its model folder (`… is not in this host's artifact root
(/srv/cb/artifacts) …`), that is the operator's host layout and user names, not a key's. The job's
record and events keep the whole line for the operator (`captionbus status`, the dashboard, the
worker's log); the gateway cuts it on the way out: the job and its listing (schemas.Job), its
events (SSE and webhooks: ends.job_events), and the OpenAI endpoints' failure answer
(Gateway.wait_for_end). Jobs of a bus tenant are cut by the worker itself (its reason is
published cut: services/runtime/serve.Service._for_the_job)."""
from __future__ import annotations

from typing import Any, TypeVar

from captionbus.core.text import without_paths

E = TypeVar("E")
# The free-text fields of job events (contracts.events) that carry a worker's words.
TEXT_FIELDS = ("reason", "message", "error")


def line(text: str | None) -> str | None:
    return None if text is None else without_paths(text)[0]


def branches(failed: Any) -> Any:
    """A job's failed_branches ({language: reason}) with each reason cut."""
    return {name: line(why) if isinstance(why, str) else why for name, why in failed.items()} \
        if isinstance(failed, dict) else failed


def event(job_event: E) -> E:
    """`job_event` with its error lines cut (the same event when there is nothing to cut)."""
    update: dict[str, Any] = {name: line(getattr(job_event, name)) for name in TEXT_FIELDS
                              if isinstance(getattr(job_event, name, None), str)}
    if getattr(job_event, "failed_branches", None):
        update["failed_branches"] = branches(job_event.failed_branches)
    changed = {k: v for k, v in update.items() if v != getattr(job_event, k)}
    return job_event.model_copy(update=changed) if changed else job_event
