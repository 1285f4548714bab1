"""The diarization stage's handler for real, in the `diarization` env, through the runtime's test
context (captionbus/services/runtime/testing.py): the ~60 s dialogue of four recorded human voices
(tests/speakers_media.py) -> the vad stage's Silero regions -> diarization -> turns.json, scored
against the dialogue's ground truth with pyannote.metrics (DER, 0.25 s collar each side).

The handler reads the film block by block (BLOCK_S); run with 20 s blocks it must give the same
turns as with the default (one block here), since windows are placed per region and a region is
never split. Bounds: docs/speakers.md measured CAM++ on this dialogue at DER 1.6 %, 4/4 speakers;
the test allows 10 % (the issue's goal)."""
from __future__ import annotations

import json

import pytest

from tests import speakers_media
from tests.envtools import run_in_env

RUNNER = r"""
import json, sys
from pathlib import Path
import structlog
from pyannote.core import Annotation, Segment
from pyannote.metrics.diarization import DiarizationErrorRate
from captionbus.services.runtime import BadInput, SetupContext
from captionbus.services.runtime.testing import artifact_ref, make_fake_context
from captionbus.services.vad.stage import STAGE as VAD
from captionbus.services.diarization import stage as diarization

wav, models_dir, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
clips = {name: Path(path) for name, path in json.loads(sys.argv[4]).items()}
log = structlog.get_logger()
vad = VAD.setup(SetupContext(stage="vad", env="diarization", models_dir=models_dir, log=log))
ctx = make_fake_context(work / "vad", "vad", inputs={"audio": wav}, resources=vad)
regions = VAD.handle(ctx.request, ctx)["regions"]
resources = diarization.STAGE.setup(SetupContext(stage="diarization", env="diarization", models_dir=models_dir,
                                                 log=log, options={"threads": 2}))
reference = Annotation()
for line in wav.with_suffix(".rttm").read_text().splitlines():
    f = line.split()
    reference[Segment(float(f[3]), float(f[3]) + float(f[4]))] = f[7]

def run(name, params, block_s=diarization.BLOCK_S, audio=wav, regions=regions, refs=None):
    saved, diarization.BLOCK_S = diarization.BLOCK_S, block_s
    refs = {who: artifact_ref(clips[clip]) for who, clip in (refs or {}).items()}
    if refs:
        params = {**params, "references": {who: ref.model_dump(mode="json") for who, ref in refs.items()}}
    ctx = make_fake_context(work / name, "diarization", inputs={"audio": audio, "regions": regions},
                            params=params, resources=resources)
    ctx.artifacts = {artifact_ref(path).key: path for path in clips.values()}  # what the bus would fetch
    try:
        out = json.loads(diarization.STAGE.handle(ctx.request, ctx)["turns"].read_text())
    except BadInput as bad:
        return {"bad_input": str(bad)}
    finally:
        diarization.BLOCK_S = saved
    hyp = Annotation()
    for t in out["turns"]:
        hyp[Segment(t["start"], t["end"])] = t["speaker"]
    d = DiarizationErrorRate(collar=0.5)(reference, hyp, detailed=True)
    return {"out": out, "der": d["diarization error rate"], "progress": ctx.progress_events,
            "warnings": ctx.warnings, "metrics": ctx.metrics}

results = {"describe": diarization.STAGE.describe_model(resources),
           "auto": run("auto", {"speakers": "auto"}),
           "blocks": run("blocks", {"speakers": "auto"}, block_s=20.0),
           "two": run("two", {"speakers": 2}),
           "zero": run("zero", {"speakers": "0"})}
empty = work / "empty.json"
empty.write_text(json.dumps({"backend": "silero", "duration": 60.0, "regions": []}))
results["no_speech"] = run("no_speech", {}, regions=empty)
tiny = work / "tiny.json"
tiny.write_text(json.dumps({"backend": "silero", "duration": 60.0, "regions": [{"start": 1.0, "end": 1.2}]}))
results["tiny"] = run("tiny", {}, regions=tiny)
# known speakers: two of the four voices named from clips of other lines of theirs; a 1 s clip
results["known"] = run("known", {"speakers": "auto"}, refs={"Anna": "anna", "Carl": "carl"})
results["known_blocks"] = run("known_blocks", {"speakers": "auto"}, block_s=20.0, refs={"Anna": "anna", "Carl": "carl"})
results["bad_ref"] = run("bad_ref", {"speakers": "auto"}, refs={"Anna": "short"})
results["not_wav"] = run("not_wav", {"speakers": "auto"}, refs={"Anna": "junk"})
print("RESULT " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from captionbus import models
    from captionbus.core import settings

    models.ensure_campplus()
    models.ensure_silero_vad()
    work = tmp_path_factory.mktemp("diarization")
    wav = work / "short.wav"
    speakers_media.make(wav, speakers_media.short_plan(), seed=0)
    clips = {"anna": speakers_media.reference_clip(work / "anna.wav", "nl-small", seed=0),
             "carl": speakers_media.reference_clip(work / "carl.wav", "cs-big", seed=0, lines=3),
             "short": speakers_media.write_wav(work / "short-ref.wav", speakers_media.np.zeros(16000))}
    clips["junk"] = work / "junk.wav"
    clips["junk"].write_bytes(b"not a wave file")
    return run_in_env("diarization", RUNNER, str(wav), str(settings.load().models_dir), str(work),
                      json.dumps({k: str(v) for k, v in clips.items()}), timeout=1800)


def test_four_voices_are_four_speakers_with_their_models_named(runs):
    auto = runs["auto"]
    out = auto["out"]
    assert out["speakers"] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_02", "SPEAKER_03"], out["speakers"]
    assert auto["der"] <= 0.10, auto["der"]
    assert out["requested"] == "auto" and out["models"]["regions"] == "silero"
    assert out["models"]["embedder"].startswith("campplus (campplus_cn_en_common.pt")
    assert {"torch", "scikit-learn", "numpy"} <= set(out["versions"]), out["versions"]
    starts = [t["start"] for t in out["turns"]]
    assert starts == sorted(starts) and all(t["end"] > t["start"] for t in out["turns"])
    # the first voice of the dialogue (nl-small) is SPEAKER_00: labels in order of first appearance
    truth = speakers_media.dialogue(speakers_media.short_plan(), seed=0)[1]
    first = next(t for t in out["turns"] if t["end"] > truth[0].start)
    assert first["speaker"] == "SPEAKER_00"
    assert auto["metrics"]["speakers"] == 4 and auto["metrics"]["windows"] >= 40
    assert runs["describe"] == "campplus (campplus_cn_en_common.pt)"


def test_progress_per_block_and_blocks_change_nothing(runs):
    assert runs["blocks"]["out"]["turns"] == runs["auto"]["out"]["turns"]
    fractions = [f for f, _ in runs["blocks"]["progress"]]
    assert len(fractions) >= 4 and fractions == sorted(fractions) and fractions[-1] == 1.0, fractions
    assert runs["blocks"]["progress"][-1][1] == "4 speakers, %d turns" % len(runs["auto"]["out"]["turns"])


def test_a_fixed_count_is_kept_and_a_bad_one_is_bad_input(runs):
    assert runs["two"]["out"]["speakers"] == ["SPEAKER_00", "SPEAKER_01"] and runs["two"]["out"]["requested"] == "2"
    assert "need 1 <= MIN <= MAX <= 20" in runs["zero"]["bad_input"], runs["zero"]


def test_no_speech_is_no_turns_and_a_warning(runs):
    none = runs["no_speech"]
    assert none["out"]["turns"] == [] and none["out"]["speakers"] == []
    assert none["warnings"] == ["no speech regions in the audio: no speaker turns"], json.dumps(none)
    tiny = runs["tiny"]  # 0.2 s of speech: too short to embed, said so
    assert tiny["out"]["turns"] == [] and "too short for a speaker embedding" in tiny["warnings"][0], json.dumps(tiny)


def test_known_speakers_name_the_clusters_their_clips_match(runs):
    """Clips of other lines of two actors (tests/speakers_media.reference_clip: lines this
    dialogue does not use) name those two voices; the other two keep their SPEAKER_nn labels;
    the turns are the unnamed run's, only relabelled."""
    auto, known = runs["auto"]["out"], runs["known"]["out"]
    truth = speakers_media.dialogue(speakers_media.short_plan(), seed=0)[1]
    label_of = {}
    for t in truth:  # the label the unnamed run gave each actor (the one covering their turn's middle)
        middle = (t.start + t.end) / 2
        label_of.setdefault(t.speaker, next(x["speaker"] for x in auto["turns"] if x["start"] <= middle <= x["end"]))
    names = {"nl-small": "Anna", "cs-big": "Carl"}
    rename = {label_of[actor]: names.get(actor, label_of[actor]) for actor in label_of}
    assert [(t["start"], t["end"], rename[t["speaker"]]) for t in auto["turns"]] == [
        (t["start"], t["end"], t["speaker"]) for t in known["turns"]]
    assert sorted(known["speakers"]) == sorted(rename.values()) and {"Anna", "Carl"} <= set(known["speakers"])
    assert sum(s.startswith("SPEAKER_") for s in known["speakers"]) == 2
    assert known["models"]["references"].startswith("2 known speakers, centroid cosine >= ")
    assert runs["known_blocks"]["out"]["turns"] == known["turns"]


def test_a_bad_reference_clip_is_bad_input(runs):
    assert runs["bad_ref"]["bad_input"] == "the reference clip of 'Anna' is 1.0 s; a reference clip is 2-10 s"
    assert runs["not_wav"]["bad_input"].startswith("the reference clip of 'Anna' is not a readable PCM WAV file")
