"""asr for real: the whisperx env's interpreter runs the stage's setup() once and handle()
on espeak-ng English speech (through demux first, as in a job); WER, timestamps and timing
are checked here, with and without speech regions from a vad stage (made here from the
audio's loudness, so they do not depend on the vad stage's model). The whisperx env and the
Whisper model are real (built on first use by the session fixtures; the e2e suite covers asr
over the bus)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import wave
from pathlib import Path

import jiwer
import numpy as np
import pytest

from captionbus.contracts.speech import SpeechRegion, SpeechRegions, SpokenLanguage
from captionbus.services.chunk.plan import plan_chunks
from tests import media as test_media
from captionbus.services.runtime.testing import make_fake_context

REPO = Path(__file__).resolve().parents[2]

# Runs inside the whisperx env: setup once, then one request per audio file given.
RUNNER = r"""
import json, sys, time
from pathlib import Path
import structlog
from captionbus.services.asr.stage import STAGE
from captionbus.services.runtime import BadInput, SetupContext
from captionbus.services.runtime.testing import make_fake_context

model_dir, work, *jobs = sys.argv[1:]
started = time.monotonic()
resources = STAGE.setup(SetupContext(stage="asr", env="whisperx", models_dir=Path(model_dir).parent,
                                     log=structlog.get_logger(), options={"model": model_dir}))
results = {"setup_s": time.monotonic() - started, "describe": STAGE.describe_model(resources), "runs": []}
produced = []  # each run's outputs: a later job names run N's language output as @N
for n, job in enumerate(jobs):
    audio, params, regions, chunks, language = (job.split("|") + [""] * 4)[:5]
    if language.startswith("@"):
        language = produced[int(language[1:])]["language"]
    inputs = {"audio": Path(audio), **{name: Path(path) for name, path in
                                       (("regions", regions), ("chunks", chunks), ("language", language)) if path}}
    ctx = make_fake_context(Path(work) / f"run{n}", "asr", inputs=inputs, params=json.loads(params), resources=resources)
    started = time.monotonic()
    produced.append({})
    try:
        produced[n] = out = STAGE.handle(ctx.request, ctx)
        read = {name: json.loads(path.read_text()) for name, path in out.items()}
        results["runs"].append({"transcript": read.get("transcript"), "language": read.get("language"),
                                "metrics": ctx.metrics, "progress": ctx.progress_events, "warnings": ctx.warnings,
                                "seconds": time.monotonic() - started})
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


def read_samples(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0, w.getframerate()


def loudness_regions(path: Path, floor_db: float = -45.0, bridge_s: float = 0.3, pad_s: float = 0.1) -> list[tuple[float, float]]:
    """Speech regions as a simple VAD would give them for clean espeak speech: 10 ms frames
    louder than `floor_db` (full scale), gaps under `bridge_s` bridged, `pad_s` each side."""
    samples, rate = read_samples(path)
    frame = rate // 100
    rms = np.sqrt(np.mean(samples[: len(samples) // frame * frame].reshape(-1, frame) ** 2, axis=1))
    loud = np.flatnonzero(20 * np.log10(rms + 1e-9) > floor_db)
    regions: list[list[float]] = []
    for index in loud:
        t = float(index) / 100
        if regions and t - regions[-1][1] <= bridge_s:
            regions[-1][1] = t + 0.01
        else:
            regions.append([t, t + 0.01])
    duration = len(samples) / rate
    padded: list[tuple[float, float]] = []
    for a, b in regions:  # sorted and not overlapping, as the SpeechRegions contract says
        a, b = max(0.0, a - pad_s), min(duration, b + pad_s)
        if padded and a <= padded[-1][1]:
            padded[-1] = (padded[-1][0], b)
        else:
            padded.append((a, b))
    return padded


def write_regions(path: Path, regions: list[tuple[float, float]], duration: float) -> Path:
    path.write_text(SpeechRegions(backend="test-loudness", duration=duration,
                                  regions=[SpeechRegion(start=a, end=b) for a, b in regions]).model_dump_json())
    return path


def speech_silence_noise_speech(tmp: Path) -> tuple[Path, str, str, tuple[float, float], list[tuple[float, float]]]:
    """16 kHz mono WAV: sentence one, 6 s silence, 8 s loud pink noise, sentence two. Returns the
    path, both sentences, the (start, end) of the silence + noise stretch and speech regions
    that leave it out (the loudness of each sentence on its own)."""
    first, second = "Please open the window before the meeting starts", "The train to the city leaves at nine"
    parts = []
    for n, text in enumerate((first, second)):
        parts.append(test_media.speech_wav(tmp / f"part{n}.wav", text)[0])
    out = tmp / "speech_noise.wav"
    subprocess.run([
        "ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(parts[0]), "-i", str(parts[1]),
        "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono:d=6",
        "-f", "lavfi", "-i", "anoisesrc=r=16000:color=pink:amplitude=0.4:d=8:seed=7",
        "-filter_complex",
        "[0:a]aresample=16000,aformat=channel_layouts=mono[a];[1:a]aresample=16000,aformat=channel_layouts=mono[b];"
        "[a][2:a][3:a][b]concat=n=4:v=0:a=1[out]",
        "-map", "[out]", "-c:a", "pcm_s16le", "-ar", "16000", "-ac", "1", str(out),
    ], check=True, timeout=60)
    samples, rate = read_samples(parts[0])
    first_seconds = len(samples) / rate
    gap = (first_seconds, first_seconds + 14.0)
    regions = loudness_regions(parts[0]) + [(a + gap[1], b + gap[1]) for a, b in loudness_regions(parts[1])]
    return out, first, second, gap, regions


@pytest.fixture(scope="module")
def asr_runs(tmp_path_factory, stage_envs, whisper_model):
    python = whisperx_python()
    model = Path(os.environ.get("CAPTIONBUS_ASR_MODEL") or whisper_model)
    tmp = tmp_path_factory.mktemp("asr")
    video, spoken = test_media.speech_video(tmp / "speech.mp4")

    from captionbus.services.demux.stage import STAGE as DEMUX

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
    samples, rate = read_samples(audio)
    duration = len(samples) / rate
    speech_regions = loudness_regions(audio, floor_db=-25, bridge_s=0.15)  # ~5 regions, as a VAD splits at pauses
    covering = write_regions(tmp / "regions.json", speech_regions, duration)
    no_regions = write_regions(tmp / "no_regions.json", [], duration)
    corrupt = tmp / "corrupt_regions.json"
    corrupt.write_text('{"backend": "silero", "duration": 7.5, "regions": [{"start": 3.0, "end": 1.0}')
    elsewhere = write_regions(tmp / "other_file_regions.json", [(1.0, 2.0)], duration + 60)
    noisy, first, second, gap, noisy_regions = speech_silence_noise_speech(tmp)
    noisy_samples, _ = read_samples(noisy)
    noisy_regions_path = write_regions(tmp / "noisy_regions.json", noisy_regions, len(noisy_samples) / 16000)
    one_chunk = tmp / "one_chunk.json"  # what the chunk stage cuts a clip into: one chunk
    one_chunk.write_text(plan_chunks(speech_regions, duration, 0.0, 0.3, None).model_dump_json())
    unknown_language = tmp / "language.json"  # the chunk stage's language output without -s
    unknown_language.write_text(SpokenLanguage(language=None).model_dump_json())
    jobs = [
        f"{audio}|{json.dumps({})}",  # language detected
        f"{audio}|{json.dumps({'source_language': 'en', 'target_languages': []})}",  # as the coordinator sends it
        f"{audio}|{json.dumps({'language': 'xx'})}",
        f"{audio}|{json.dumps({'model': 'whisper-large-v3'})}",
        f"{silence}|{json.dumps({'language': 'en'})}",
        f"{hindi_audio}|{json.dumps({'language': 'hi'})}",
        f"{empty_wav}|{json.dumps({})}",
        f"{audio}|{json.dumps({})}|{covering}",  # 7: regions from a vad stage, language detected on them
        f"{audio}|{json.dumps({'language': 'en'})}|{no_regions}",  # 8
        f"{audio}|{json.dumps({})}|{corrupt}",  # 9
        f"{audio}|{json.dumps({})}|{elsewhere}",  # 10
        f"{noisy}|{json.dumps({'language': 'en'})}|{noisy_regions_path}",  # 11
        f"{noisy}|{json.dumps({'language': 'en'})}",  # 12: the same without regions, for comparison
        # a clip of one chunk: the language detected by its own request (13, as a job of several
        # chunks does) and decoded with (14), or detected inside the decode (15, a job of one chunk)
        f"{audio}|{json.dumps({'task': 'detect_language'})}||{one_chunk}",  # 13
        f"{audio}|{json.dumps({'item': 0})}||{one_chunk}|@13",  # 14
        f"{audio}|{json.dumps({'item': 0})}||{one_chunk}|{unknown_language}",  # 15
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
    results["speech_regions"] = speech_regions
    results["noisy"] = {"first": first, "second": second, "gap": gap, "regions": noisy_regions}
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


@pytest.mark.parametrize("run_index", [0, 7], ids=["whisperx-vad", "vad-regions"])
def test_segments_carry_the_decoders_own_statistics(asr_runs, run_index):
    """avg_logprob, no_speech_prob, compression_ratio and tokens are faster-whisper's values for
    the decoded chunk (captionbus/services/asr/whisperx_backend.recording_decoder), not placeholders; the
    tokens are the decoder's, split at the segment's words, so every word is aligned on the token
    the decoder chose (re-encoding the text split ' the' into ' ' + 'the' and gave 'the' a
    probability of 0.00-0.03 and 'lazy' no duration on this clip)."""
    segments = asr_runs["runs"][run_index]["transcript"]["segments"]
    assert segments
    for segment in segments:
        assert -1.0 < segment["avg_logprob"] < 0, segment  # clear espeak speech decodes confidently
        assert 0 <= segment["no_speech_prob"] < 0.5, segment  # speech, and the decoder says so
        assert 0.5 < segment["compression_ratio"] < 2.4, segment  # faster-whisper's repetition threshold
        assert segment["tokens"] and all(isinstance(t, int) and 0 <= t < 50257 for t in segment["tokens"])
        assert len(segment["tokens"]) >= len(segment["words"])  # at least one token per word
    words = [w for s in segments for w in s["words"]]
    assert min(w["score"] for w in words) > 0.2, [(w["text"], w["score"]) for w in words]
    assert all(w["end"] > w["start"] for w in words), words


def test_metrics_progress_and_model_description(asr_runs):
    run = asr_runs["runs"][1]
    assert run["transcript"]["language"] == "en" and run["transcript"]["language_probability"] is None
    metrics = run["metrics"]
    assert metrics["audio_duration_s"] > 5 and metrics["realtime_factor"] > 0 and metrics["model_load_s"] > 0
    fractions = [f for f, _ in run["progress"]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 3
    assert "int8" in asr_runs["describe"] and "whisper-base" in asr_runs["describe"]


def test_bad_language_and_wrong_model_are_bad_input(asr_runs):
    # refused by the params model (captionbus/contracts/declarations/asr.py: AsrParams) before the handler runs
    assert "bad asr params: language='xx': unknown language code" in asr_runs["runs"][2]["bad_input"]
    assert "not 'whisper-large-v3'" in asr_runs["runs"][3]["bad_input"]


@pytest.mark.parametrize("run_index", [4, 6], ids=["silence", "zero-length"])
def test_silence_gives_an_empty_transcript_and_a_warning(asr_runs, run_index):
    run = asr_runs["runs"][run_index]
    assert run["transcript"]["segments"] == [] and run["warnings"]


def test_asr_transcript_through_subtitle_gen_and_mux_keeps_words_and_timing(asr_runs, tmp_path):
    """The rest of the transcribe chain in-process on the real transcript: the subtitle track
    read back from the muxed mp4 still says what was spoken, starting when the speech does."""
    import pysubs2

    from captionbus.contracts.transcript import Transcript
    from captionbus.services.mux.stage import STAGE as MUX
    from captionbus.services.subtitle_gen.stage import STAGE as SUBTITLE_GEN

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


def _words(transcript: dict) -> list[dict]:
    return [w for s in transcript["segments"] for w in s["words"]]


def test_regions_from_vad_give_the_same_quality_and_no_words_outside_them(asr_runs):
    plain, with_regions = asr_runs["runs"][0], asr_runs["runs"][7]
    transcript = with_regions["transcript"]
    heard = " ".join(s["text"] for s in transcript["segments"])
    wer = jiwer.wer(words_of(asr_runs["spoken"]), words_of(heard))
    plain_wer = jiwer.wer(words_of(asr_runs["spoken"]), words_of(" ".join(s["text"] for s in plain["transcript"]["segments"])))
    print(f"regions {asr_runs['speech_regions']}")
    print(f"WER with regions {wer:.3f} ({with_regions['seconds']:.2f} s), without {plain_wer:.3f} ({plain['seconds']:.2f} s)")
    assert wer <= 0.25, heard
    assert transcript["language"] == "en" and transcript["language_probability"] > 0.5  # detected on the regions
    assert len(asr_runs["speech_regions"]) >= 3 and with_regions["metrics"]["speech_region_s"] > 5
    words = _words(transcript)
    assert len(words) >= 0.8 * len(asr_runs["spoken"].split())
    tolerance = 0.25  # REGION_TOLERANCE_S plus rounding: word edges from cross-attention
    for word in words:
        assert any(a - tolerance <= word["start"] and word["end"] <= b + tolerance for a, b in asr_runs["speech_regions"]), word


def test_a_clip_of_one_chunk_detects_in_its_decode_the_language_and_words_of_a_separate_detection(asr_runs):
    """A job of one chunk makes no detect_language request (the workflows' `language` node runs
    for two chunks or more): its chunk request, given no language, detects on the same samples
    that request would have heard, then decodes. Same language, same probability, same words and
    times as detecting first in a request of its own and decoding with what it found."""
    detected, given, inside = (asr_runs["runs"][i] for i in (13, 14, 15))
    assert detected["language"]["language"] == "en" and detected["language"]["probability"] > 0.5
    assert given["transcript"]["language"] == inside["transcript"]["language"] == "en"
    assert inside["transcript"]["language_probability"] == pytest.approx(detected["language"]["probability"])
    assert _words(inside["transcript"]) and _words(inside["transcript"]) == _words(given["transcript"])
    assert [s["text"] for s in inside["transcript"]["segments"]] == [s["text"] for s in given["transcript"]["segments"]]


def test_empty_regions_mean_no_speech(asr_runs):
    run = asr_runs["runs"][8]
    assert run["transcript"]["segments"] == [] and run["transcript"]["language"] == "en"
    assert any("vad stage found no speech" in w for w in run["warnings"])
    assert run["metrics"]["speech_region_s"] == 0


def test_corrupt_or_foreign_regions_are_bad_input(asr_runs):
    assert "input 'regions' is not valid SpeechRegions JSON" in asr_runs["runs"][9]["bad_input"]
    assert "belong to another file" in asr_runs["runs"][10]["bad_input"]


def test_no_text_where_the_regions_exclude_silence_and_noise(asr_runs):
    noisy = asr_runs["noisy"]
    gap_start, gap_end = noisy["gap"]
    for index, label in ((11, "with regions"), (12, "without regions")):
        transcript = asr_runs["runs"][index]["transcript"]
        heard = " ".join(s["text"] for s in transcript["segments"])
        inside = [w for w in _words(transcript) if w["end"] > gap_start + 0.3 and w["start"] < gap_end - 0.3]
        print(f"{label}: {asr_runs['runs'][index]['seconds']:.2f} s; heard {heard!r}; words in the gap {inside}")
    print("regions", noisy["regions"], "gap", noisy["gap"])
    transcript = asr_runs["runs"][11]["transcript"]
    assert not [s for s in transcript["segments"] if s["end"] > gap_start + 0.3 and s["start"] < gap_end - 0.3]
    assert not [w for w in _words(transcript) if w["end"] > gap_start + 0.3 and w["start"] < gap_end - 0.3]
    expected = words_of(noisy["first"] + " " + noisy["second"])
    heard = words_of(" ".join(s["text"] for s in transcript["segments"]))
    assert jiwer.wer(expected, heard) <= 0.3, heard


# ---------------------------------------------------------------- pure region helpers (no env)

def test_region_helpers_merge_split_and_silence():
    from captionbus.services.asr import stage, whisperx_backend

    assert stage.merge_regions([(5.0, 6.0), (0.5, 1.0), (0.9, 2.0), (9.5, 12.0), (3.0, 3.0)], duration=10.0, margin=0.1) == [
        (0.4, 2.1), (4.9, 6.1), (9.4, 10.0)]
    rate = stage.SAMPLE_RATE
    audio = np.full(70 * rate, 0.5, dtype=np.float32)
    audio[int(21.0 * rate) : int(21.2 * rate)] = 0.0  # the only quiet spot in 15..30 s
    pieces = whisperx_backend.split_long_regions([(1.0, 68.0)], audio)
    assert all(b - a <= whisperx_backend.CHUNK_S for a, b in pieces) and pieces[0][0] == 1.0 and pieces[-1][1] == 68.0
    assert 21.0 <= pieces[0][1] <= 21.2
    assert all(pieces[i][1] == pieces[i + 1][0] for i in range(len(pieces) - 1))
    silenced = stage.speech_only(audio, [(2.0, 3.0)])
    assert silenced[: 2 * rate].max() == 0 and silenced[2 * rate : 3 * rate].min() == 0.5 and silenced[3 * rate :].max() == 0
    sample = whisperx_backend.speech_sample(audio, [(0.0, 20.0), (30.0, 50.0)])
    assert len(sample) == whisperx_backend.CHUNK_S * rate
