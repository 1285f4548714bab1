"""`captionbus run`'s job.json (runner.write_job_record): the whole record, with the speaker
summary the coordinator keeps under a key of its own (NodeState.speaker_turns_key) filled in. The
job has completed when it is written, so a summary that cannot be read (its key gone, or holding
what is not a summary) leaves job.json written, the node's summary named by key, and one warning
line that says why, instead of failing a run whose outputs are already on disk. A real
nats-server; the record and its part are written as the coordinator writes them (KV cb_jobs)."""
from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from rich.console import Console

from captionbus.contracts import JobSpec, JobState, JobStatus, NodeState, NodeStatus, subjects
from captionbus.contracts.artifacts import ArtifactRef
from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns, TurnSummary
from captionbus.core.bus import connect, provision
from captionbus.runner import write_job_record

SUMMARY = TurnSummary.of(SpeakerTurns(duration=9, speakers=["Anna"], turns=[SpeakerTurn(start=1, end=4, speaker="Anna")]))
LANGUAGE = {"code": "en", "detected": True, "probability": 0.97}


SUMMARY_BYTES = SUMMARY.model_dump_json().encode()
BROKEN = b'{"duration": -1}'


def record_of(job_id: str, part: bytes) -> JobState:
    key = subjects.job_part_key(job_id, subjects.part_name(part))
    node = NodeState(stage="diarization", status=NodeStatus.completed, speaker_turns_key=key)
    return JobState(spec=JobSpec(job_id=job_id, input=ArtifactRef(key="a" * 64, name="in.wav", size=1)),
                    status=JobStatus.completed, nodes={"diarization": node})


def test_job_json_is_written_with_a_warning_when_the_speaker_summary_cannot_be_read(nats_server: str, tmp_path: Path):
    async def go() -> dict[str, tuple[dict, str]]:
        nc = await connect(nats_server, "test-run-record")
        try:
            js = nc.jetstream()
            await provision(js)
            jobs = await js.key_value(subjects.JOBS_BUCKET)
            out = {}
            for job_id, part, stored in (("jobwhole", SUMMARY_BYTES, True), ("jobgone", SUMMARY_BYTES, False),
                                         ("jobbroken", BROKEN, True)):
                state = record_of(job_id, part)
                await jobs.put(state.job_id, state.model_dump_json().encode())
                if stored:
                    await jobs.put(state.nodes["diarization"].speaker_turns_key, part)
                said = io.StringIO()
                path = await write_job_record(js, state, LANGUAGE, tmp_path / f"{job_id}.job.json",
                                              Console(file=said, width=400, color_system=None))
                out[job_id] = (json.loads(path.read_text()), said.getvalue())
            return out
        finally:
            await nc.close()

    written = asyncio.run(go())
    whole, said = written["jobwhole"]
    assert said == ""
    assert TurnSummary.model_validate(whole["nodes"]["diarization"]["speaker_turns"]) == SUMMARY
    assert whole["language"] == LANGUAGE
    for job_id, part, why in (("jobgone", SUMMARY_BYTES, "RecordPartMissing"), ("jobbroken", BROKEN, "ValidationError")):
        data, said = written[job_id]
        node = data["nodes"]["diarization"]
        assert data["spec"]["job_id"] == job_id and data["status"] == "completed" and data["language"] == LANGUAGE
        assert node["speaker_turns"] is None
        assert node["speaker_turns_key"] == subjects.job_part_key(job_id, subjects.part_name(part))
        lines = said.strip().splitlines()
        assert len(lines) == 1, said
        assert lines[0].startswith(f"warning: {job_id}.job.json names its speaker summary by key; it could not be read (")
        assert why in lines[0], lines[0]
