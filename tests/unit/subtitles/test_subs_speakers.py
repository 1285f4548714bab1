"""Speakers in subtitles: dialogue cues, no line with two speakers, names, WebVTT voices, and the
checker's speaker rules -- on synthetic transcripts with known turns."""
from __future__ import annotations

import html

from pathlib import Path

import pysubs2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from subtitle_invariants import assert_valid

from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.core.subtitles import Cue, build_cues, check_cues, load_rules
from captionbus.core.subtitles.formats import read_subtitles, render, write_subtitles
from captionbus.core.subtitles.speakers import resolve_names

RULES = load_rules()
GOLDEN = Path(__file__).parent / "golden"


def turn(text: str, start: float, speaker: str | None, per_word: float = 0.3, on_words: bool = True) -> Segment:
    """One speaker's utterance; the speaker on each word (diarization's assignment) or on the segment."""
    words = [Word(text=t, start=round(start + i * per_word, 3), end=round(start + (i + 1) * per_word - 0.05, 3),
                  speaker=speaker if on_words else None) for i, t in enumerate(text.split())]
    return Segment(start=words[0].start, end=words[-1].end, text=text, words=words,
                   speaker=None if on_words else speaker)


def words_of(tr: Transcript) -> list[Word]:
    return [w for s in tr.segments for w in s.words]


def cues_for(tr: Transcript, rules=RULES, **kw):
    result = build_cues(tr, rules, **kw)
    if not kw.get("speaker_names"):  # names make a line longer than its words
        assert_valid(result, words_of(tr), rules)
    return result


FAST_EXCHANGE = [("Are you coming?", 1.0, "SPEAKER_00"), ("In a minute.", 1.95, "SPEAKER_01"),
                 ("Hurry up.", 2.9, "SPEAKER_00"), ("Okay.", 3.55, "SPEAKER_01")]


@pytest.mark.parametrize("language, fmt", [("en", "srt"), ("en", "vtt"), ("en", "ass"), ("en", "txt"),
                                           ("en", "json"), ("hi", "vtt")])
def test_without_speakers_every_format_is_byte_identical_to_before(language, fmt):
    """golden/nospeakers/ was written by the engine before speakers existed (commit 791c4ad) from
    the golden transcripts with their speakers removed."""
    expected = GOLDEN / "nospeakers" / f"{language}.{fmt}"
    tr = Transcript.model_validate_json((GOLDEN / f"{language}_transcript.json").read_text(encoding="utf-8"))
    for seg in tr.segments:
        seg.speaker = None
    result = build_cues(tr, load_rules(language=language))
    assert all(not c.voices for c in result.cues)
    assert render(result.cues, fmt) == expected.read_text(encoding="utf-8")


def test_two_speakers_alternating_fast_share_dialogue_cues():
    tr = Transcript(language="en", segments=[turn(*t) for t in FAST_EXCHANGE])
    result = cues_for(tr)
    assert check_cues(result.cues, RULES) == []
    dialogue = [c for c in result.cues if len(set(c.voices)) == 2]
    assert dialogue, [c.lines for c in result.cues]
    assert ["-Hurry up.", "-Okay."] in [c.lines for c in dialogue]
    for c in dialogue:
        assert c.voices == ["SPEAKER_00", "SPEAKER_01"]
    srt = render(result.cues, "srt")
    assert "-Hurry up.\n-Okay.\n" in srt and "<v" not in srt  # SRT stays plain


def test_turns_with_room_to_read_stay_separate_cues():
    """A dialogue cue is for exchanges too quick for a cue each; with time, one speaker per cue."""
    tr = Transcript(language="en", segments=[turn("Where is everyone?", 1.0, "A"),
                                             turn("They left about an hour ago.", 3.0, "B")])
    result = cues_for(tr)
    assert [c.lines for c in result.cues] == [["Where is everyone?"], ["They left about an hour ago."]]
    assert [c.voices for c in result.cues] == [["A"], ["B"]]


def test_dialogue_dash_style_is_a_rule():
    tr = Transcript(language="en", segments=[turn(*t) for t in FAST_EXCHANGE])
    rules = load_rules(dialogue_dash="- ")
    result = cues_for(tr, rules)
    assert ["- Hurry up.", "- Okay."] in [c.lines for c in result.cues]
    assert check_cues(result.cues, rules) == []


def test_a_speaker_continuing_after_a_pause_keeps_the_screen_without_dashes_or_a_second_name():
    tr = Transcript(language="en", segments=[
        turn("I came back for the letters.", 1.0, "SPEAKER_00"),
        turn("Nobody believed me at first.", 5.0, "SPEAKER_00"),  # 2.6 s of silence: a new cue
    ])
    plain = cues_for(tr)
    assert [c.lines for c in plain.cues] == [["I came back for the letters."], ["Nobody believed me at first."]]
    named = build_cues(tr, RULES, speaker_names={"A": "Anna"})
    assert [c.lines for c in named.cues] == [["[Anna] I came back for the letters."], ["Nobody believed me at first."]]
    assert [c.voices for c in named.cues] == [["Anna"], ["Anna"]]


def test_three_speakers_never_share_a_cue():
    tr = Transcript(language="en", segments=[turn("Yes.", 1.0, "A"), turn("No.", 1.4, "B"),
                                             turn("Maybe.", 1.8, "C"), turn("Why?", 2.3, "A"),
                                             turn("Because.", 2.7, "B"), turn("Fine.", 3.2, "C")])
    result = cues_for(tr)
    assert all(len(set(c.voices)) <= 2 and len(c.lines) <= 2 for c in result.cues)
    assert not [v for v in check_cues(result.cues, RULES) if v.rule in ("speaker_line", "dialogue")]
    # Every word is said by the voice of the line it is on.
    for c in result.cues:
        for line, voice in zip(c.lines, c.voices):
            said = [w for w in c.words if w.text in line.split() or "-" + w.text in line.split()]
            assert said and {w.speaker for w in said} == {voice}, (line, voice)


def test_a_turn_inside_a_segment_never_shares_a_line():
    """Diarization can change speaker in the middle of an ASR segment: the words decide."""
    words = [Word(text=t, start=1.0 + 0.3 * i, end=1.25 + 0.3 * i, speaker="SPEAKER_00" if i < 9 else "SPEAKER_01")
             for i, t in enumerate("So we went down to the river that morning, and nobody said a word.".split())]
    tr = Transcript(language="en", segments=[Segment(start=1.0, end=5.0, text="", words=words)])
    result = cues_for(tr)
    assert check_cues(result.cues, RULES) == []
    for c in result.cues:
        for line in c.lines:
            on_line = [w for w in c.words if w.text in line.lstrip("-").split()]
            assert len({w.speaker for w in on_line}) == 1, line


def test_segment_speakers_work_like_word_speakers():
    on_words = cues_for(Transcript(language="en", segments=[turn(*t) for t in FAST_EXCHANGE]))
    on_segments = cues_for(Transcript(language="en", segments=[turn(*t, on_words=False) for t in FAST_EXCHANGE]))
    assert [(c.start_ms, c.end_ms, c.lines, c.voices) for c in on_words.cues] == \
           [(c.start_ms, c.end_ms, c.lines, c.voices) for c in on_segments.cues]


def test_names_by_place_or_label_and_their_styles():
    order = ["SPEAKER_03", "SPEAKER_00", "SPEAKER_07"]
    assert resolve_names({"A": "Anna", "B": "Ben"}, order) == {"SPEAKER_03": "Anna", "SPEAKER_00": "Ben"}
    assert resolve_names({"1": "Anna", "3": "Cleo"}, order) == {"SPEAKER_03": "Anna", "SPEAKER_07": "Cleo"}
    assert resolve_names({"SPEAKER_00": "Ben"}, order) == {"SPEAKER_00": "Ben"}
    # A label wins over a place: with labels "A" and "B", A is the label, whenever it first speaks.
    assert resolve_names({"A": "Anna"}, ["B", "A"]) == {"A": "Anna"}
    assert resolve_names({"Z": "Zed", "9": "Nine"}, order) == {}  # no 26th or 9th speaker

    tr = Transcript(language="en", segments=[turn(*t) for t in FAST_EXCHANGE])
    named = build_cues(tr, RULES, speaker_names={"SPEAKER_00": "Anna", "2": "Ben"})
    srt = render(named.cues, "srt")
    assert "[Anna] Are you coming?" in srt and "[Ben] In a minute." in srt
    assert check_cues(named.cues, RULES) == []
    colon = build_cues(tr, RULES, speaker_names={"A": "Anna"}, name_style="colon")
    text = render(colon.cues, "srt")
    assert "ANNA: Are you coming?" in text and "ANNA: Hurry up." in text and "[" not in text
    assert "Ben" not in text  # an unnamed speaker shows no name
    with pytest.raises(ValueError, match="unknown speaker name style"):
        build_cues(tr, RULES, speaker_names={"A": "Anna"}, name_style="shout")


def test_vtt_voice_spans_per_speaker_and_names_escaped(tmp_path):
    tr = Transcript(language="en", segments=[turn(*t) for t in FAST_EXCHANGE])
    result = build_cues(tr, RULES, speaker_names={"A": "Anna & Co"})
    vtt = render(result.cues, "vtt")
    # the name in the span and the same name in the cue text are both escaped (WebVTT cue text)
    assert "<v Anna &amp; Co>-[Anna &amp; Co] Hurry up.</v>\n<v SPEAKER_01>-Okay.</v>" in vtt
    # pysubs2 reads the file back (tags are not text), so checking a file sees the dashes.
    back = read_subtitles(write_subtitles(result.cues, tmp_path / "out.vtt"))
    assert ["-[Anna & Co] Hurry up.", "-Okay."] in [c.lines for c in back]
    assert [html.unescape(e.plaintext) for e in pysubs2.load(str(tmp_path / "out.vtt"))] == [
        c.text for c in result.cues]
    # JSON keeps the voices; ASS names the first speaker.
    again = read_subtitles(write_subtitles(result.cues, tmp_path / "out.json"))
    assert [c.voices for c in again] == [c.voices for c in result.cues]
    assert [e.name for e in pysubs2.load(str(write_subtitles(result.cues, tmp_path / "out.ass")))] == \
           [c.speaker for c in result.cues]


def _cue(lines, words=(), voices=()):
    return Cue(0, 2000, list(lines), list(words), None, list(voices))


def _w(text, speaker):
    return Word(text=text, start=0.0, end=0.5, speaker=speaker)


@pytest.mark.parametrize("cue, rules_broken", [
    (_cue(["Are you coming? In a minute."],
          [_w("Are", "A"), _w("you", "A"), _w("coming?", "A"), _w("In", "B"), _w("a", "B"), _w("minute.", "B")]),
     ["speaker_line", "dialogue"]),
    (_cue(["-Are you coming?", "-In a minute."],
          [_w("Are", "A"), _w("you", "A"), _w("coming?", "A"), _w("In", "B"), _w("a", "B"), _w("minute.", "B")]),
     []),
    (_cue(["-Yes. -No.", "-Maybe."], [_w("Yes.", "A"), _w("No.", "B"), _w("Maybe.", "C")]),
     ["speaker_line", "dialogue"]),
    (_cue(["-Yes.", "-No."], [_w("Yes.", "A"), _w("No.", "A")]), []),  # one voice, dashed: allowed
    (_cue(["-Are you coming?"]), ["dialogue"]),  # a file's lone dashed line
    (_cue(["-Yes.", "No."]), ["dialogue"]),
    (_cue(["Yes.", "No."], voices=["A", "B"]), ["dialogue"]),  # voices without dashes
    (_cue(["-Yes.", "-No."], voices=["A", "B"]), []),
    (_cue(["-Yes.", "-No.", "-Maybe."], voices=["A", "B", "C"]), ["dialogue"]),
    (_cue(["A well-known -5 degrees"]), []),
    # text that starts with the dash character is no speaker's line (speakers.dialogue_words)
    (_cue(["-20 degrees outside"]), []),
    (_cue(["-20 degrees outside,", "and falling."]), []),
    (_cue(["-$5 off today"]), []),
    (_cue(["----------"]), []),
    (_cue(["- - - - -"]), []),
    (_cue(["--and then nothing."]), []),
    # ... but a dash and a space, or a dash and speech, is one
    (_cue(["- 20 degrees outside"]), ["dialogue"]),
    (_cue(["-¿Vienes?"]), ["dialogue"]),
    (_cue(["-Yes.", "-20 degrees."]), []),  # a dialogue cue: its other line is a speaker's too
    (_cue(["-Yes.", "-20 degrees."], voices=["A", "B"]), []),
    (_cue(["-Cold?", "-20 degrees.", "-Brr."]), ["dialogue"]),
])
def test_checker_reports_the_speaker_rules(cue, rules_broken):
    got = sorted({v.rule for v in check_cues([cue], RULES)} & {"speaker_line", "dialogue"})
    assert got == sorted(rules_broken), check_cues([cue], RULES)


@pytest.mark.parametrize("dash, line, said", [
    ("-", "-Are you coming?", "Are you coming?"), ("-", "- Are you coming?", "Are you coming?"),
    ("- ", "-Are you coming?", "Are you coming?"), ("-", "-[Anna] Hi.", "[Anna] Hi."),
    ("-", "-...and then?", "...and then?"), ("-", '-"Go," he said.', '"Go," he said.'),
    ("–", "–Tu viens ?", "Tu viens ?"), ("-", "- 20 degrees.", "20 degrees."),
    ("-", "-20 degrees outside", None), ("-", "-5", None), ("–", "–20 degrés", None),
    ("-", "-€5", None), ("-", "-----", None), ("-", "-–-", None), ("-", "- -", None),
    ("-", "-", None), ("-", "Well -20 it is.", None), ("—", "—", None),
])
def test_dialogue_words_follow_the_dash_style(dash, line, said):
    from captionbus.core.subtitles.speakers import dialogue_words
    assert dialogue_words(line, dash) == said


def test_subs_check_counts_no_speaker_line_for_text_starting_with_a_dash(tmp_path):
    """`captionbus subs check` on a file whose lines start with "-" without being dialogue: a
    temperature, a line of dashes. Before speakers.dialogue_words each was a lone dialogue line."""
    from click.testing import CliRunner

    from captionbus.subs_cli import subs
    path = tmp_path / "weather.srt"
    path.write_text("1\n00:00:01,000 --> 00:00:03,000\n-20 degrees outside\n\n"
                    "2\n00:00:04,000 --> 00:00:06,000\n----------\n\n"
                    "3\n00:00:07,000 --> 00:00:09,000\n-Cold?\n-20 degrees.\n\n", encoding="utf-8")
    ok = CliRunner().invoke(subs, ["check", str(path)])
    assert ok.exit_code == 0, ok.output
    path.write_text("1\n00:00:01,000 --> 00:00:03,000\n-Are you coming?\nIn a minute.\n\n", encoding="utf-8")
    bad = CliRunner().invoke(subs, ["check", str(path)])
    assert bad.exit_code == 1 and "dialogue" in bad.output, bad.output


def test_fix_does_not_split_text_starting_with_a_dash_into_speakers():
    """A re-flow keeps "-20 ..." lines as text (they may join); a dialogue cue with a number keeps
    its speakers' lines apart."""
    from captionbus.core.subtitles import reflow
    from captionbus.core.subtitles.formats import parse_subtitles
    weather = parse_subtitles("1\n00:00:01,000 --> 00:00:04,000\n-20 degrees outside,\n-5 inside.\n\n", "srt")
    assert [c.lines for c in reflow(weather, RULES).cues] == [["-20 degrees outside, -5 inside."]]
    talk = parse_subtitles("1\n00:00:01,000 --> 00:00:04,000\n-Cold outside?\n-20 degrees.\n\n", "srt")
    lines = [line.removeprefix("-") for c in reflow(talk, RULES).cues for line in c.lines]
    assert lines == ["Cold outside?", "20 degrees."]  # a cue each (time enough) or a dialogue cue


def test_report_counts_speaker_rules_from_a_file(tmp_path):
    path = tmp_path / "dialogue.srt"
    path.write_text("1\n00:00:01,000 --> 00:00:03,000\n-Are you coming?\n-In a minute.\n\n"
                    "2\n00:00:04,000 --> 00:00:06,000\n-Three lines.\n-Is one.\n-Too many.\n\n", encoding="utf-8")
    from captionbus.core.subtitles import check_file
    report = check_file(path, load_rules(max_lines=3))
    assert report.counts["dialogue"] == 1 and report.counts["speaker_line"] == 0
    assert "dialogue" in report.render()


DIALOGUE_SRT = """1
00:00:01,000 --> 00:00:02,500
-Are you coming?
-In a minute.

2
00:00:02,600 --> 00:00:03,800
-Yes.
-No.

3
00:00:03,900 --> 00:00:05,000
-Fine.
-Go.

4
00:00:08,000 --> 00:00:11,000
A plain line that goes on
and on.
"""


def test_fix_keeps_a_files_dialogue_lines_apart(tmp_path):
    """A re-flow splits a dashed cue into its speakers' lines and may rebuild it, never joining two
    lines into one; lines of different cues never share a dialogue cue (a file doesn't say who
    speaks across cues)."""
    from captionbus.core.subtitles import reflow
    from captionbus.core.subtitles.formats import parse_subtitles
    before = parse_subtitles(DIALOGUE_SRT, "srt")
    result = reflow(before, RULES)
    assert check_cues(result.cues, RULES) == [] and result.problems == []
    got = [c.lines for c in result.cues]
    assert ["-Are you coming?", "-In a minute."] in got and ["-Yes.", "-No."] in got
    assert ["A plain line that goes on and on."] in got
    own_cue = {"Are you coming?": 0, "In a minute.": 0, "Yes.": 1, "No.": 1, "Fine.": 2, "Go.": 2}
    for lines in got:
        said = [line.lstrip("-") for line in lines]
        assert len({own_cue.get(s, s) for s in said}) == 1, lines
    assert all(not c.voices and c.speaker is None for c in result.cues)
    words = lambda cues: " ".join(" ".join(c.lines) for c in cues).replace("-", "").split()  # noqa: E731
    assert words(result.cues) == words(before)


UTTERANCES = ["Yes.", "No.", "Why?", "Are you coming?", "In a minute.", "Okay, okay.", "Where is everyone?",
              "They left about an hour ago, right after the storm started.", "Come on, we're going to miss it!",
              "Listen to me very carefully, because I am only going to say this once."]


@st.composite
def conversations(draw):
    """Quick turns between up to three speakers, on words or on segments, pauses 0-2.5 s."""
    t, segments = 0.2, []
    for _ in range(draw(st.integers(1, 25))):
        text = draw(st.sampled_from(UTTERANCES))
        speaker = draw(st.sampled_from(["A", "B", "C", None]))
        seg = turn(text, t, speaker, per_word=draw(st.sampled_from([0.15, 0.25, 0.35])),
                   on_words=draw(st.booleans()))
        segments.append(seg)
        t = seg.end + draw(st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0, 2.5]))
    return Transcript(language="en", segments=segments)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.sampled_from([None, {"A": "Anna", "B": "Ben"}]))
def test_any_conversation_keeps_the_speaker_rules(tr, names):
    result = build_cues(tr, RULES, speaker_names=names)
    if names is None:
        assert_valid(result, words_of(tr), RULES)
    assert not [v for v in check_cues(result.cues, RULES) if v.rule in ("speaker_line", "dialogue")]
    assert [w for c in result.cues for w in c.words] == [w for w in words_of(tr) if w.text.strip()]
    for c in result.cues:
        assert len(set(c.voices)) <= 2 and (len(set(c.voices)) < 2 or len(c.lines) == 2)
