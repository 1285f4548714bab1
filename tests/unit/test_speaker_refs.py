"""Known speakers (issue 21): naming clusters after reference clips (core.name_clusters, numpy
only), and the reference clips at the door (captionbus.core.speaker_refs: the flag, the names,
FFmpeg's conversion to 16 kHz mono WAV with the 2-10 s rule, data URLs), and what the CLI's
--speaker-ref turns into."""
from __future__ import annotations

import base64
import json
import subprocess
import wave

import click
import numpy as np
import pytest
from click.testing import CliRunner

from captionbus.cli import parse_options, with_job_options
from captionbus.client import with_references
from captionbus.contracts import ArtifactRef
from captionbus.contracts.declarations.diarization import DiarizationParams
from captionbus.contracts.declarations.subtitle_gen import SubtitleGenParams
from captionbus.core import speaker_refs
from captionbus.services.diarization.core import WindowEmbeddings, centroids, name_clusters


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_a_cluster_takes_the_name_of_the_reference_it_matches_best():
    clusters = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])
    refs = {"Ben": unit(0.1, 1, 0), "Anna": unit(1, 0.2, 0)}
    assert name_clusters(clusters, refs, threshold=0.5) == {0: "Anna", 1: "Ben"}  # cluster 2 stays unnamed


def test_no_two_clusters_get_one_name_and_no_cluster_two_names():
    # two clusters of one voice (the count was set too high): the closer one gets the name
    clusters = np.stack([unit(1, 0.3, 0), unit(1, 0.1, 0)])
    assert name_clusters(clusters, {"Anna": unit(1, 0, 0)}, threshold=0.5) == {1: "Anna"}
    # one cluster alike to two references: the better one names it, the other names nobody
    assert name_clusters(unit(1, 0.1, 0)[None], {"Anna": unit(1, 0, 0), "Ann": unit(1, 0.5, 0)}, 0.5) == {0: "Anna"}


def test_below_the_threshold_nobody_is_named():
    clusters = np.stack([unit(1, 1, 0), unit(0, 0, 1)])
    assert name_clusters(clusters, {"Anna": unit(1, 0, 0)}, threshold=0.8) == {}  # cosine 0.71
    assert name_clusters(clusters, {"Anna": unit(1, 0, 0)}, threshold=0.7) == {0: "Anna"}
    assert name_clusters(clusters, {}, 0.5) == {}
    assert name_clusters(np.zeros((0, 3)), {"Anna": unit(1, 0, 0)}, 0.5) == {}


def test_centroids_are_the_normalised_means_of_each_labels_windows():
    windows = WindowEmbeddings(np.arange(4.0), np.arange(4.0) + 1.5,
                               np.array([[2, 0], [0, 1], [1, 0], [0, 3]], dtype=np.float32))
    got = centroids(windows, np.array([0, 1, 0, 1]))
    assert np.allclose(got, [[1, 0], [0, 1]])


# -- the door ------------------------------------------------------------------------------------

def tone(path, seconds: float, extra: list[str] | None = None):
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"sine=frequency=220:sample_rate=44100:duration={seconds}", "-ac", "2", *(extra or []), str(path)],
                   check=True, timeout=60)
    return path


def test_a_clip_becomes_16k_mono_wav_and_its_length_is_checked(tmp_path):
    out = speaker_refs.convert(tone(tmp_path / "anna.mp3", 4), tmp_path / "anna.wav", "--speaker-ref Anna=anna.mp3")
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert 3.9 <= w.getnframes() / 16000 <= 4.1
    with pytest.raises(speaker_refs.ReferenceError, match=r"^--speaker-ref Ben=b.wav is 1.0 s long; a reference clip is 2-10 s"):
        speaker_refs.convert(tone(tmp_path / "b.wav", 1), tmp_path / "b16.wav", "--speaker-ref Ben=b.wav")
    with pytest.raises(speaker_refs.ReferenceError, match=r"is 12.0 s long; a reference clip is 2-10 s"):
        speaker_refs.convert(tone(tmp_path / "c.wav", 12), tmp_path / "c16.wav", "clip c")
    with pytest.raises(speaker_refs.ReferenceError, match=r"is over 30.0 s long"):
        speaker_refs.convert(tone(tmp_path / "d.wav", 45), tmp_path / "d16.wav", "clip d")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wave file" * 10)
    with pytest.raises(speaker_refs.ReferenceError, match=r"^clip j is not audio FFmpeg can read \(.+\)$"):
        speaker_refs.convert(junk, tmp_path / "j16.wav", "clip j")
    with pytest.raises(speaker_refs.ReferenceError, match="no such file"):
        speaker_refs.convert(tmp_path / "missing.wav", tmp_path / "m16.wav", "clip m")


def test_a_playlist_clip_cannot_make_ffmpeg_read_other_files_of_the_host(tmp_path):
    """The attack a reviewer ran: an HLS playlist sent as a data URL that names a local mp3 (another
    tenant's upload); without the input guard FFmpeg decoded that file into the caller's reference."""
    (tmp_path / "victim").mkdir()
    (tmp_path / "up").mkdir()
    victim = tone(tmp_path / "victim" / "secret.mp3", 4)
    playlist = (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:4.0,\n{victim}\n#EXT-X-ENDLIST\n").encode()
    url = "data:audio/x-mpegurl;base64," + base64.b64encode(playlist).decode()
    raw = speaker_refs.from_data_url(url, tmp_path / "up" / "reference-0.raw", "known_speaker_references[0]")
    with pytest.raises(speaker_refs.ReferenceError, match=r"^known_speaker_references\[0\] is not audio FFmpeg can read") as e:
        speaker_refs.convert(raw, tmp_path / "up" / "reference-0.wav", "known_speaker_references[0]")
    assert str(tmp_path) not in str(e.value)  # and the caller is not told this host's paths
    assert not (tmp_path / "up" / "reference-0.wav").exists() or \
        (tmp_path / "up" / "reference-0.wav").stat().st_size < 1000


@pytest.mark.parametrize("flag,message", [
    ("Anna", "use NAME=CLIP"), ("=a.wav", "use NAME=CLIP"), ("Anna=", "use NAME=CLIP"),
    ("SPEAKER_01=a.wav", "SPEAKER_nn are the unnamed speakers' labels"), ("B=a.wav", "their places"),
    ("2=a.wav", "their places"), ("<b>=a.wav", "no spaces, none of"), ("Anna Smith=a.wav", "no spaces"),
    ("x" * 41 + "=a.wav", "1-40 characters"), ("Anna\u202e=a.wav", r"U\+202E \(Cf\) is a control or invisible"),
    ("Anna\u3000B=a.wav", "no spaces"),
])
def test_bad_flags_and_names_are_one_line(flag, message):
    with pytest.raises(speaker_refs.ReferenceError, match=message) as e:
        speaker_refs.parse_flag(flag)
    assert "\n" not in str(e.value)


# C1 controls, bidi marks / embeddings / overrides / isolates, the Arabic letter mark, zero-width
# characters and the BOM, line and paragraph separators: each can reorder or hide what a subtitle shows.
INVISIBLE = ["\x85", "\x9b", "\u200e", "\u200f", "\u061c", "\u202a", "\u202b", "\u202c", "\u202d",
             "\u202e", "\u2066", "\u2067", "\u2068", "\u2069", "\u200b", "\u200c", "\u200d", "\ufeff",
             "\u2028", "\u2029", "\x00", "\x1b"]


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_names_with_control_or_invisible_formatting_characters_are_refused_everywhere(char):
    """A known speaker's name (the diarization params, --speaker-ref, known_speaker_names[]) and an
    SDH name or key (--speaker-names, subtitle_gen's speaker_names) alike."""
    name = f"An{char}na"
    ref = ArtifactRef(key="a" * 64, name="anna.wav", size=1)
    with pytest.raises(ValueError):
        DiarizationParams(references={name: ref})
    with pytest.raises(speaker_refs.ReferenceError) as e:
        speaker_refs.check_name(name)
    assert "\n" not in str(e.value) and char not in str(e.value)  # one line, the character escaped
    with pytest.raises(ValueError):
        SubtitleGenParams(speaker_names={"A": name})
    with pytest.raises(ValueError):
        SubtitleGenParams(speaker_names=f"A={name}")
    with pytest.raises(ValueError):
        SubtitleGenParams(speaker_names={name: "Anna"})
    # what stays allowed: letters of any script, marks, a dot; spaces in an SDH name
    DiarizationParams(references={"Zoë": ref, "Dr.Ng": ref, "أحمد": ref, "राम": ref})
    assert SubtitleGenParams(speaker_names="A=Dr. Anna Ng,B=أحمد").speaker_names == {"A": "Dr. Anna Ng", "B": "أحمد"}


def test_counts_and_doubles():
    speaker_refs.check_count(["Anna", "Ben"], 4)
    with pytest.raises(speaker_refs.ReferenceError, match="5 known speakers; at most 4"):
        speaker_refs.check_count(list("abcde"), 4)
    with pytest.raises(speaker_refs.ReferenceError, match="'Anna' has two reference clips"):
        speaker_refs.check_count(["Anna", "Ben", "Anna"], 4)


def test_data_urls(tmp_path):
    clip = tone(tmp_path / "a.wav", 3)
    url = "data:audio/wav;base64," + base64.b64encode(clip.read_bytes()).decode()
    raw = speaker_refs.from_data_url(url, tmp_path / "a.raw", "known_speaker_references[0]")
    assert raw.read_bytes() == clip.read_bytes()
    for bad, message in [("https://example.com/a.wav", "not a data URL"),
                         ("data:text/plain;base64,aGk=", "data URL of text/plain, not audio"),
                         ("data:audio/wav,RIFF", "base64-encoded"),
                         ("data:audio/wav;base64,@@@", "damaged"), ("data:audio/wav;base64,", "empty")]:
        with pytest.raises(speaker_refs.ReferenceError, match=message):
            speaker_refs.from_data_url(bad, tmp_path / "x.raw", "known_speaker_references[0]")


def test_known_speakers_are_named_in_the_subtitles_under_the_users_names():
    assert speaker_refs.sdh_names(["Anna", "Ben"]) == {"Anna": "Anna", "Ben": "Ben"}
    assert speaker_refs.sdh_names(["Anna"], "A=Annie,SPEAKER_02=Carl") == {"Anna": "Anna", "A": "Annie",
                                                                             "SPEAKER_02": "Carl"}
    assert speaker_refs.sdh_names(["Anna"], {"Anna": "Dr. Anna"}) == {"Anna": "Dr. Anna"}


def test_uploaded_references_become_the_diarization_params():
    ref = ArtifactRef(key="a" * 64, name="reference-0.wav", size=10)
    options = with_references({"diarization": {"speakers": "2"}, "asr": {"model": "base"}}, {"Anna": ref})
    assert options["asr"] == {"model": "base"}
    params = DiarizationParams(**options["diarization"])
    assert params.speakers == "2" and params.references == {"Anna": ref}
    assert with_references({}, {"Anna": ref})["diarization"]["speakers"] == "auto"
    with pytest.raises(ValueError, match="SPEAKER_nn"):
        DiarizationParams(references={"SPEAKER_00": ref})


@click.command()
@with_job_options
def probe(workflow, source, targets, options, speaker_refs=None):
    click.echo(json.dumps({"options": parse_options(options),
                           "refs": {k: str(v) for k, v in (speaker_refs or {}).items()},
                           "sizes": {k: v.stat().st_size for k, v in (speaker_refs or {}).items()}}))


def test_the_flag_converts_clips_switches_speakers_on_and_names_them(tmp_path):
    anna, ben = tone(tmp_path / "anna.mp3", 3), tone(tmp_path / "ben.ogg", 5)
    result = CliRunner().invoke(probe, ["--speaker-ref", f"Anna={anna}", "--speaker-ref", f"Ben={ben}",
                                        "--speaker-names", "C=Carl"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.output)
    assert parsed["options"] == {"diarization": {"speakers": "auto"},
                                 "subtitle_gen": {"speaker_names": {"Anna": "Anna", "Ben": "Ben", "C": "Carl"}}}
    assert list(parsed["refs"]) == ["Anna", "Ben"] and all(v.endswith(".wav") for v in parsed["refs"].values())
    assert 90_000 < parsed["sizes"]["Anna"] < 100_000  # 3 s of 16 kHz 16-bit mono
    # --speakers given: kept; a workflow without subtitles gets no names
    result = CliRunner().invoke(probe, ["-w", "translate", "--speakers", "2", "--speaker-ref", f"Anna={anna}"])
    assert json.loads(result.output)["options"] == {"diarization": {"speakers": "2"}}


def test_a_bad_clip_is_refused_before_anything_with_one_line(tmp_path):
    short = tone(tmp_path / "short.wav", 1)
    result = CliRunner().invoke(probe, ["--speaker-ref", f"Anna={short}"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"error: --speaker-ref Anna={short} is 1.0 s long; a reference clip is 2-10 s of one speaker")
    result = CliRunner().invoke(probe, ["--speaker-ref", f"Anna={tmp_path / 'none.wav'}"])
    assert result.exit_code == 2 and "none.wav: no such file" in result.output
