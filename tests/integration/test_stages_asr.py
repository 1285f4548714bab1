"""asr for real: the whisperx env's interpreter runs the stage's setup() once and handle()
on espeak-ng English speech (through demux first, as in a job); WER, timestamps and timing
are checked here. The whisperx env and the Whisper model are real
(built on first use by the session fixtures; the e2e suite covers asr over the bus)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import wave
from pathlib import Path

import jiwer
import pytest

from tests import media as test_media
from tests.unit.stages.fake_context import make_fake_context

REPO = Path(__file__).resolve().parents[2]

# Runs inside the whisperx env: setup once, then one request per audio file given.
RUNNER = r"""
import json, sys, time
from pathlib import Path
import structlog
from services.asr.stage import STAGE
from services.runtime import BadInput, SetupContext
from tests.unit.stages.fake_context import make_fake_context

model_dir, work, *jobs = sys.argv[1:]
started = time.monotonic()
resources = STAGE.setup(SetupContext(stage="asr", env="whisperx", models_dir=Path(model_dir).parent,
                                     log=structlog.get_logger(), options={"model": model_dir}))
results = {"setup_s": time.monotonic() - started, "describe": STAGE.describe_model(resources), "runs": []}
for n, job in enumerate(jobs):
    audio, params = job.split("|", 1)
    ctx = make_fake_context(Path(work) / f"run{n}", "asr", inputs={"audio": Path(audio)},
                            params=json.loads(params), resources=resources)
    try:
        out = STAGE.handle(ctx.request, ctx)
        results["runs"].append({"transcript": json.loads(out["transcript"].read_text()), "metrics": ctx.metrics,
                                "progress": ctx.progress_events, "warnings": ctx.warnings})
    except BadInput as bad:
        results["runs"].append({"bad_input": str(bad)})
print("RESULT " + json.dumps(results))
"""


def whisperx_python() -> Path:
    configured = os.environ.get("CAPTIONBUS_TEST_WHISPERX_PYTHON")
    if configured:
        return Path(configured)
    from captionbus.envs import env_python

    return Path(env_python("whisperx"))


def words_of(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


@pytest.fixture(scope="module")
def asr_runs(tmp_path_factory, stage_envs, whisper_model):
    python = whisperx_python()
    model = Path(os.environ.get("CAPTIONBUS_ASR_MODEL") or whisper_model)
    tmp = tmp_path_factory.mktemp("asr")
    video, spoken = test_media.speech_video(tmp / "speech.mp4")

    from services.demux.stage import STAGE as DEMUX

    ctx = make_fake_context(tmp / "demux", "demux", inputs={"media": video})
    audio = DEMUX.handle(ctx.request, ctx)["audio"]
    hindi_video, _ = test_media.speech_video(tmp / "hindi.mp4", test_media.HINDI_SENTENCE, voice="hi")
    ctx = make_fake_context(tmp / "demux-hi", "demux", inputs={"media": hindi_video})
    hindi_audio = DEMUX.handle(ctx.request, ctx)["audio"]
    empty_wav = tmp / "empty.wav"
    with wave.open(str(empty_wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    silence = tmp / "silence.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "3",
                    "-c:a", "pcm_s16le", str(silence)], check=True, timeout=60)
    jobs = [
        f"{audio}|{json.dumps({})}",  # language detected
        f"{audio}|{json.dumps({'source_language': 'en', 'target_languages': []})}",  # as the coordinator sends it
        f"{audio}|{json.dumps({'language': 'xx'})}",
        f"{audio}|{json.dumps({'model': 'whisper-large-v3'})}",
        f"{silence}|{json.dumps({'language': 'en'})}",
        f"{hindi_audio}|{json.dumps({'language': 'hi'})}",
        f"{empty_wav}|{json.dumps({})}",
    ]
    done = subprocess.run(
        [str(python), "-c", RUNNER, str(model), str(tmp / "work"), *jobs],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    results["spoken"] = spoken
    results["video"] = str(video)
    return results


def test_detected_english_transcript_has_low_wer_and_word_times(asr_runs):
    run = asr_runs["runs"][0]
    transcript = run["transcript"]
    assert transcript["language"] == "en" and transcript["language_probability"] > 0.5
    heard = " ".join(s["text"] for s in transcript["segments"])
    wer = jiwer.wer(words_of(asr_runs["spoken"]), words_of(heard))
    print(f"WER {wer:.3f}; metrics {run['metrics']}; setup {asr_runs['setup_s']:.1f} s; heard {heard!r}")
    print("words", [(w["text"], w["start"], w["end"]) for s in transcript["segments"] for w in s["words"]])
    assert wer <= 0.25, heard

    words = [w for s in transcript["segments"] for w in s["words"]]
    assert len(words) >= 0.8 * len(asr_runs["spoken"].split())
    starts = [w["start"] for w in words]
    assert starts == sorted(starts) and all(w["end"] >= w["start"] for w in words)
    # speech starts after the clip's 0.5 s lead-in and lasts ~7 s
    assert 0.4 <= words[0]["start"] <= 0.8, words[0]
    assert words[-1]["end"] <= transcript["duration"] + 0.01
    for segment in transcript["segments"]:
        assert segment["start"] <= segment["words"][0]["start"] and segment["end"] >= segment["words"][-1]["end"]


def test_metrics_progress_and_model_description(asr_runs):
    run = asr_runs["runs"][1]
    assert run["transcript"]["language"] == "en" and run["transcript"]["language_probability"] is None
    metrics = run["metrics"]
    assert metrics["audio_duration_s"] > 5 and metrics["realtime_factor"] > 0 and metrics["model_load_s"] > 0
    fractions = [f for f, _ in run["progress"]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 3
    assert "int8" in asr_runs["describe"] and "whisper-base" in asr_runs["describe"]


def test_bad_language_and_wrong_model_are_bad_input(asr_runs):
    assert "'xx' is not a Whisper language code" in asr_runs["runs"][2]["bad_input"]
    assert "not 'whisper-large-v3'" in asr_runs["runs"][3]["bad_input"]


@pytest.mark.parametrize("run_index", [4, 6], ids=["silence", "zero-length"])
def test_silence_gives_an_empty_transcript_and_a_warning(asr_runs, run_index):
    run = asr_runs["runs"][run_index]
    assert run["transcript"]["segments"] == [] and run["warnings"]


def test_asr_transcript_through_subtitle_gen_and_mux_keeps_words_and_timing(asr_runs, tmp_path):
    """The rest of the transcribe chain in-process on the real transcript: the subtitle track
    read back from the muxed mp4 still says what was spoken, starting when the speech does."""
    import pysubs2

    from contracts.transcript import Transcript
    from services.mux.stage import STAGE as MUX
    from services.subtitle_gen.stage import STAGE as SUBTITLE_GEN

    transcript_path = tmp_path / "transcript.json"
    transcript_path.write_text(Transcript.model_validate(asr_runs["runs"][0]["transcript"]).model_dump_json())
    ctx = make_fake_context(tmp_path / "subs", "subtitle_gen", inputs={"transcript": transcript_path})
    srt = SUBTITLE_GEN.handle(ctx.request, ctx)["srt"]
    ctx = make_fake_context(tmp_path / "mux", "mux", inputs={"media": Path(asr_runs["video"])}, input_lists={"subtitles": [srt]})
    mp4 = MUX.handle(ctx.request, ctx)["mp4"]

    track = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(mp4), "-map", "0:s:0", "-f", "srt", "-"],
                           check=True, capture_output=True, text=True, timeout=60).stdout
    cues = pysubs2.SSAFile.from_string(track, format_="srt")
    heard = " ".join(cue.plaintext.replace("\n", " ") for cue in cues)
    assert jiwer.wer(words_of(asr_runs["spoken"]), words_of(heard)) <= 0.25, heard
    assert 300 <= cues[0].start <= 800, cues[0]  # speech starts 0.5 s in


def test_hindi_request_runs_in_hindi_with_word_times(asr_runs):
    """Plumbing, not accuracy: the Hindi tokenizer decodes and aligns Devanagari text."""
    transcript = asr_runs["runs"][5]["transcript"]
    assert transcript["language"] == "hi"
    words = [w for s in transcript["segments"] for w in s["words"]]
    assert words and all(w["start"] is not None and w["end"] >= w["start"] for w in words)
    print("hindi heard:", " ".join(s["text"] for s in transcript["segments"]))
