"""`run` prints and records the spoken language from the asr node's transcript: detected (with
Whisper's probability) unless -s gave it."""
from __future__ import annotations

import asyncio
from pathlib import Path

from captionbus.runner import spoken_language
from captionbus.contracts import JobSpec, JobState
from captionbus.contracts.jobs import NodeState
from captionbus.contracts.transcript import Transcript
from captionbus.core.artifacts import ArtifactStore
from captionbus.core.settings import Settings


def test_the_asr_transcript_gives_the_language(tmp_path: Path):
    store = ArtifactStore(Settings(home=tmp_path / "home"), None, use_object_store=False)
    transcript = tmp_path / "t.json"
    transcript.write_text(Transcript(language="hi", language_probability=0.87).model_dump_json())

    async def go():
        ref = await store.put(transcript, name="transcript.json")
        media = await store.put(transcript, name="input.mp4")
        spec = JobSpec(job_id="j1", workflow="transcribe", input=media)
        state = JobState(spec=spec, nodes={"demux": NodeState(stage="demux"),
                                           "asr": NodeState(stage="asr", outputs={"transcript": ref})})
        return (await spoken_language(store, state, None), await spoken_language(store, state, "hi"),
                await spoken_language(store, JobState(spec=spec), None))

    detected, given, none = asyncio.run(go())
    assert detected == {"code": "hi", "detected": True, "probability": 0.87}
    assert given == {"code": "hi", "detected": False, "probability": 0.87}
    assert none is None


def test_a_chunked_job_reports_the_language_detected_once_with_its_probability(tmp_path: Path):
    """The chunks decode with the given language (no probability of their own); the `language`
    node's output has the detection's."""
    from captionbus.contracts.speech import SpokenLanguage

    store = ArtifactStore(Settings(home=tmp_path / "home"), None, use_object_store=False)
    chunk, detected = tmp_path / "t.json", tmp_path / "l.json"
    chunk.write_text(Transcript(language="hi", language_probability=None).model_dump_json())
    detected.write_text(SpokenLanguage(language="hi", probability=0.91).model_dump_json())

    async def go():
        media = await store.put(chunk, name="input.mp4")
        state = JobState(spec=JobSpec(job_id="j1", workflow="transcribe", input=media), nodes={
            "asr-0": NodeState(stage="asr", outputs={"transcript": await store.put(chunk, name="transcript.json")}),
            "language": NodeState(stage="asr", outputs={"language": await store.put(detected, name="language.json")})})
        return await spoken_language(store, state, None)

    assert asyncio.run(go()) == {"code": "hi", "detected": True, "probability": 0.91}
