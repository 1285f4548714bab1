"""core.text.without_paths: what a stage's failure reason keeps of a path when it goes into the
job's record (API keys and bus tenants read it): the last part, never the folders above it."""
from __future__ import annotations

import pytest

from captionbus.core.text import without_paths

CUT = [
    ("ArtifactMissing: 'talk.wav' is not in this host's artifact root (/home/w/.captionbus/artifacts) nor in bucket",
     "ArtifactMissing: 'talk.wav' is not in this host's artifact root (…/artifacts) nor in bucket"),
    ("FileNotFoundError: [Errno 2] No such file or directory: '/srv/cb/work/ab12/audio.wav'",
     "FileNotFoundError: [Errno 2] No such file or directory: '…/audio.wav'"),
    ("ffmpeg: file:/home/w/work/in.mp4: Invalid data", "ffmpeg: file:…/in.mp4: Invalid data"),
    ("ffmpeg: file:///home/w/work/in.mp4: Invalid data", "ffmpeg: file://…/in.mp4: Invalid data"),
    ("artifact root unwritable (dir:/srv/cb/artifacts)", "artifact root unwritable (dir:…/artifacts)"),
    ("scp target host:/srv/cb/models/whisper refused", "scp target host:…/whisper refused"),
    ("no model at /models/whisper-large.", "no model at …/whisper-large."),
    ("set CAPTIONBUS_ASR_MODEL (~/models/base/ is empty)", "set CAPTIONBUS_ASR_MODEL (…/base/ is empty)"),
]
KEPT = [
    "RuntimeError: noop was asked to crash",
    "nats://127.0.0.1:4222 and https://example.org/a/b refused",  # URLs are not this host's files
    "s3://captionbus-artifacts/ab12/talk.wav and tls://nats.example:4222/ refused",
    "at 10:30/45 s",
    "and/or MP2/3 text/plain 1/2 a / b /",  # a slash inside a word, or alone
]


@pytest.mark.parametrize(("line", "shown"), CUT)
def test_a_path_keeps_its_last_part_only(line: str, shown: str):
    assert without_paths(line) == (shown, True)


@pytest.mark.parametrize("line", KEPT)
def test_a_line_without_a_path_is_left_as_it_is(line: str):
    assert without_paths(line) == (line, False)
