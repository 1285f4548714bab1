"""alignment for real: the whisperx env runs the stage's setup() once and handle() on espeak-ng
speech (English and Hindi, through demux as in a job) with tiny randomly initialised wav2vec2
CTC models built by tests/model_factory/wav2vec2.py, loaded through whisperx.load_align_model
and aligned by whisperx.align. Random weights give valid CTC paths, not accurate times, so the
tests check what the stage guarantees (text kept, words inside their segments and in order,
metrics, fallbacks, bad input) rather than where each word is.

Input transcripts are written here, as asr would write them (rough segment times, some word
times missing), so no ASR model runs. The whole run has a socket guard: no IPv4/IPv6
connection may be attempted (nltk's punkt download, a hub lookup), with HF_HUB_OFFLINE unset."""
from __future__ import annotations

import json
import wave
from pathlib import Path

import pytest

from captionbus.contracts.transcript import Segment, Transcript, Word
from tests import envtools
from tests import media as test_media
from tests.model_factory.wav2vec2 import ensure_wav2vec2
from captionbus.services.runtime.testing import make_fake_context

RUNNER = r"""
import json, socket, sys, time
from pathlib import Path

attempts = []  # network connections anything in this process tried
def refuse(self, address, *rest):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        attempts.append(repr(address))
        raise OSError("network disabled by the alignment test")
    return original_connect(self, address, *rest)
original_connect = socket.socket.connect
socket.socket.connect = refuse
socket.socket.connect_ex = refuse

import nltk
nltk_downloads = []
original_download = nltk.download
def record_download(*args, **kwargs):
    nltk_downloads.append(repr(args))
    return original_download(*args, **kwargs)
nltk.download = record_download

import structlog
from captionbus.services.alignment.stage import STAGE
from captionbus.services.runtime import BadInput, SetupContext
from captionbus.services.runtime.testing import make_fake_context

options, work, *jobs = sys.argv[1:]
started = time.monotonic()
resources = STAGE.setup(SetupContext(stage="alignment", env="whisperx", models_dir=Path(work),
                                     log=structlog.get_logger(), options=json.loads(options)))
results = {"setup_s": time.monotonic() - started, "runs": []}
for n, job in enumerate(jobs):
    audio, transcript, params = job.split("|", 2)
    ctx = make_fake_context(Path(work) / f"run{n}", "alignment", inputs={"audio": Path(audio), "transcript": Path(transcript)},
                            params=json.loads(params), resources=resources)
    began = time.monotonic()
    try:
        out = STAGE.handle(ctx.request, ctx)
        results["runs"].append({"transcript": json.loads(out["transcript"].read_text()), "metrics": ctx.metrics,
                                "progress": ctx.progress_events, "warnings": ctx.warnings,
                                "describe": STAGE.describe_model(resources), "seconds": time.monotonic() - began})
    except BadInput as bad:
        results["runs"].append({"bad_input": str(bad)})
results["network_attempts"] = attempts
results["nltk_downloads"] = nltk_downloads
print("RESULT " + json.dumps(results))
"""

TAMIL = "வணக்கம் உலகம்"


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def demuxed_speech(tmp: Path, text: str, voice: str) -> Path:
    from captionbus.services.demux.stage import STAGE as DEMUX

    video, _ = test_media.speech_video(tmp / f"{voice}.mp4", text, voice=voice)
    ctx = make_fake_context(tmp / f"demux-{voice}", "demux", inputs={"media": video})
    return DEMUX.handle(ctx.request, ctx)["audio"]


def write_transcript(path: Path, transcript: Transcript) -> Path:
    path.write_text(transcript.model_dump_json())
    return path


def english_transcript(duration: float) -> Transcript:
    """As asr might hear the clip (speech from ~0.5 s): two segments, rough times, one word
    written as a number, some word times missing; the last segment ends past the audio."""
    first = "The quick brown fox jumps over the lazy dog while 7"
    second = "friendly sailors watch the golden sunset from the quiet harbour."
    rough = [Word(text=w, start=0.4 + 0.35 * i, end=0.4 + 0.35 * i + 0.3) if i % 3 else Word(text=w)
             for i, w in enumerate(first.split())]
    return Transcript(
        language="en", duration=duration, model="test",
        segments=[
            Segment(start=0.3, end=4.1, text=first, words=rough, speaker="S1", flags=["checked"]),
            Segment(start=4.1, end=duration + 3.0, text=second),  # end past the audio, no words
        ],
    )


@pytest.fixture(scope="module")
def alignment_runs(tmp_path_factory):
    if not test_media.tools_available():
        pytest.skip(test_media.MISSING)
    tmp = tmp_path_factory.mktemp("alignment")
    models = {lang: ensure_wav2vec2(envtools.test_models_root(), lang) for lang in ("en", "hi")}
    broken = tmp / "broken-te-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not a model config")

    english = demuxed_speech(tmp, test_media.ENGLISH_SENTENCE, "en")
    hindi = demuxed_speech(tmp, test_media.HINDI_SENTENCE, "hi")
    duration = wav_seconds(english)
    hindi_duration = wav_seconds(hindi)
    transcripts = {
        "en": english_transcript(duration),
        "hi": Transcript(language="hi", duration=hindi_duration,
                         segments=[Segment(start=0.2, end=hindi_duration - 0.2, text=test_media.HINDI_SENTENCE)]),
        "ta": Transcript(language="ta", segments=[Segment(start=0.5, end=2.0, text=TAMIL,
                                                          words=[Word(text="வணக்கம்", start=0.5, end=1.1), Word(text="உலகம்")])]),
        "te": Transcript(language="te", segments=[Segment(start=0.5, end=2.0, text="నమస్కారం")]),
        "partly": Transcript(language="en", duration=duration, segments=[
            # Punkt splits "!!" here into two abutting sentences ("!" | "!"): whisperx repeats a character
            Segment(start=0.3, end=3.0, text="Wait... !! The quick brown fox jumps over the lazy dog."),
            # starts after the audio ends: whisperx cannot align it
            Segment(start=duration + 1, end=duration + 2, text="after the end",
                    words=[Word(text="after", start=duration + 1.1, end=duration + 1.3), Word(text="the"),
                           Word(text="end", start=duration + 1.6, end=duration + 2.5)]),
        ]),
        "empty": Transcript(language="en", duration=duration),
        "xx": Transcript(language="xx", segments=[Segment(start=0, end=1, text="hello")]),
        "translated": Transcript(language="en", translated_from="hi", segments=[Segment(start=0, end=1, text="hello")]),
    }
    paths = {name: write_transcript(tmp / f"{name}.json", t) for name, t in transcripts.items()}
    paths["invalid_json"] = tmp / "invalid.json"
    paths["invalid_json"].write_text('{"language": "en", "segments": [')
    paths["wrong_shape"] = tmp / "wrong_shape.json"
    paths["wrong_shape"].write_text('{"language": "en", "segments": [{"start": "soon", "end": 1, "text": "x"}]}')
    corrupt_audio = tmp / "corrupt.wav"
    corrupt_audio.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")

    jobs = {  # name: (audio, transcript, params)
        "en": (english, paths["en"], {"source_language": "en", "target_languages": []}),
        "en_warm": (english, paths["en"], {}),
        "hi": (hindi, paths["hi"], {"language": "hi"}),
        "en_after_hi": (english, paths["en"], {}),  # cache_size 1: hi evicted en
        "ta_unconfigured": (english, paths["ta"], {}),
        "te_broken_model": (english, paths["te"], {}),
        "partly": (english, paths["partly"], {}),
        "empty": (english, paths["empty"], {}),
        "corrupt_audio": (corrupt_audio, paths["en"], {}),
        "invalid_json": (english, paths["invalid_json"], {}),
        "wrong_shape": (english, paths["wrong_shape"], {}),
        "language_mismatch": (english, paths["en"], {"source_language": "hi"}),
        "unknown_language": (english, paths["xx"], {}),
        "translated": (english, paths["translated"], {}),
    }
    options = {"model_en": str(models["en"]), "model_hi": str(models["hi"]), "model_te": str(broken),
               "cache_size": "1", "threads": "2", "device": "cpu"}
    results = envtools.run_in_env(
        "whisperx", RUNNER, json.dumps(options), str(tmp / "work"),
        *(f"{audio}|{transcript}|{json.dumps(params)}" for audio, transcript, params in jobs.values()),
        timeout=600,
        # "0", not unset: local folders must load without the hub even when offline mode is off
        extra_env={"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "CAPTIONBUS_ALIGN_MODEL_TA": ""},
    )
    runs = dict(zip(jobs, results["runs"]))
    print(f"setup {results['setup_s']:.1f} s; " + "; ".join(
        f"{name} {run['seconds']:.1f} s" for name, run in runs.items() if "seconds" in run))
    return {"runs": runs, "transcripts": transcripts, "duration": duration, "hindi_duration": hindi_duration,
            "network_attempts": results["network_attempts"], "nltk_downloads": results["nltk_downloads"]}


def assert_aligned_like_input(aligned: dict, source: Transcript, audio_seconds: float):
    out = Transcript.model_validate(aligned)
    assert out.aligned is True
    assert [s.text for s in out.segments] == [s.text for s in source.segments]
    assert [(s.speaker, s.flags) for s in out.segments] == [(s.speaker, s.flags) for s in source.segments]
    assert (out.language, out.duration) == (source.language, source.duration)
    previous_end = 0.0
    for segment, original in zip(out.segments, source.segments):
        assert original.start <= segment.start <= segment.end <= original.end  # only tightened
        assert [w.text for w in segment.words] == segment.text.split()
        for word in segment.words:
            assert word.start is not None and word.end is not None
            assert previous_end <= word.start <= word.end, (word, previous_end)
            assert segment.start <= word.start and word.end <= segment.end
            assert word.end <= audio_seconds + 0.001
            previous_end = word.end
    return out


def test_english_words_are_realigned_inside_their_segments(alignment_runs):
    run = alignment_runs["runs"]["en"]
    source = alignment_runs["transcripts"]["en"]
    out = assert_aligned_like_input(run["transcript"], source, alignment_runs["duration"])
    words = [w for s in out.segments for w in s.words]
    assert len(words) == len(source.text.split()) == 21
    assert any(w.score is not None for w in words)
    # the last segment ended 3 s past the audio; its words were aligned on the audio that exists
    assert out.segments[1].end <= alignment_runs["duration"] + 0.001
    assert run["warnings"] == []
    print("aligned:", [(w.text, w.start, w.end) for w in words])


def test_metrics_progress_and_warm_model(alignment_runs):
    first, warm, reloaded = (alignment_runs["runs"][k] for k in ("en", "en_warm", "en_after_hi"))
    metrics = first["metrics"]
    assert metrics["words"] == 21 and metrics["words_aligned"] == 21 and metrics["fallback"] == 0
    assert metrics["alignment_s"] > 0 and metrics["model_load_s"] > 0 and metrics["segments"] == 2
    assert warm["metrics"]["model_load_s"] == 0  # kept warm
    assert reloaded["metrics"]["model_load_s"] > 0  # cache_size 1: the Hindi model evicted it
    assert warm["transcript"] == first["transcript"]  # deterministic
    fractions = [f for f, _ in first["progress"]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 3
    assert "wav2vec2-tiny-en" in first["describe"]


def test_hindi_devanagari_is_aligned_with_the_hindi_model(alignment_runs):
    run = alignment_runs["runs"]["hi"]
    out = assert_aligned_like_input(run["transcript"], alignment_runs["transcripts"]["hi"], alignment_runs["hindi_duration"])
    assert run["metrics"]["words_aligned"] == len(alignment_runs["transcripts"]["hi"].text.split())
    assert "wav2vec2-tiny-hi" in run["describe"] and "wav2vec2-tiny-en" not in run["describe"]
    print("hindi aligned:", [(w.text, w.start, w.end) for s in out.segments for w in s.words])


def test_language_without_a_model_keeps_the_input_with_a_warning(alignment_runs):
    run = alignment_runs["runs"]["ta_unconfigured"]
    assert Transcript.model_validate(run["transcript"]) == alignment_runs["transcripts"]["ta"]
    assert run["transcript"]["aligned"] is False
    assert run["warnings"] == [
        "no alignment model for ta (set CAPTIONBUS_ALIGN_MODEL_TA or config/alignment.yaml): kept ASR word times"
    ]
    assert run["metrics"]["fallback"] == 1 and run["metrics"]["words_aligned"] == 0


def test_broken_configured_model_falls_back_with_the_load_error(alignment_runs):
    run = alignment_runs["runs"]["te_broken_model"]
    assert Transcript.model_validate(run["transcript"]) == alignment_runs["transcripts"]["te"]
    [warning] = run["warnings"]
    assert "alignment model for te" in warning and "broken-te-model" in warning and "failed to load" in warning
    assert warning.endswith("kept ASR word times")
    assert run["metrics"]["fallback"] == 1


def test_a_segment_whisperx_cannot_align_keeps_its_asr_times_inside_the_guarantees(alignment_runs):
    run = alignment_runs["runs"]["partly"]
    out = Transcript.model_validate(run["transcript"])
    source = alignment_runs["transcripts"]["partly"]
    assert out.aligned is True and run["metrics"]["words_aligned"] == 11 and run["metrics"]["words"] == 14
    assert run["warnings"] == ["1 of 2 segment(s) could not be aligned: kept their ASR word times"]
    assert [w.text for w in out.segments[0].words] == source.segments[0].text.split()
    kept, original = out.segments[1], source.segments[1]
    assert (kept.start, kept.end) == (original.start, original.end)  # not tightened: not aligned
    d = alignment_runs["duration"]
    # ASR times kept, the missing one interpolated, the one past the segment clamped to it
    assert [(w.text, w.start, w.end) for w in kept.words] == [
        ("after", round(d + 1.1, 3), round(d + 1.3, 3)), ("the", round(d + 1.3, 3), round(d + 1.6, 3)),
        ("end", round(d + 1.6, 3), round(d + 2, 3))]


def test_empty_transcript_passes_through_without_loading_anything(alignment_runs):
    run = alignment_runs["runs"]["empty"]
    assert run["transcript"]["segments"] == [] and run["warnings"] == [] and run["metrics"]["fallback"] == 0


@pytest.mark.parametrize("job, message", [
    ("corrupt_audio", "audio is not a readable PCM WAV file"),
    ("invalid_json", "input 'transcript' is not valid Transcript JSON: Invalid JSON"),
    ("wrong_shape", "input 'transcript' is not valid Transcript JSON: segments.0.start="),
    ("language_mismatch", "the job says the audio is in 'hi' but the transcript is in 'en'"),
    ("unknown_language", "transcript language: unknown language code 'xx'"),
    ("translated", "the transcript is a translation (hi -> en)"),
])
def test_bad_input_is_refused_with_a_clear_message(alignment_runs, job, message):
    assert message in alignment_runs["runs"][job]["bad_input"]


def test_nothing_touched_the_network(alignment_runs):
    assert alignment_runs["nltk_downloads"] == []
    assert alignment_runs["network_attempts"] == []
