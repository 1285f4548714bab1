"""The coordinator applies an event only on the subject its body's job and kind give: the bus
authorises a publisher by subject alone (a tenant may publish on its own jobs' subjects)."""
from __future__ import annotations

from captionbus.contracts import ArtifactRef, JobCancelRequested, JobRetryRequested, JobSpec, JobSubmitted, subjects
from captionbus.coordinator.service import misfiled_event


def spec(job_id: str) -> JobSpec:
    return JobSpec(job_id=job_id, workflow="transcribe", input=ArtifactRef(key="0" * 64, name="in.wav", size=1))


def test_an_event_on_its_own_subject_is_applied():
    for event in (JobRetryRequested(job_id="acme_j1"), JobCancelRequested(job_id="j2"),
                  JobSubmitted(job_id="acme_j3", spec=spec("acme_j3"))):
        assert misfiled_event(subjects.job_event(event.job_id, event.kind), event) is None


def test_a_body_about_another_job_or_kind_than_its_subject_is_refused():
    victim = JobRetryRequested(job_id="acme_j1")
    for subject in (subjects.job_event("rival_j9", "retry_requested"),  # the rival's own job's subject
                    subjects.job_event("acme_j1", "cancel_requested"),  # another kind
                    "captionbus.job.acme_j1.retry_requested",  # the layout of no tenant
                    subjects.legacy_job_event("acme_j1", "retry_requested"),  # the layout before job ownership
                    # another partition's (it would reach a coordinator that does not own the job)
                    f"captionbus.job.acme.{(subjects.job_partition('acme_j1') + 1) % subjects.PARTITIONS}.acme_j1.retry_requested"):
        reason = misfiled_event(subject, victim)
        assert reason and "acme_j1" in reason and subject in reason


def test_a_submit_must_carry_the_spec_of_the_job_it_submits():
    planted = JobSubmitted(job_id="rival_j1", spec=spec("acme_j1"))
    reason = misfiled_event(subjects.job_event("rival_j1", "submitted"), planted)
    assert reason and "acme_j1" in reason


def test_an_event_of_the_layout_before_job_ownership_is_applied_from_that_layouts_consumer_only():
    event = JobRetryRequested(job_id="acme_j1")
    old = subjects.legacy_job_event("acme_j1", "retry_requested")
    assert misfiled_event(old, event, legacy=True) is None
    assert misfiled_event(old, event) and misfiled_event(subjects.job_event("acme_j1", "retry_requested"), event, legacy=True)
