"""The gateway's answers and forms as pydantic models: `response_model=` of the routes (so the
OpenAPI document at /docs shows them) and the multipart forms' schemas (`form_body`)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from captionbus.gateway import shown
from captionbus.gateway.openai_format import RESPONSE_FORMATS
from captionbus.contracts import JobState


class JobNode(BaseModel):
    stage: str
    status: str
    attempt: int
    progress: float | None = None
    error: str | None = None
    env: str | None = None


class JobOutput(BaseModel):
    name: str
    size: int | None = None
    media_type: str | None = None
    url: str = Field(description="GET it (with the same key) for the bytes")


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    workflow: str
    status: Literal["pending", "running", "completed", "failed", "cancelled"]
    input: str
    source_language: str | None
    target_languages: list[str]
    options: dict[str, Any]
    owner: str | None = Field(None, description="the API key (name) that submitted it")
    created_at: str
    updated_at: str
    error: str | None
    failed_branches: Any = None
    nodes: dict[str, JobNode]
    outputs: dict[str, JobOutput]

    @classmethod
    def of(cls, state: JobState) -> Job:
        job_id = state.job_id
        return cls(
            id=job_id, workflow=state.spec.workflow, status=state.status.value, input=state.spec.input.name,
            source_language=state.spec.source_language, target_languages=state.spec.target_languages,
            options=state.spec.options, owner=state.spec.owner, created_at=state.created_at.isoformat(),
            updated_at=state.updated_at.isoformat(), error=shown.line(state.error),  # paths cut: gateway.shown
            failed_branches=shown.branches(state.failed_branches),
            nodes={node_id: JobNode(stage=n.stage, status=n.status.value, attempt=n.attempt, progress=n.progress,
                                    error=shown.line(n.error), env=n.worker.get("env"))
                   for node_id, n in state.nodes.items()},
            outputs={name: JobOutput(name=ref.name, size=ref.size, media_type=ref.media_type,
                                     url=f"/v1/jobs/{job_id}/outputs/{name}")
                     for name, ref in state.outputs.items()},
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]


class JobCreated(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["pending"] = "pending"
    url: str


class Requested(BaseModel):
    id: str
    object: Literal["job"] = "job"
    requested: Literal["cancel", "retry"]


class Model(BaseModel):
    id: str = Field(description="send it back as `model`")
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "captionbus"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class Transcription(BaseModel):
    text: str


class VerboseSegment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int] | None = Field(description="the decoder's token ids for this segment; null where the asr "
                                               "backend reported none")
    temperature: float
    avg_logprob: float | None = Field(description="faster-whisper's average log probability of the decoded chunk; "
                                                  "null where not reported (never a made-up 0.0)")
    compression_ratio: float | None = Field(description="faster-whisper's gzip ratio of the chunk's text; null where "
                                                        "not reported")
    no_speech_prob: float | None = Field(description="the decoder's no-speech probability for the chunk; null where "
                                                     "not reported (0.0 would claim certain speech)")


class VerboseWord(BaseModel):
    word: str
    start: float
    end: float


class VerboseTranscription(BaseModel):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[VerboseSegment] | None = None
    words: list[VerboseWord] | None = None


class DiarizedSegment(BaseModel):
    type: Literal["transcript.text.segment"] = "transcript.text.segment"
    id: str
    start: float
    end: float
    speaker: str = Field(description="A, B, ... in order of first appearance")
    text: str


class DiarizedTranscription(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    duration: float
    text: str
    segments: list[DiarizedSegment]
    usage: dict[str, Any] | None = None


class WebhookRecord(BaseModel):
    subscriber: str
    url: str
    events: list[str] | None
    cursor: int
    done: bool
    deliveries: list[dict[str, Any]]
    older_deliveries_not_kept: int


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookRecord]


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]] = Field(description="each delivery with its subscriber, event kind, sequence, "
                                                   "status (delivered, failed, pending), attempts, HTTP status, error")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


# ---- forms (documented; parsed by forms.read_form as they stream in) --------------------------------

class KnownSpeakers(BaseModel):
    """OpenAI's known speakers (gateway.state.known_speakers): on POST /v1/jobs (up to 20, switching
    on speakers=auto) and, with gpt-4o-transcribe-diarize, on /v1/audio/transcriptions (up to 4)."""

    known_speaker_names: list[str] | None = Field(
        None, alias="known_speaker_names[]", description="names, one word each, paired in order with "
                                                         "known_speaker_references[]")
    known_speaker_references: list[str] | None = Field(
        None, alias="known_speaker_references[]", description="data URLs of 2-10 s of each known speaker's voice "
                                                              "(any audio format `file` takes); a speaker who "
                                                              "matches one is labelled with its name")


class JobForm(KnownSpeakers):
    file: bytes | None = Field(None, json_schema_extra={"format": "binary", "type": "string"})
    path: str | None = Field(None, description="a file under the gateway's --inputs dir (instead of `file`)")
    workflow: str = "transcribe"
    source_language: str | None = None
    target_languages: str | None = Field(None, description="comma-separated")
    options: str | None = Field(None, description='JSON: the -o options, e.g. {"asr": {"model": "base"}}')
    speakers: str | None = Field(None, description="label who speaks: auto, N or MIN-MAX (captionbus run --speakers; "
                                                   "the same as options {\"diarization\": {\"speakers\": ...}})")
    callback_url: str | None = Field(None, description="POST signed job events here (allow-listed)")


class AudioForm(BaseModel):
    """/v1/audio/translations: OpenAI's audio fields (no known speakers: Whisper's translate task
    labels no one)."""

    file: bytes = Field(json_schema_extra={"format": "binary", "type": "string"})
    model: str = Field("whisper-1", description="whisper-1 (whatever the asr workers serve) or an id of GET /v1/models")
    language: str | None = Field(None, description="ISO 639-1 code of the speech")
    prompt: str | None = Field(None, description="accepted, not used")
    response_format: Literal[RESPONSE_FORMATS] = "json"  # type: ignore[valid-type]
    timestamp_granularities: list[Literal["word", "segment"]] | None = Field(
        None, alias="timestamp_granularities[]", description="verbose_json only")
    temperature: float = Field(0.0, description="accepted, echoed in verbose_json")


class TranscriptionForm(AudioForm, KnownSpeakers):
    """/v1/audio/transcriptions: the audio fields and, with gpt-4o-transcribe-diarize, known speakers."""


def form_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` declaring `model` as the multipart request body."""
    schema = model.model_json_schema(by_alias=True)
    for prop in schema.get("properties", {}).values():  # bytes: an upload, not base64 text
        for option in [prop, *prop.get("anyOf", [])]:
            if option.get("format") in ("base64url", "binary"):
                option.update(type="string", format="binary")
                option.pop("contentEncoding", None)
                option.pop("contentMediaType", None)
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
