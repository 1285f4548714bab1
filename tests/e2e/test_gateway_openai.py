"""The gateway on a real stack (nats-server, coordinator, demux/asr/subtitle_gen/mux services in
their own venvs, Whisper base): the official `openai` client and curl transcribe an espeak clip in
every response format; the job API runs a job, streams its events, downloads its mkv, and a
webhook receiver gets the job's events signed and in order."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import jiwer
import openai
import pysubs2
import pytest

from captionbus.gateway.app import GatewayConfig
from captionbus.gateway.keys import KeyRing, add_key
from tests.e2e.test_transcribe import words_of
from tests.gatewaytools import free_port, running_gateway
from tests.integration.test_gateway import parse_sse
from tests.media import ffprobe_json, speech_video, speech_wav

SECRET = b"test-webhook-secret"
ROOT = Path(__file__).resolve().parents[2]


def load_receiver():
    spec = importlib.util.spec_from_file_location("webhook_receiver", ROOT / "examples" / "webhook_receiver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def receiver():
    """The example receiver from examples/, recording what it accepted."""
    received: list[tuple[dict, dict]] = []
    server = load_receiver().make_server(("127.0.0.1", free_port()), SECRET, lambda e, h: received.append((e, h)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/", received
    server.shutdown()


@pytest.fixture(scope="module")
def gateway(stack, receiver, tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway")
    key = add_key(root / "keys", "tool")
    config = GatewayConfig(
        settings=stack.settings("gateway"), nats_url=stack.url, keys=KeyRing.load(root / "keys"),
        webhook_allow=[receiver[0]], webhook_secret=SECRET, job_timeout_s=300,
    )
    with running_gateway(config) as url:
        yield url, key


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return speech_wav(tmp_path_factory.mktemp("clip") / "clip.wav")


def wer(spoken: str, heard: str) -> float:
    return jiwer.wer(words_of(spoken), words_of(heard))


def test_openai_client_transcribes_in_every_format(gateway, clip):
    url, key = gateway
    wav, spoken = clip
    ai = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)

    with wav.open("rb") as f:
        result = ai.audio.transcriptions.create(model="whisper-1", file=f, language="en")
    assert wer(spoken, result.text) <= 0.25, result.text

    with wav.open("rb") as f:
        text = ai.audio.transcriptions.create(model="whisper-1", file=f, response_format="text")
    assert isinstance(text, str) and wer(spoken, text) <= 0.25, text

    for fmt in ("srt", "vtt"):
        with wav.open("rb") as f:
            subtitles = ai.audio.transcriptions.create(model="whisper-1", file=f, response_format=fmt, language="en")
        cues = pysubs2.SSAFile.from_string(subtitles, format_=fmt)
        assert len(cues) >= 1 and wer(spoken, " ".join(c.plaintext.replace("\n", " ") for c in cues)) <= 0.25

    with wav.open("rb") as f:
        verbose = ai.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json", language="en",
            timestamp_granularities=["word", "segment"], temperature=0.0, prompt="a test clip",
        )
    assert verbose.language == "english" and verbose.duration > 3 and wer(spoken, verbose.text) <= 0.25
    assert verbose.segments and all(s.end > s.start for s in verbose.segments)
    assert len(verbose.words) >= len(spoken.split()) * 0.75
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts) and verbose.words[-1].end <= verbose.duration + 0.5
    # faster-whisper's own per-chunk statistics, through the asr stage and the gateway (never 0.0 placeholders)
    for segment in verbose.segments:
        assert -1.0 < segment.avg_logprob < 0 and 0 <= segment.no_speech_prob < 0.5, segment
        assert 0.5 < segment.compression_ratio < 2.4, segment
        assert segment.tokens and all(isinstance(t, int) and t >= 0 for t in segment.tokens), segment
    assert sum(len(s.tokens) for s in verbose.segments) >= len(verbose.words)  # a token or more per word

    models = [m.id for m in ai.models.list()]
    assert models[0] == "whisper-1" and len(models) >= 2  # the alias and the model the asr worker loaded
    assert all("/" not in m and "(" not in m for m in models), models  # names, never server paths
    with wav.open("rb") as f:  # a listed id is a model the client can send back
        by_name = ai.audio.transcriptions.create(model=models[1], file=f, language="en")
    assert wer(spoken, by_name.text) <= 0.25, by_name.text

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_openai_client_refusals_leave_no_job_and_the_next_request_succeeds(gateway, clip):
    """On the real stack: each refusal is the documented status and {"error"}, no job is started
    by any of them, and a real transcription right after each goes through on the same client."""
    url, key = gateway
    wav, spoken = clip
    ai = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    jobs_before = len(api.get("/v1/jobs").json()["data"])
    audio = wav.read_bytes()
    refusals = [
        (openai.BadRequestError, "empty (0 bytes)", dict(model="whisper-1", file=("empty.wav", b""))),
        (openai.APIStatusError, "'language' is over its limit", dict(model="whisper-1", file=("a.wav", audio),
                                                                     language="e" * 5_000_000)),
        (openai.BadRequestError, "'gpt-4o-transcribe' is not served here",
         dict(model="gpt-4o-transcribe", file=("a.wav", audio))),
        (openai.BadRequestError, "response_format 'tsv' unknown", dict(model="whisper-1", file=("a.wav", audio),
                                                                       response_format="tsv")),
    ]
    for kind, message, request in refusals:
        with pytest.raises(kind, match=re.escape(message)) as raised:
            ai.audio.transcriptions.create(**request)
        assert 400 <= raised.value.status_code < 500 and raised.value.body["code"] == raised.value.status_code
    assert len(api.get("/v1/jobs").json()["data"]) == jobs_before  # none of them made a job
    heard = ai.audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio), language="en")
    assert wer(spoken, heard.text) <= 0.25, heard.text


DEVANAGARI = re.compile("[\u0900-\u097f]")
# Whisper base hears espeak's Hindi badly: some sentences translate to a phrase the hallucination
# filter drops ("Thank you for watching."); this one, at 130 wpm, comes out as English sentences.
HINDI_TRANSLATE_SENTENCE = "आज बहुत गर्मी है, इसलिए हम पानी पीते हैं।"


def test_openai_client_translates_speech_into_english(gateway, clip, tmp_path):
    """/v1/audio/translations is Whisper's own translate task (speech -> English), as OpenAI's is:
    the job is the `speech` workflow with asr.task=translate. English speech comes back as its
    own words (a real quality check on the real Whisper base); Hindi espeak speech, which base
    hears badly, comes back in English letters where transcribing it gives Devanagari."""
    url, key = gateway
    wav, spoken = clip
    ai = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    with wav.open("rb") as f:
        raw = ai.audio.translations.with_raw_response.create(model="whisper-1", file=f)
    assert wer(spoken, raw.parse().text) <= 0.25, raw.parse().text
    job = api.get(f"/v1/jobs/{raw.headers['x-captionbus-job']}").json()
    assert job["workflow"] == "speech" and job["status"] == "completed"
    assert job["options"] == {"asr": {"task": "translate"}}
    with wav.open("rb") as f:
        srt = ai.audio.translations.create(model="whisper-1", file=f, response_format="srt")
    cues = pysubs2.SSAFile.from_string(srt, format_="srt")
    assert len(cues) >= 1 and wer(spoken, " ".join(c.plaintext.replace("\n", " ") for c in cues)) <= 0.25

    hindi, _ = speech_wav(tmp_path / "hindi.wav", HINDI_TRANSLATE_SENTENCE, voice="hi", words_per_minute=130)
    with hindi.open("rb") as f:  # OpenAI's translations take no language; ours accepts it as a hint
        verbose = ai.audio.translations.create(model="whisper-1", file=f, response_format="verbose_json",
                                               extra_body={"language": "hi"})
    assert verbose.language == "english" and verbose.duration > 2 and verbose.segments
    assert re.search("[A-Za-z]{2,}", verbose.text) and not DEVANAGARI.search(verbose.text), verbose.text
    with hindi.open("rb") as f:
        heard = ai.audio.transcriptions.create(model="whisper-1", file=f, language="hi")
    assert DEVANAGARI.search(heard.text), heard.text  # the same clip transcribed: Hindi script


def test_curl_transcribes(gateway, clip):
    url, key = gateway
    wav, spoken = clip
    done = subprocess.run(
        ["curl", "-sS", "--fail-with-body", f"{url}/v1/audio/transcriptions", "-H", f"Authorization: Bearer {key}",
         "-F", f"file=@{wav}", "-F", "model=whisper-1", "-F", "response_format=text"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert wer(spoken, done.stdout) <= 0.25, done.stdout


def test_job_api_runs_a_job_streams_events_and_signs_webhooks(gateway, receiver, tmp_path):
    url, key = gateway
    hook_url, received = receiver
    video, spoken = speech_video(tmp_path / "talk.mp4")
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
    with video.open("rb") as f:
        created = api.post("/v1/jobs", files={"file": ("talk.mp4", f, "video/mp4")},
                           data={"workflow": "transcribe", "source_language": "en", "callback_url": hook_url})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = parse_sse(response.iter_lines())
    kinds = [e["event"] for e in events]
    assert kinds[0] == "submitted" and kinds[-1] == "completed", kinds

    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "completed" and {"srt", "vtt", "mp4", "mkv"} <= set(job["outputs"])
    assert job["nodes"].pop("language")["status"] == "skipped"  # source_language given: no detection request
    assert job["nodes"].pop("diarization")["status"] == "skipped"  # no speakers asked for
    assert all(node["status"] == "completed" for node in job["nodes"].values())
    mkv = api.get(job["outputs"]["mkv"]["url"])
    assert mkv.status_code == 200 and 'filename="talk.subtitled.mkv"' in mkv.headers["content-disposition"]
    (tmp_path / "out.mkv").write_bytes(mkv.content)
    streams = ffprobe_json(tmp_path / "out.mkv")["streams"]
    assert [s["codec_name"] for s in streams if s["codec_type"] == "subtitle"] == ["subrip"]
    srt = pysubs2.SSAFile.from_string(api.get(job["outputs"]["srt"]["url"]).text, format_="srt")
    assert wer(spoken, " ".join(c.plaintext.replace("\n", " ") for c in srt)) <= 0.25

    # The webhook receiver got every event, signed (it refuses others), in stream order.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(e["kind"] == "completed" and e["job_id"] == job_id
                                                  for e, _ in received):
        time.sleep(0.2)
    mine = [(e, h) for e, h in received if e["job_id"] == job_id]
    assert [e["kind"] for e, _ in mine] == kinds
    assert all(e["owner"] == "tool" and h["X-Captionbus-Owner"] == "tool" for e, h in mine)  # whose job: the key's name
    sequences = [int(h["X-Captionbus-Sequence"]) for _, h in mine]
    assert sequences == [int(e["id"]) for e in events]
    deliveries = api.get(f"/v1/jobs/{job_id}/deliveries").json()["data"]
    assert [d["status"] for d in deliveries] == ["delivered"] * len(kinds)
