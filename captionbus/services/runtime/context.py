"""The StageContext a handler gets: it runs in a worker thread and reaches the event loop
(artifact fetches, events) through run_coroutine_threadsafe."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

from pydantic import BaseModel, ValidationError

from captionbus.contracts import ArtifactRef, StageProgress, StageRequest, StageWarning
from captionbus.contracts.ids import validate_token
from captionbus.contracts.speech import TurnSummary
from captionbus.contracts.stage_declaration import explain
from captionbus.services.runtime.errors import BadInput, Cancelled

M = TypeVar("M", bound=BaseModel)
N = TypeVar("N", bound=BaseModel)

# At most this many progress events per second per request (dashboards need no more).
PROGRESS_INTERVAL_S = 0.25
# The fields a stage event shares with the request it answers.
EVENT_ID_FIELDS = ("job_id", "stage", "node", "attempt")


def event_ids(request: StageRequest) -> dict[str, Any]:
    """The ids of a stage event about `request` (progress, warning, completed, failed)."""
    return {field: getattr(request, field) for field in EVENT_ID_FIELDS}


def result_ids(request: StageRequest) -> dict[str, Any]:
    """The ids of a result (completed / failed) about `request`: event_ids plus the request's
    token, which proves to the coordinator that this worker was handed the request. Only
    results carry it: progress events go out while the attempt is still open."""
    return {**event_ids(request), "token": request.token}


def parse_input(path: Path, model: type[M], name: str) -> M:
    """The JSON file `path` (the request's input `name`) as `model`, or BadInput with one line:
    which input, which model, and the first problems (`segments.0.start='x': Input should be a
    valid number`; an unreadable document says so)."""
    try:
        return model.model_validate_json(path.read_bytes())
    except ValidationError as error:
        raise BadInput(f"input {name!r} is not valid {model.__name__} JSON: {explain(error, 'field')}") from None


_SPACE = re.compile(rb"[ \t\n\r]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NESTED = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_SCALAR = re.compile(rb"[^ \t\n\r,:\[\]{}\"]+")


def _value_end(data: bytes, at: int) -> int:
    """Where the JSON value starting at `at` ends: strings skipped, brackets counted. Not a
    parser: every value is parsed by pydantic afterwards (a malformed one fails there)."""
    first = data[at:at + 1]
    if first == b'"':
        found = _STRING.match(data, at)
        if found:
            return found.end()
    elif first in (b"[", b"{"):
        depth = 0
        for token in _NESTED.finditer(data, at):
            if token.group() in (b"[", b"{"):
                depth += 1
            elif token.group() in (b"]", b"}"):
                depth -= 1
                if not depth:
                    return token.end()
    else:
        found = _SCALAR.match(data, at)
        if found:
            return found.end()
    raise ValueError(f"no JSON value at {at}")


def list_spans(data: bytes, field: str) -> tuple[int, int, list[tuple[int, int]]] | None:
    """Where, in the JSON document `data`, the top-level object's array `field` starts and ends,
    and each of its items: (start, end, [(start, end), ...]). None when the document is not one
    object holding `field` once, as an array (then it is parsed whole, as before). The commas,
    colons and brackets around the items are checked here; everything else by pydantic."""
    found: int | None = None
    items: list[tuple[int, int]] = []

    def after(at: int, char: bytes) -> int:
        """Past `char` at `at` and the whitespace after it."""
        if data[at:at + 1] != char:
            raise ValueError(f"no {char!r} at {at}")
        return _SPACE.match(data, at + 1).end()

    def members(at: int, close: bytes, member) -> int:
        """`member(at) -> end` for each member of the object or array whose first member (or
        closing `close`) is at `at`; the index past `close`."""
        if data[at:at + 1] == close:
            return at + 1
        while True:
            at = _SPACE.match(data, member(at)).end()
            if data[at:at + 1] == close:
                return at + 1
            at = after(at, b",")

    def item(at: int) -> int:
        items.append((at, _value_end(data, at)))
        return items[-1][1]

    def pair(at: int) -> int:
        nonlocal found
        if data[at:at + 1] != b'"':
            raise ValueError(f"no key at {at}")
        end = _value_end(data, at)
        key = json.loads(data[at:end])
        at = after(_SPACE.match(data, end).end(), b":")
        if key != field:
            return _value_end(data, at)
        if found is not None or data[at:at + 1] != b"[":
            raise ValueError(f"{field} twice, or not an array")  # pydantic's answer, from the whole
        found = at
        return members(_SPACE.match(data, at + 1).end(), b"]", item)

    try:
        at = members(after(_SPACE.match(data, 0).end(), b"{"), b"}", pair)
        if found is None or _SPACE.match(data, at).end() != len(data):
            return None
    except (ValueError, UnicodeDecodeError):
        return None
    end = items[-1][1] if items else found + 1
    return found, data.index(b"]", end) + 1, items


class TypedInputs:
    """`ctx.input(name, Model)` / `ctx.input_list(name, Model)` over a context's input_path /
    input_paths: the one way a stage reads a JSON input (shared by the runtime's context and the
    test context in captionbus/services/runtime/testing.py)."""

    def input_path(self, name: str) -> Path:
        raise NotImplementedError

    def input_paths(self, name: str) -> list[Path]:
        raise NotImplementedError

    def input(self, name: str, model: type[M]) -> M:
        return parse_input(self.input_path(name), model, name)

    def input_list(self, name: str, model: type[M]) -> list[M]:
        return list(self.input_items(name, model))

    def input_parts(self, name: str, model: type[M], field: str, item: type[N]) -> tuple[M, Callable[[], Iterator[N]]]:
        """The JSON input `name` as `model` with its list `field` empty, and a function that
        iterates that list's items, each read from the file and parsed (as `item`) when the loop
        asks for it: a stage that handles them in turn holds one item, not every item parsed
        (subtitle_gen on a film's transcript: pydantic models of its words are ~8x its JSON).
        The document is read whole once, to find the items (list_spans), and let go.

        Parsed by pydantic's own JSON parser, the document without the list and each item on
        its own, after one pass that checks every item: a document that fails anywhere is
        parsed whole and fails as `ctx.input(name, model)` does, with its message; one that is
        not a plain object holding `field` once is parsed whole and handed out from memory."""
        path = self.input_path(name)
        data = path.read_bytes()
        spans = list_spans(data, field)
        if spans is None:
            whole = self.input(name, model)
            return whole.model_copy(update={field: []}), lambda: iter(getattr(whole, field))
        start, end, items = spans
        head = data[:start] + b"[]" + data[end:]
        del data  # from here on each item is read from the file when it is wanted

        def parsed() -> Iterator[N]:
            with open(path, "rb") as f:
                for a, b in items:
                    f.seek(a)
                    yield item.model_validate_json(f.read(b - a))

        try:
            whole_head = model.model_validate_json(head)
            for _ in parsed():
                pass
        except ValidationError:
            self.input(name, model)  # raises BadInput naming what is wrong, as it always has
            raise  # pydantic accepted the whole: not expected, but never an empty answer
        return whole_head, parsed

    def input_items(self, name: str, model: type[M]) -> Iterator[M]:
        """input_list one item at a time, each parsed when the loop asks for it: a stage that
        handles the items in turn holds one parsed item, not the whole list (transcript_join on a
        film's chunk transcripts). Errors name the item as input_list's do."""
        for i, path in enumerate(self.input_paths(name)):
            yield parse_input(path, model, f"{name}[{i}]")


class RequestContext(TypedInputs):
    def __init__(
        self,
        request: StageRequest,
        *,
        params: Any = None,
        work_dir: Path,
        resources: Any,
        log: Any,
        delivery: int,
        loop: asyncio.AbstractEventLoop,
        fetch: Callable[[ArtifactRef, Path], Awaitable[Path]],
        emit: Callable[[Any], Awaitable[None]],
        cancelled: threading.Event | None = None,
    ):
        self.request = request
        self.params = params  # request.params parsed with the stage's model
        self.work_dir = work_dir
        self.resources = resources
        self.log = log
        self.metrics: dict[str, float] = {}
        self.items: dict[str, int] = {}  # list output -> its item count (StageCompleted.items)
        # who speaks when, bounded, for the node's record in the job state (StageCompleted.speaker_turns:
        # the diarization stage sets it, so the read-only dashboard draws its lane without the artifact)
        self.speaker_turns: TurnSummary | None = None
        self.delivery = delivery  # 1 on the first try of this request, 2 on a redelivery ...
        self._loop = loop
        self._fetch = fetch
        self._emit = emit
        self._fetched: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._last_progress = 0.0
        self.cancelled = cancelled or threading.Event()  # set by the worker when the job ends
        self.warnings: list[str] = []  # kept with a cached result and published again on a hit
        self.cache_blockers: list[str] = []  # why this result must not be cached (skip_cache)

    # -- inputs -------------------------------------------------------------------------------
    def input_path(self, name: str) -> Path:
        ref = self.request.inputs.get(name)
        if ref is None:
            raise BadInput(f"stage {self.request.stage} needs input {name!r}; the request has {sorted(self.request.inputs)}")
        return self._get(name, ref)

    def input_paths(self, name: str) -> list[Path]:
        refs = self.request.input_lists.get(name)
        if refs is None:
            raise BadInput(f"stage {self.request.stage} needs input list {name!r}; the request has {sorted(self.request.input_lists)}")
        return [self._get(f"{name}-{i}", ref) for i, ref in enumerate(refs)]

    def artifact(self, slot: str, ref: ArtifactRef) -> Path:
        """A local file with the bytes of an artifact the params name (a known speaker's clip),
        fetched as inputs are; `slot` names its folder (a token, distinct from the inputs')."""
        return self._get(f"param-{slot}", ref)

    def _get(self, slot: str, ref: ArtifactRef) -> Path:
        with self._lock:
            if slot in self._fetched:
                return self._fetched[slot]
        validate_token(slot, "input name")  # it becomes a directory name
        # One directory per input: two inputs may carry the same file name.
        dest = self.work_dir / "in" / slot
        dest.mkdir(parents=True, exist_ok=True)
        if _running_loop() is self._loop:
            raise RuntimeError("StageContext input methods block; call them from the handler thread")
        path = asyncio.run_coroutine_threadsafe(self._fetch(ref, dest), self._loop).result()
        with self._lock:
            self._fetched[slot] = path
        return path

    # -- events -------------------------------------------------------------------------------
    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled(f"job {self.request.job_id} ended while {self.request.stage} ran")

    def progress(self, fraction: float, message: str = "") -> None:
        self.check_cancelled()
        fraction = min(1.0, max(0.0, float(fraction)))
        now = time.monotonic()
        with self._lock:
            if fraction < 1.0 and now - self._last_progress < PROGRESS_INTERVAL_S:
                return
            self._last_progress = now
        self._post(StageProgress(**event_ids(self.request), fraction=fraction, message=message[:200]))

    def warn(self, message: str) -> None:
        self.log.warning("stage warning", message=message)
        self.warnings.append(message)
        self._post(StageWarning(**event_ids(self.request), message=message))

    def skip_cache(self, reason: str) -> None:
        self.log.info("result will not be cached", reason=reason)
        self.cache_blockers.append(reason)

    def _post(self, event: Any) -> None:
        # Fire and forget: a slow bus must not stall the handler.
        future = asyncio.run_coroutine_threadsafe(self._emit(event), self._loop)
        future.add_done_callback(self._log_failure)

    def _log_failure(self, future) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.log.warning("event publish failed", error=str(future.exception()))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
