"""OpenAI-compatible endpoints: `/v1/audio/transcriptions`, `/v1/audio/translations`, `/v1/models`.

Each audio request runs the `speech` workflow and answers when the job ends. Everything that can
be refused is refused before a job exists: the form (400/413), the file (400 when missing or
empty), the options, and the model, which must be `whisper-1` (whatever the asr workers serve)
or a name `/v1/models` lists (a model no live asr worker serves is a 400 naming those that are).
"""
from __future__ import annotations

from pathlib import Path

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse

from captionbus.gateway.deps import CallerDep, FormDep, GatewayDep, JetStream, SpeakersFormDep
from captionbus.gateway.forms import Form
from captionbus.gateway.keys import Caller
from captionbus.gateway.openai_format import RESPONSE_FORMATS, as_diarized_json, as_json, as_verbose_json
from captionbus.gateway.schemas import (
    AudioForm,
    TranscriptionForm,
    DiarizedTranscription,
    Model,
    ModelList,
    Transcription,
    VerboseTranscription,
    form_body,
)
from captionbus.gateway.state import Gateway, Timing
from captionbus.web.errors import ApiError, documented
from captionbus.contracts.ids import new_job_id
from captionbus.contracts.languages import check_language
from captionbus.contracts.transcript import Transcript

router = APIRouter(prefix="/v1", tags=["openai"], responses=documented(401, 429, 503))

ALIAS = "whisper-1"
# OpenAI's diarizing model id, so a client written for it works unchanged: whatever the asr workers
# serve, plus the diarization stage (listed while a diarization worker is up).
DIARIZE = "gpt-4o-transcribe-diarize"
OPENAI_MAX_REFERENCES = 4  # known_speaker_names[]: "Up to 4 speakers are supported" (OpenAI's API reference)


async def started() -> Timing:
    """The request's Timing, started on the event loop (an `async def` dependency: the class
    itself as the dependency ran its __init__ in FastAPI's thread pool, as gateway/deps.py says)."""
    return Timing()


Started = Annotated[Timing, Depends(started)]  # first parameter: its clock starts before the form is read
AUDIO_ANSWERS = {
    **documented(400, 413, 422, 504),
    200: {"description": "json / verbose_json as below; text, srt and vtt as text/plain",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
}


def audio_options(form: Form) -> tuple[str, set[str], float, str | None]:
    """(response_format, granularities, temperature, language) of the form, or 400."""
    if form.upload is None:
        raise ApiError(400, "file is required (multipart part `file`)")
    if form.upload.size == 0:
        raise ApiError(400, f"the uploaded file {form.upload.filename!r} is empty (0 bytes)")
    response_format = form.one("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format {response_format!r} unknown; use {', '.join(RESPONSE_FORMATS)}")
    granularities = set(form.many("timestamp_granularities[]", "timestamp_granularities"))
    if granularities - {"word", "segment"}:
        raise ApiError(400, "timestamp_granularities[] takes word and/or segment")
    try:
        temperature = float(form.one("temperature") or 0.0)
    except ValueError:
        raise ApiError(400, "temperature must be a number") from None
    language = form.one("language") or None
    if language:
        try:
            language = check_language(language)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
    return response_format, granularities, temperature, language


async def asr_options(gw: Gateway, model: str, task: str) -> dict:
    """The job's options for `model` (400 for a model no live asr worker serves)."""
    options: dict = {}
    if model == DIARIZE:
        if task != "transcribe":
            raise ApiError(400, f"model {DIARIZE} transcribes; it does not translate", "invalid_request_error")
        if not await gw.serves("diarization"):
            raise ApiError(400, f"model {DIARIZE} needs a diarization worker and none is up "
                                "(captionbus serve diarization)", "invalid_request_error")
        options["diarization"] = {"speakers": "auto"}
    elif model != ALIAS:
        served = await gw.served_models()
        if model not in served:
            have = ", ".join([ALIAS, *served]) if served else f"none now (no asr worker is up); {ALIAS} waits for one"
            raise ApiError(400, f"model {model!r} is not served here; use one of GET /v1/models: {have}",
                           "invalid_request_error")
        options["asr"] = {"model": model}
    if task == "translate":  # Whisper's own speech -> English decoding (OpenAI's semantics)
        options.setdefault("asr", {})["task"] = "translate"
    return options


async def openai_audio(gw: Gateway, caller: Caller, js, form: Form, task: str, timing: Timing):
    timing.mark("form")
    response_format, granularities, temperature, language = audio_options(form)
    model = form.one("model") or ALIAS
    if response_format == "diarized_json" and model != DIARIZE:
        raise ApiError(400, f"response_format diarized_json needs model {DIARIZE}", "invalid_request_error")
    if model != DIARIZE and form.many("known_speaker_names[]", "known_speaker_names", "known_speaker_references[]",
                                      "known_speaker_references"):
        raise ApiError(400, f"known_speaker_names[] / known_speaker_references[] need model {DIARIZE}",
                       "invalid_request_error")
    options = await asr_options(gw, model, task)
    job_id = new_job_id()
    with gw.ends.expect(job_id) as ended:
        # Known speakers (OpenAI: up to 4, each a data URL of 2-10 s): a speaker whose voice
        # matches one comes back under that name instead of A, B, ...
        await gw.submit(js, form, caller, workflow="speech", source=language, targets=[], options=options,
                        job_id=job_id, max_references=OPENAI_MAX_REFERENCES)
        form.cleanup()
        timing.mark("submit")
        final = await gw.wait_for_end(js, job_id, ended)
    timing.mark("job")
    if final.kind != "completed":
        reason = getattr(final, "reason", None) or final.kind
        raise ApiError(422, f"job {job_id} {final.kind}: {reason}", headers={"X-Captionbus-Job": job_id})
    if response_format in ("srt", "vtt"):
        path = await gw.output(js, job_id, response_format, final.outputs[response_format])
        text = Path(path).read_text(encoding="utf-8")
        response = PlainTextResponse(text, media_type="text/plain")
    else:
        if "transcript" not in final.outputs:
            raise ApiError(422, f"job {job_id} completed without a transcript")
        path = await gw.output(js, job_id, "transcript", final.outputs["transcript"])
        transcript = Transcript.model_validate_json(Path(path).read_bytes())
        if response_format == "text":
            response = PlainTextResponse(transcript.text + "\n")
        elif response_format == "diarized_json":
            response = JSONResponse(as_diarized_json(transcript))
        elif response_format == "verbose_json":
            response = JSONResponse(as_verbose_json(transcript, task=task, granularities=granularities,
                                                    temperature=temperature))
        else:
            response = JSONResponse(as_json(transcript))
    timing.mark("answer")
    response.headers["Server-Timing"] = timing.header()
    response.headers["X-Captionbus-Job"] = job_id
    return response


@router.post("/audio/transcriptions", response_model=Transcription | VerboseTranscription | DiarizedTranscription,
             openapi_extra=form_body(TranscriptionForm), responses=AUDIO_ANSWERS)
async def transcriptions(timing: Started, gw: GatewayDep, caller: CallerDep, js: JetStream, form: SpeakersFormDep):
    """OpenAI's transcription endpoint: runs the `speech` workflow and answers when it ends."""
    return await openai_audio(gw, caller, js, form, "transcribe", timing)


@router.post("/audio/translations", response_model=Transcription | VerboseTranscription,
             openapi_extra=form_body(AudioForm), responses=AUDIO_ANSWERS)
async def translations(timing: Started, gw: GatewayDep, caller: CallerDep, js: JetStream, form: FormDep):
    """OpenAI's translation endpoint: speech in any language -> English text, by Whisper itself
    (the `speech` workflow with `asr.task=translate`); `language`, optional, names the spoken one."""
    return await openai_audio(gw, caller, js, form, "translate", timing)


@router.get("/models", response_model=ModelList)
async def models(gw: GatewayDep, caller: CallerDep, js: JetStream):
    """The ASR models live asr workers serve (by a name the `model` field takes back), the alias
    whisper-1 (whatever they serve) and, while a diarization worker is up too,
    gpt-4o-transcribe-diarize (whisper-1 with speakers: `diarized_json`); empty while no asr
    worker is up."""
    del caller, js
    served = await gw.served_models()
    ids = [ALIAS, *served] if served else []
    if served and await gw.serves("diarization"):
        ids.append(DIARIZE)
    return ModelList(data=[Model(id=name) for name in ids])


