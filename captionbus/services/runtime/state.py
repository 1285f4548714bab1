"""What a stage worker is doing now (contracts.WorkerState), answered in its $SRV STATS reply.

Why STATS and not a heartbeat subject or a KV bucket: $SRV is already how workers are found
(`captionbus workers`, the dashboard, the coordinator's "is this stage served?"), every role that
may list workers may already ask it, and a reply is computed when asked, so nothing is published
while nobody looks. A worker that stops answering is gone: readers take the age of its last reply
as its heartbeat age. Updated from the event loop only (the micro service answers there too).
"""
from __future__ import annotations

from captionbus.contracts import CurrentRequest, StageRequest, WorkerState
from captionbus.contracts.jobs import utcnow


class WorkerStatus:
    def __init__(self, loading: bool, model: str | None = None):
        self.loading = loading
        self.model = model
        self.setup_error: str | None = None
        self.current: dict[str, CurrentRequest] = {}  # request key -> what it is
        self.jobs_done = 0
        self.jobs_failed = 0
        self.last_error: str | None = None
        self._state = self._name()
        self._since = utcnow()

    def _name(self) -> str:
        if self.setup_error is not None:
            return "setup_failed"
        if self.loading:
            return "loading"
        return "busy" if self.current else "idle"

    def _changed(self) -> None:
        name = self._name()
        if name != self._state:
            self._state, self._since = name, utcnow()

    def set_up(self, model: str | None, error: str | None) -> None:
        self.loading = False
        self.model, self.setup_error = model, error
        self._changed()

    def started(self, request: StageRequest) -> None:
        self.current[request.key] = CurrentRequest(job_id=request.job_id, node=request.node, attempt=request.attempt)
        self._changed()

    def finished(self, request: StageRequest) -> None:
        self.current.pop(request.key, None)
        self._changed()

    def done(self) -> None:
        self.jobs_done += 1

    def failed(self, reason: str) -> None:
        self.jobs_failed += 1
        self.last_error = reason

    def snapshot(self) -> WorkerState:
        return WorkerState(state=self._state, since=self._since, current=list(self.current.values()),
                           jobs_done=self.jobs_done, jobs_failed=self.jobs_failed, last_error=self.last_error,
                           model=self.model, setup_error=self.setup_error)
