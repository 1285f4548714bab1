"""Property tests: any word stream gives valid cues, or says which rule it could not meet."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from subtitle_invariants import assert_valid

from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.core.subtitles import Cue, build_cues, distribute_translation, load_rules

RULES = load_rules()
HI_RULES = load_rules(language="hi")

LATIN = ["the", "a", "of", "and", "river", "morning,", "said", "word.", "Why?", "extraordinary",
         "I", "it's", "well-known", "Café", "naïve"]
DEVANAGARI = ["नमस्ते", "क्षत्रिय", "में", "और", "है।", "ज़्यादा", "अंतर्राष्ट्रीयकरण", "क्या", "हाँ,"]
LONG = ["Donaudampfschifffahrtsgesellschaftskapitänsmütze", "x" * 90, "प्रतिनिधित्वविहीनताकेकारणोंकासंक्षिप्तविवरणऔरविश्लेषण"]

texts = st.one_of(st.sampled_from(LATIN), st.sampled_from(DEVANAGARI), st.sampled_from(LONG),
                  st.sampled_from(["", "  "]),  # blank words are dropped
                  st.text(alphabet="abcdefghij.,?", min_size=1, max_size=12))
times = st.floats(min_value=0, max_value=600, allow_nan=False)


@st.composite
def word_streams(draw, max_words: int = 60):
    """Free-form: times anywhere (overlapping, backwards, zero-length, missing), many speakers."""
    n_segments = draw(st.integers(1, 5))
    segments = []
    for _ in range(n_segments):
        words = []
        for _ in range(draw(st.integers(0, max_words // n_segments))):
            if draw(st.integers(0, 9)) == 0:
                start = end = None
            else:
                start = draw(times)
                end = start + draw(st.sampled_from([0.0, 0.0, 0.05, 0.3, 0.7, 2.0, 9.0]))
                if draw(st.integers(0, 9)) == 0:
                    end = start - 0.5  # backwards
            # A word's own speaker (diarization) outranks its segment's; three labels make
            # dialogue cues and the never-three-speakers rule reachable.
            words.append(Word(text=draw(texts), start=start, end=end,
                              speaker=draw(st.sampled_from([None, None, None, "A", "B", "C"]))))
        s = draw(times)
        segments.append(Segment(start=s, end=s + draw(st.floats(0, 30)), text=" ".join(w.text for w in words),
                                words=words, speaker=draw(st.sampled_from([None, "A", "B"]))))
    return Transcript(language="en", segments=segments)


@st.composite
def easy_streams(draw):
    """Ordinary speech: short words at a readable pace, monotonic times, pauses now and then."""
    t, words = 0.0, []
    for _ in range(draw(st.integers(1, 80))):
        text = draw(st.sampled_from(LATIN[:9] + DEVANAGARI[:6]))
        dur = 0.25 + 0.1 * len(text)
        words.append(Word(text=text, start=t, end=t + dur))
        t += dur + draw(st.sampled_from([0.05, 0.1, 0.2, 0.6, 3.0]))
    return Transcript(language="en", segments=[Segment(start=0, end=t, text="", words=words)])


def all_words(tr: Transcript) -> list[Word]:
    return [w for s in tr.segments for w in s.words]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(word_streams(), st.sampled_from([None, 23.976, 25.0, 30.0, 60.0]))
def test_any_stream_gives_valid_cues_or_reports(tr, fps):
    result = build_cues(tr, RULES, fps)
    assert_valid(result, all_words(tr), RULES, fps)


@settings(max_examples=60, deadline=None)
@given(word_streams(max_words=30))
def test_hindi_rules_hold_too(tr):
    assert_valid(build_cues(tr, HI_RULES), all_words(tr), HI_RULES)


@settings(max_examples=100, deadline=None)
@given(easy_streams())
def test_ordinary_speech_meets_every_rule(tr):
    result = build_cues(tr, RULES)
    assert_valid(result, all_words(tr), RULES)
    assert result.problems == []


@settings(max_examples=100, deadline=None)
@given(easy_streams(), st.floats(1.2, 2.5))
def test_translation_is_spread_over_source_cues(tr, growth):
    source = build_cues(tr, RULES).cues
    # A "translation" longer than the source by `growth`, as English -> Hindi often is.
    translated = [" ".join(w.text for w in c.words for _ in range(int(growth))) or "x" for c in source]
    result = distribute_translation(source, translated, RULES)
    assert_valid(result, None, RULES)
    assert " ".join(w.text for c in result.cues for w in c.words) == " ".join(" ".join(t.split()) for t in translated)
    # No output cue straddles two source cues.
    owner = [k for k, t in enumerate(translated) for _ in t.split()]
    pos = 0
    for c in result.cues:
        assert len({owner[pos + i] for i in range(len(c.words))}) == 1
        pos += len(c.words)


def test_a_word_longer_than_a_line_is_reported_not_broken():
    long = "Donaudampfschifffahrtsgesellschaftskapitänsmütze"
    words = [Word(text=t, start=i * 0.5, end=i * 0.5 + 0.4) for i, t in enumerate(["the", long, "is", "long."])]
    result = build_cues(Transcript(language="de", segments=[Segment(start=0, end=2, text="", words=words)]), RULES)
    assert_valid(result, words, RULES)
    cue = next(c for c in result.cues if long in c.lines)
    assert cue.lines == [long]
    assert any(p.rule == "long_word" for p in result.problems)


def test_segment_without_word_times_still_becomes_cues():
    tr = Transcript(language="en", segments=[Segment(start=1.0, end=4.0, text="Hello there, how are you today?")])
    result = build_cues(tr, RULES)
    assert [c.text for c in result.cues] == ["Hello there, how are you today?"]
    assert 500 <= result.cues[0].start_ms <= 1000 and result.cues[0].end_ms >= 4000


def test_speaker_change_always_ends_a_cue():
    words = [Word(text=t, start=i * 0.4, end=i * 0.4 + 0.3) for i, t in enumerate("Are you coming? Yes I am.".split())]
    tr = Transcript(language="en", segments=[
        Segment(start=0, end=1.2, text="", words=words[:3], speaker="A"),
        Segment(start=1.2, end=2.4, text="", words=words[3:], speaker="B")])
    result = build_cues(tr, RULES)
    assert [c.speaker for c in result.cues] == ["A", "B"]
    assert_valid(result, words, RULES)


def test_fast_profile_allows_20_cps():
    fast = load_rules("fast")
    cue = Cue(0, 1000, ["x" * 19])
    from captionbus.core.subtitles import check_cues
    assert [v.rule for v in check_cues([cue], RULES)] == ["reading_speed"]
    assert check_cues([cue], fast) == []


def test_languages_without_spaces_break_between_characters():
    ja = load_rules(language="ja")
    source = [Cue(1000, 6000, ["x"], speaker="A")]
    text = "私たちはその朝、川へ下りていきましたが、誰も一言も話しませんでした。"
    result = distribute_translation(source, [text], ja)
    assert "".join(line for c in result.cues for line in c.lines) == text
    assert all(len(line) <= ja.max_chars_per_line for c in result.cues for line in c.lines)
    assert_valid(result, None, ja)
