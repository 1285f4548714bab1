import pytest
from pydantic import ValidationError

from captionbus.contracts import (
    ArtifactRef,
    JobSpec,
    StageCompleted,
    StageRequest,
    parse_event,
    subjects,
    validate_token,
)
from captionbus.contracts.schema_export import stale_files

REF = ArtifactRef(key="a" * 64, name="clip.mp4", size=3)


def test_json_schema_is_not_stale():
    assert stale_files() == [], "run: python -m captionbus.contracts.schema_export"


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "../x", "a/b", "", "x" * 65, "a b", "j\n"])
def test_tokens_reject_what_could_escape_a_subject_or_directory(bad):
    with pytest.raises(ValueError):
        validate_token(bad)
    with pytest.raises(ValueError):
        subjects.job_event(bad, "submitted")


def test_job_id_is_validated_in_models():
    with pytest.raises(ValidationError):
        JobSpec(job_id="x.>", input=REF)


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b.mp4", ""])
def test_artifact_names_are_never_paths(name):
    with pytest.raises(ValidationError):
        ArtifactRef(key="a" * 64, name=name, size=1)


def test_events_round_trip_through_the_discriminated_union():
    event = StageCompleted(job_id="j1", stage="asr", node="asr", attempt=2, outputs={"transcript": REF})
    parsed = parse_event(event.model_dump_json())
    assert isinstance(parsed, StageCompleted)
    assert parsed.outputs["transcript"] == REF
    assert parsed.schema_version == "1"


def test_request_key_names_the_try():
    req = StageRequest(job_id="j1", stage="asr", node="asr", attempt=3)
    assert req.key == "j1.asr.3"
    assert subjects.stage_request("asr") == "captionbus.req.asr"


def test_job_languages_are_normalised_where_the_spec_is_made():
    from captionbus.contracts import ArtifactRef, JobSpec

    spec = JobSpec(job_id="j1", input=ArtifactRef(key="0" * 64, name="a.mp4", size=1),
                   source_language=" HI", target_languages=["EN", "en", " Ta "])
    assert spec.source_language == "hi" and spec.target_languages == ["en", "ta"]


def test_a_jobs_history_ends_at_its_terminal_event_until_a_retry():
    """contracts.History: a stage event stored after a terminal event (a worker that had not
    seen the cancel) is not shown; job-level events are; a retry the coordinator accepted (its
    `started`) reopens the history, a `retry_requested` alone does not (a tenant may publish one
    the coordinator refuses; the old attempt's events before the restart stay hidden); another
    job's events are not affected."""
    from captionbus.contracts.events import HISTORY_KINDS, STAGE_KINDS, History

    assert STAGE_KINDS == {"stage_requested", "stage_progress", "stage_completed", "stage_failed", "stage_warning"}
    assert HISTORY_KINDS == {"completed", "failed", "cancelled", "started"}
    history = History()
    stored = [("j1", "stage_progress"), ("j1", "cancelled"), ("j1", "stage_progress"), ("j2", "stage_progress"),
              ("j1", "stage_completed"), ("j1", "cancel_requested"), ("j1", "retry_requested"),
              ("j1", "stage_progress"), ("j1", "started"), ("j1", "stage_requested"), ("j1", "failed"),
              ("j1", "stage_warning")]
    shown = [history.shown(job, kind) for job, kind in stored]
    assert shown == [True, True, False, True, False, True, True, False, True, True, True, False]


def test_a_reader_resumed_mid_history_asks_what_came_before_only_when_a_stage_event_needs_it(monkeypatch):
    """client._Resumed: read from the middle (Last-Event-ID, a webhook cursor), a terminal event
    or the coordinator's `started` says by itself whether the job is ended, so nothing earlier is
    read; a stage event read first makes it read the kinds before it (here: the job was cancelled
    there, so the late progress is not shown, nor the one after a `retry_requested` the
    coordinator has not (yet) accepted, until its `started`)."""
    import asyncio

    from captionbus import client
    from captionbus.contracts.events import History

    asked: list[int] = []

    async def before(js, job_id, msg):
        asked.append(msg)
        history = History()
        history.shown(job_id, "cancelled")
        return history

    monkeypatch.setattr(client, "_history_before", before)

    async def read(kinds: list[str]) -> list[bool]:
        resumed = client._Resumed(None, "j1", from_start=False)
        return [await resumed.shown(seq, kind) for seq, kind in enumerate(kinds, start=10)]

    assert asyncio.run(read(["retry_requested", "started", "stage_requested", "stage_progress"])) == [True] * 4
    assert asyncio.run(read(["cancelled", "stage_progress"])) == [True, False]
    assert asked == []
    assert asyncio.run(read(["cancel_requested", "stage_progress", "retry_requested", "stage_progress", "started",
                             "stage_requested"])) == [True, False, True, False, True, True]
    assert asked == [11]
    assert asyncio.run(read(["retry_requested", "stage_progress"])) == [True, False]
    assert asked == [11, 11]
