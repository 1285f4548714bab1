"""A job that asks for speakers on a stack that serves no diarization (`up -w transcribe` without
`--with diarization` starts none: envs.workflow_stages) ends with the coordinator's one line
"no worker serves diarization: ...", against a real nats-server; the same job without --speakers
never requests the stage. The other node's stage is "served" (a $SRV service is registered for
it), so only the diarization node is unserved."""
from __future__ import annotations

import nats.micro

from captionbus.contracts import JobSpec, JobStatus, subjects
from captionbus.coordinator.graph import Workflow
from captionbus.coordinator.service import Coordinator
from tests.integration.test_coordinator import INPUT, POLICY, Bus, on_bus, publish_event

GRAPH = Workflow.from_dict({
    "name": "speakers",
    "nodes": {
        "first": {"stage": "noop", "inputs": {"media": "job.input"}, "outputs": ["media"]},
        "diarization": {"when": "options.diarization.speakers", "inputs": {"audio": "job.input", "regions": "job.input"},
                        "outputs": ["turns"]},
    },
    "outputs": {"media": "first.media", "turns": "diarization.turns"},
})


async def submit_speakers_job(js, job_id: str, options: dict) -> None:
    from captionbus.contracts import JobSubmitted

    event = JobSubmitted(job_id=job_id, spec=JobSpec(job_id=job_id, workflow="speakers", input=INPUT, options=options))
    await publish_event(js, event, event.event_id)


def test_speakers_without_a_diarization_worker_end_with_one_line(nats_server):
    async def scenario(bus: Bus):
        async with Coordinator(bus.nc, graphs={"speakers": GRAPH}, policy=POLICY, tick_interval_s=0.2, unserved_s=1.0):
            noop = await nats.micro.add_service(bus.nc, name=subjects.micro_service_name("noop"), version="0.0.0")
            try:
                await submit_speakers_job(bus.js, "job-plain", {})
                await submit_speakers_job(bus.js, "job-speakers", {"diarization": {"speakers": "auto"}})
                state = await bus.finished("job-speakers")
                plain = await bus.state_when("job-plain", lambda s: True)
            finally:
                await noop.stop()
        assert state.status == JobStatus.failed
        assert state.error.startswith("stage diarization (diarization) failed: no worker serves diarization: "
                                      "none has answered for"), state.error
        assert "captionbus serve diarization" in state.error and "\n" not in state.error
        assert state.nodes["diarization"].failure_class == "unserved"
        assert plain.status == JobStatus.running and plain.nodes["diarization"].status.value == "skipped"

    on_bus(nats_server, scenario)
