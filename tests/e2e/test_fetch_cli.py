"""`submit --json` for scripts, then `fetch JOB` for the outputs later, against a running stack."""
from __future__ import annotations

import json

from tests.e2e.conftest import CLI_POLL_S, wait_until
from tests.e2e.test_fleet_cli import cli, status_of
from tests.media import ENGLISH_SENTENCE, ffprobe_json, speech_video


def test_submit_json_then_fetch_outputs(stack, tmp_path):
    video, _ = speech_video(tmp_path / "talk.mp4", ENGLISH_SENTENCE)
    done = cli(stack, tmp_path, "submit", str(video), "-s", "en", "--json")
    assert done.returncode == 0, done.stderr
    submitted = json.loads(done.stdout)
    job_id = submitted["job_id"]
    assert submitted["workflow"] == "transcribe" and submitted["input"] == "talk.mp4"

    early = cli(stack, tmp_path, "fetch", "no-such-job")
    assert early.returncode == 2 and "no job 'no-such-job'" in early.stderr

    wait_until(lambda: status_of(stack, tmp_path, job_id)["status"] == "completed", 240, "completed", CLI_POLL_S)
    out = tmp_path / "fetched"
    fetched = cli(stack, tmp_path, "fetch", job_id, "--out", str(out))
    assert fetched.returncode == 0, fetched.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {"talk.srt", "talk.vtt", "talk.subtitled.mp4", "talk.subtitled.mkv", "talk.transcript.json"}
    assert sorted(fetched.stdout.split()) == sorted(str(out / name) for name in names)
    assert "-->" in (out / "talk.srt").read_text()
    assert any(s["codec_type"] == "subtitle" for s in ffprobe_json(out / "talk.subtitled.mkv")["streams"])
