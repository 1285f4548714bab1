"""The media stages' FFmpeg from wheels (captionbus/core/mediatools.py): with no `ffmpeg`/`ffprobe` on PATH,
the `common` env's interpreter resolves imageio-ffmpeg's binary and probes through PyAV, and
PyAV's answer is the one ffprobe gives (the facts later stages read), and the same hostile-input
refusals hold (playlists, concat lists, text, truncated files)."""
from __future__ import annotations

import json
import shutil

import pytest

from tests import media as test_media
from tests.envtools import run_in_env

pytestmark = pytest.mark.skipif(not test_media.tools_available(), reason=test_media.MISSING)

SCRIPT = r"""
import json, sys
from pathlib import Path
from captionbus.core import mediatools
from captionbus.services import media
from captionbus.services.runtime.errors import BadInput
out = {"ffmpeg": mediatools.ffmpeg_path(), "ffprobe": mediatools.ffprobe_path(), "probes": {}}
for name, path in json.loads(sys.argv[1]).items():
    try:
        out["probes"][name] = {"summary": media.probe(Path(path)).summary()}
    except BadInput as e:
        out["probes"][name] = {"error": str(e)}
wav = Path(sys.argv[2])
media.run_ffmpeg([*media.guarded_input(media.probe(Path(json.loads(sys.argv[1])["video"]))),
                  "-vn", *mediatools.WAV_16K_MONO, "-f", "wav", mediatools.file_url(wav)],
                 duration=None, timeout_s=120)
out["decoded_s"] = media.wav_duration(wav)
print("RESULT " + json.dumps(out))
"""


def test_probe_and_decode_through_wheels_match_ffprobe(tmp_path, common_env):
    video, _ = test_media.speech_video(tmp_path / "talk.mp4", "one two three")
    secret = tmp_path / "secret.wav"
    test_media.speech_wav(secret, "this should never be read")
    (tmp_path / "concat.mp4").write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    files = {
        "video": video,
        "audio_only": test_media.speech_audio_only(tmp_path / "pod.m4a", "one two")[0],
        "hls": test_media.hls_playlist(tmp_path / "list.mp4", secret),
        "concat": tmp_path / "concat.mp4",
        "text": test_media.text_named_mp4(tmp_path / "notes.mp4"),
        "truncated": test_media.truncated_copy(video, tmp_path / "cut.mp4"),
    }
    hidden = test_media.path_without(("ffmpeg", "ffprobe"), tmp_path / "shadow")
    got = run_in_env("common", SCRIPT, json.dumps({k: str(v) for k, v in files.items()}), str(tmp_path / "a.wav"),
                     extra_env={"PATH": hidden})

    assert got["ffprobe"] is None and "imageio_ffmpeg" in got["ffmpeg"], got
    probes = got["probes"]
    if shutil.which("ffprobe"):  # the reference answer, from a real ffprobe
        from captionbus.services.media import probe

        for name in ("video", "audio_only"):
            mine, reference = dict(probes[name]["summary"]), probe(files[name]).summary()
            # FFmpeg versions differ (the system's 5.1, PyAV's own build) by a millisecond or so.
            assert mine.pop("duration") == pytest.approx(reference.pop("duration"), abs=0.01)
            assert mine == reference, name
    assert probes["video"]["summary"]["has_video"] and probes["video"]["summary"]["audio_codecs"] == ["aac"]
    assert probes["audio_only"]["summary"]["has_video"] is False
    assert "is a playlist" in probes["hls"]["error"] and "is a playlist" in probes["concat"]["error"]
    assert "text file" in probes["text"]["error"]
    assert "truncated or corrupt" in probes["truncated"]["error"]
    assert got["decoded_s"] == pytest.approx(probes["video"]["summary"]["duration"], abs=0.2)
