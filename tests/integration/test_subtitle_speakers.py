"""subtitle_gen with speakers, end to end through the stage's handler (captionbus.services.runtime.testing:
params parsed by its declared model, the transcript read as the runtime reads it), and its
WebVTT read back by a real WebVTT parser: Chromium's, the one a web player uses, which turns
each `<v Name>` voice span into a span titled with the voice (HTML's getCueAsHTML)."""
from __future__ import annotations

import base64
import importlib.util
import shutil
from pathlib import Path

import pysubs2
import pytest

from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.core.subtitles import check_file, load_rules
from captionbus.services.runtime.testing import make_fake_context
from captionbus.services.subtitle_gen.stage import STAGE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER = Path(CHROMIUM).exists() and importlib.util.find_spec("playwright") is not None

# A quick exchange, a third voice, and a speaker who carries on after a pause.
TURNS = [("Are you coming?", 1.0, "SPEAKER_00"), ("In a minute.", 1.95, "SPEAKER_01"),
         ("Hurry up.", 2.9, "SPEAKER_00"), ("Okay.", 3.55, "SPEAKER_01"),
         ("Nobody told me you were both here.", 5.0, "SPEAKER_02"),
         ("We came back for the letters.", 9.0, "SPEAKER_00"),
         ("The ones your father left.", 13.0, "SPEAKER_00")]


def _transcript(path: Path) -> Path:
    segments = []
    for text, start, speaker in TURNS:
        words = [Word(text=t, start=round(start + 0.3 * i, 3), end=round(start + 0.3 * i + 0.25, 3), speaker=speaker)
                 for i, t in enumerate(text.split())]
        segments.append(Segment(start=words[0].start, end=words[-1].end, text=text, words=words))
    path.write_text(Transcript(language="en", segments=segments).model_dump_json())
    return path


def browser_cues(vtt: Path) -> list[dict]:
    """Each cue as Chromium parsed it: start, end, its text, and its voice spans as [voice, text]."""
    from playwright.sync_api import sync_playwright

    url = "data:text/vtt;base64," + base64.b64encode(vtt.read_bytes()).decode()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_content(f'<video><track id="t" kind="subtitles" default src="{url}"></video>')
            return page.evaluate("""() => new Promise((ok, bad) => {
              const el = document.getElementById('t');
              el.track.mode = 'hidden';
              const done = () => ok(Array.from(el.track.cues).map(c => ({
                start: c.startTime, end: c.endTime, text: c.getCueAsHTML().textContent,
                voices: Array.from(c.getCueAsHTML().querySelectorAll('span[title]'))
                             .map(s => [s.title, s.textContent])})));
              if (el.readyState === 2) done();
              el.addEventListener('load', done);
              el.addEventListener('error', () => bad('the browser could not parse the WebVTT file'));
              setTimeout(() => bad('the track did not load in 10 s'), 10000);
            })""")
        finally:
            browser.close()


def test_subtitle_gen_speakers_through_the_stage_and_a_browser(tmp_path):
    ctx = make_fake_context(tmp_path / "work", "subtitle_gen",
                            inputs={"transcript": _transcript(tmp_path / "transcript.json")},
                            params={"speaker_names": "Anna,Ben", "formats": ["srt", "vtt", "json"]})
    outputs = STAGE.handle(ctx.request, ctx)
    rules = load_rules(language="en")
    for fmt in ("srt", "vtt", "json"):
        report = check_file(outputs[fmt], rules)
        assert report.ok, report.render()

    srt = outputs["srt"].read_text(encoding="utf-8")
    assert "-[Anna] Hurry up.\n-[Ben] Okay.\n" in srt
    assert srt.count("[Anna]") == 3  # each time Anna starts talking after someone else, not after a pause
    assert "SPEAKER_02" not in srt and "Nobody told me" in srt  # an unnamed third speaker: no name shown
    srt_cues = pysubs2.load(str(outputs["srt"]))
    assert "The ones your father left." in [e.plaintext for e in srt_cues]  # Anna again after 2.2 s: no name
    assert all(e.plaintext.count("\n") <= 1 for e in srt_cues)

    if not BROWSER:
        pytest.skip("no playwright or no chromium: the WebVTT voice spans were not parsed back")
    cues = browser_cues(outputs["vtt"])
    assert [(round(c["start"] * 1000), round(c["end"] * 1000)) for c in cues] == [(e.start, e.end) for e in srt_cues]
    voices = [[v for v, _ in c["voices"]] for c in cues]
    assert ["Anna", "Ben"] in voices  # a dialogue cue: one voice span per speaker
    assert all(len(v) in (1, 2) for v in voices) and ["SPEAKER_02"] in voices
    for cue, event in zip(cues, srt_cues):  # the spans hold exactly the SRT's lines, speaker by speaker
        assert "\n".join(text for _, text in cue["voices"]) == event.plaintext
    for cue in cues:  # a dialogue cue's spans are its dashed lines, named where names were given
        if len(cue["voices"]) == 2:
            assert all(text.startswith(f"-[{voice}] ") for voice, text in cue["voices"]), cue


def test_muxed_tracks_carry_the_dialogue_lines_and_names(tmp_path):
    """The SRT subtitle_gen writes is what mux puts in the mp4 (mov_text) and mkv (subrip): the
    dialogue dashes and names survive into the tracks a player reads."""
    import subprocess

    from captionbus.services.mux.stage import STAGE as MUX
    from tests import media as test_media

    if not test_media.tools_available():
        pytest.skip(test_media.MISSING)
    ctx = make_fake_context(tmp_path / "subs", "subtitle_gen",
                            inputs={"transcript": _transcript(tmp_path / "transcript.json")},
                            params={"speaker_names": "A=Anna,B=Ben", "formats": ["srt"]})
    srt = STAGE.handle(ctx.request, ctx)["srt"]
    written = [(e.start, e.end, e.plaintext) for e in pysubs2.load(str(srt))]
    video, _ = test_media.speech_video(tmp_path / "speech.mp4")
    mux = make_fake_context(tmp_path / "mux", "mux", inputs={"media": video}, input_lists={"subtitles": [srt]},
                            params={"languages": ["en"]})
    outputs = MUX.handle(mux.request, mux)
    for container in ("mp4", "mkv"):
        track = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(outputs[container]), "-map", "0:s:0",
                                "-f", "srt", "-"], check=True, capture_output=True, text=True, timeout=60).stdout
        read = [(e.start, e.end, e.plaintext) for e in pysubs2.SSAFile.from_string(track, format_="srt")]
        assert [text for _, _, text in read] == [text for _, _, text in written], container
        assert "-[Anna] Hurry up.\n-[Ben] Okay." in [text for _, _, text in read]
        # Times within the ~23 ms an AAC start offset can shift them (shared/FACTS.md).
        assert all(abs(a[0] - b[0]) <= 30 and abs(a[1] - b[1]) <= 30 for a, b in zip(read, written)), container


def test_cue_text_with_markup_characters_reads_back_literally_in_a_browser(tmp_path):
    """`<`, `&` and `-->` in what was said reach the viewer as said (WebVTT escapes written by
    core.subtitles.formats), with and without a voice span."""
    from captionbus.core.subtitles.cues import Cue
    from captionbus.core.subtitles.formats import write_subtitles

    if not BROWSER:
        pytest.skip("no playwright or no chromium: the WebVTT text was not parsed back")
    lines = [["x < y & AT&T", "{laughs} a --> b"], ["-Hi <3 &amp;", "-Bye"]]
    vtt = write_subtitles([Cue(0, 1000, lines[0]), Cue(1000, 2000, lines[1], voices=["A&B", "C"])],
                          tmp_path / "marks.vtt")
    cues = browser_cues(vtt)
    assert [c["text"] for c in cues] == ["\n".join(lines[0]), "\n".join(lines[1])]
    assert cues[1]["voices"] == [["A&B", "-Hi <3 &amp;"], ["C", "-Bye"]]
