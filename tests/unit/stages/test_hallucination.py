"""captionbus/services/asr/hallucination.py: every rule with a concrete before/after, and the real speech
each rule must leave alone."""
from __future__ import annotations

from captionbus.contracts.transcript import Segment, Word
from captionbus.services.asr.hallucination import (
    LYRICS,
    SUSPECT,
    DecodedWord,
    clean_segments,
    collapse_char_loops,
    collapse_loops,
    phantom_kind,
    speech_overlap,
    strip_sound_tags,
)


def timed(text: str, start: float, word_s: float = 0.3, gap_s: float = 0.05, score: float = 0.9) -> Segment:
    """A segment whose words follow each other every word_s + gap_s seconds."""
    words, t = [], start
    for token in text.split():
        words.append(Word(text=token, start=round(t, 3), end=round(t + word_s, 3), score=score))
        t += word_s + gap_s
    return Segment(start=words[0].start, end=words[-1].end, text=text, words=words)


def texts(segments: list[Segment]) -> list[str]:
    return [s.text for s in segments]


# ---------------------------------------------------------------- loops

def test_word_ngram_loops_collapse_to_one_occurrence():
    assert collapse_loops("i am i am i am i am i am i am i am i am i am i am".split()) == [0, 1]
    assert collapse_loops("so we went home home home home home home and slept".split()) == [0, 1, 2, 3, 9, 10]
    looped = "and then we " + "went to the shop " * 6 + "yesterday"
    kept = [looped.split()[i] for i in collapse_loops(looped.split())]
    assert kept == "and then we went to the shop yesterday".split()


def test_real_repetition_is_not_a_loop():
    for said in ("no no no", "no no no no", "very very very good", "thank you thank you thank you",
                 "bye bye", "it is what it is", "the the cat"):
        tokens = said.split()
        assert collapse_loops(tokens) == list(range(len(tokens))), said


def test_loop_inside_a_timed_segment_keeps_the_first_words_and_their_times():
    segment = timed("Hello. " + "Thank you. " * 10 + "Goodbye.", start=1.0)
    [cleaned], report = clean_segments([segment])
    assert cleaned.text == "Hello. Thank you. Goodbye."
    assert [w.text for w in cleaned.words] == ["Hello.", "Thank", "you.", "Goodbye."]
    assert cleaned.words[1].start == segment.words[1].start and cleaned.words[-1].end == segment.words[-1].end
    assert report.loop_words_dropped == 18 and report.anything_dropped
    assert report.metrics()["hallucination_loop_words_dropped"] == 18


def test_loop_in_untimed_and_unspaced_text():
    [cleaned], _ = clean_segments([Segment(start=0, end=30, text="we will we will we will we will rock you")])
    assert cleaned.text == "we will rock you"
    assert collapse_char_loops("ありがとうありがとうありがとうありがとう") == "ありがとう"
    assert collapse_char_loops("どうもありがとう") == "どうもありがとう"
    assert collapse_char_loops("hahahahahaha") == "hahahahahaha"  # spaced scripts: words decide, not letters


def test_the_same_segment_three_times_running_is_a_loop_twice_is_not():
    repeated = [timed("I don't know what to say.", start=t) for t in (0, 3, 6, 9)]
    cleaned, report = clean_segments(repeated)
    assert texts(cleaned) == ["I don't know what to say."] and report.dropped_by_reason["loop"] == 3
    twice = [timed("Stop.", start=0), timed("Stop.", start=1), timed("Please stop.", start=2)]
    assert texts(clean_segments(twice)[0]) == ["Stop.", "Stop.", "Please stop."]


# ---------------------------------------------------------------- text inside non-speech

def test_segment_outside_the_speech_regions_is_dropped():
    regions = [(0.0, 4.0), (20.0, 25.0)]
    speech, in_music = timed("We should leave now.", start=1.0), timed("I will see you tomorrow.", start=10.0)
    cleaned, report = clean_segments([speech, in_music], regions=regions, duration=30)
    assert texts(cleaned) == ["We should leave now."]
    assert report.dropped_by_reason == {"non_speech": 1} and report.metrics()["hallucinations_dropped_non_speech"] == 1


def test_words_trailing_into_silence_are_dropped_words_at_the_edge_are_kept():
    regions = [(0.0, 2.0)]
    # "one two three four five" from 0.8 s: words at 0.8, 1.15, 1.5, 1.85 (ends 2.15: edge), 2.2 (outside)
    segment = timed("one two three four five", start=0.8)
    [cleaned], report = clean_segments([segment], regions=regions)
    assert cleaned.text == "one two three four" and cleaned.end == segment.words[3].end
    assert report.non_speech_words_dropped == 1 and not report.dropped


def test_untimed_segment_is_judged_by_its_span():
    regions = [(0.0, 5.0)]
    inside = Segment(start=1.0, end=4.0, text="inside the speech")
    mostly_outside = Segment(start=4.5, end=14.0, text="mostly in the noise")
    cleaned, _ = clean_segments([inside, mostly_outside], regions=regions)
    assert texts(cleaned) == ["inside the speech"]
    assert speech_overlap(4.5, 14.0, regions) == 0.5 / 9.5


def test_half_in_speech_is_kept_but_suspect():
    [segment], report = clean_segments([Segment(start=4.0, end=10.0, text="half and half")], regions=[(0.0, 6.5)])
    assert SUSPECT in segment.flags and report.flagged[SUSPECT] == 1


def test_without_regions_nothing_is_judged_as_non_speech():
    segment = timed("I will see you tomorrow.", start=10.0)
    assert clean_segments([segment], regions=None)[0] == [segment]


# ---------------------------------------------------------------- phantom phrases

def test_known_phantom_lines():
    for line in ("Thanks for watching!", "Thank you for watching.", "Subtitles by the Amara.org community",
                 "Please subscribe.", "ご視聴ありがとうございました", "देखने के लिए धन्यवाद।",
                 "Untertitel im Auftrag des ZDF für funk, 2017", "Субтитры сделал DimaTorzok",
                 "Thank you for watching. Please subscribe!"):
        assert phantom_kind(line) == "strong", line
    for line in ("you", "Thank you.", "Bye."):
        assert phantom_kind(line) == "weak", line
    for line in ("Thank you for coming.", "I said thanks for watching the kids.", "You?", "Did you see that?"):
        assert phantom_kind(line) != "strong", line
    assert phantom_kind("Did you see that?") is None


def test_phantom_over_silence_is_dropped():
    speech = timed("Let us begin the lesson.", start=0.5)
    # the VAD heard a short noise inside the outro's span: it is mostly (55%) outside speech
    outro = Segment(start=20.0, end=22.0, text="Thanks for watching!")
    you = timed("you", start=40.0)  # nothing there at all: non-speech before it is a phantom
    cleaned, report = clean_segments([speech, outro, you], regions=[(0.0, 3.0), (20.5, 21.0)], duration=45)
    assert texts(cleaned) == ["Let us begin the lesson."]
    assert report.dropped_by_reason == {"phantom": 1, "non_speech": 1}
    assert [(d.reason, d.text) for d in report.dropped] == [("non_speech", "you"), ("phantom", "Thanks for watching!")]
    assert report.metrics()["hallucinations_dropped"] == 2 and "1 phantom" in report.summary()


def test_phantom_without_regions():
    # a lone "you" on a silent clip, the classic
    cleaned, report = clean_segments([timed("you", start=12.0)], duration=30)
    assert cleaned == [] and report.dropped_by_reason == {"phantom": 1}
    # an Amara credit at the end of a film
    film = [timed("Get out of my house.", start=1.0), timed("Subtitles by the Amara.org community", start=3.5)]
    assert texts(clean_segments(film, duration=8)[0]) == ["Get out of my house."]
    # a "Thank you." alone in a long silence may be real: kept, flagged
    pause = [timed("Here you are.", start=0.0), timed("Thank you.", start=5.0), timed("Now sit down.", start=10.0)]
    cleaned, report = clean_segments(pause, duration=12)
    assert texts(cleaned) == texts(pause) and cleaned[1].flags == [SUSPECT] and not report.dropped


def test_phantom_words_said_in_conversation_stay():
    dialogue = [timed("Here is your coffee.", start=0.0), timed("Thank you.", start=1.6), timed("You are welcome.", start=2.5)]
    cleaned, report = clean_segments(dialogue, duration=5)
    assert texts(cleaned) == ["Here is your coffee.", "Thank you.", "You are welcome."] and not report.anything_dropped
    # with regions saying it is speech, a real "Thank you." is kept unflagged
    cleaned, _ = clean_segments(dialogue, regions=[(0.0, 4.0)], duration=5)
    assert texts(cleaned) == texts(dialogue) and not any(s.flags for s in cleaned)


def test_strong_phantom_inside_speech_is_kept_and_flagged():
    outro = timed("Thanks for watching!", start=1.0)
    [kept], report = clean_segments([outro], regions=[(0.5, 2.5)], duration=3)
    assert kept.text == "Thanks for watching!" and SUSPECT in kept.flags and not report.dropped


# ---------------------------------------------------------------- lyrics, tags

def test_sound_tags():
    assert strip_sound_tags("♪ Never gonna give you up ♪") == ("Never gonna give you up", True)
    assert strip_sound_tags("[Music]") == ("", True)
    assert strip_sound_tags("(upbeat music) Hello there") == ("Hello there", True)
    assert strip_sound_tags("He said (laughs) okay") == ("He said okay", False)
    assert strip_sound_tags("[APPLAUSE]") == ("", False)


def test_tag_only_segments_are_dropped_sung_ones_flagged():
    music = Segment(start=0, end=10, text="[Music]")
    sung = timed("♪ Never gonna give you up ♪", start=12)
    applause = timed("[Applause] Thank you all for coming.", start=20)
    cleaned, report = clean_segments([music, sung, applause], duration=30)
    assert texts(cleaned) == ["Never gonna give you up", "Thank you all for coming."]
    assert cleaned[0].flags == [LYRICS] and [w.text for w in cleaned[0].words] == "Never gonna give you up".split()
    assert cleaned[0].words[0].start == sung.words[1].start  # the "♪" word went, the times stayed
    assert cleaned[1].flags == [] and cleaned[1].words[0].text == "Thank"
    assert report.dropped_by_reason == {"sound_tag": 1} and report.flagged[LYRICS] == 1


def test_tag_split_over_words_is_removed():
    segment = timed("[Music playing] Hello", start=0)
    [cleaned], _ = clean_segments([segment])
    assert [w.text for w in cleaned.words] == ["Hello"] and cleaned.flags == [LYRICS]


def test_sustained_words_are_flagged_as_lyrics_normal_speech_is_not():
    sung = timed("oh my love my darling", start=0, word_s=1.2)
    spoken = timed("oh my love my darling", start=10, word_s=0.3)
    cleaned, _ = clean_segments([sung, spoken])
    assert cleaned[0].flags == [LYRICS] and cleaned[1].flags == []


def test_unsure_words_make_a_segment_suspect():
    [segment], _ = clean_segments([timed("mumble grumble fumble", start=0, score=0.05)])
    assert segment.flags == [SUSPECT]


def test_clean_transcript_passes_unchanged():
    segments = [timed("The quick brown fox jumps over the lazy dog.", start=0.5),
                timed("No, no, no, that is not what I meant.", start=4.0)]
    cleaned, report = clean_segments(segments, regions=[(0.3, 8.0)], duration=9)
    assert cleaned == segments and not report.anything_dropped and report.summary() == ""
    assert report.metrics()["hallucinations_dropped"] == 0


def test_a_tag_keeps_every_word_around_it():
    """A parenthesis that is not a tag ("2)") must not make the words after it disappear."""
    segment = timed("we have (1) apples and 2) pears too.", start=0)
    [cleaned], report = clean_segments([segment])
    assert [w.text for w in cleaned.words] == ["we", "have", "apples", "and", "2)", "pears", "too."]
    assert not report.dropped


# ---------------------------------------------------------------- the decoder's tokens

def decoded(text: str, start: float, first_token: int = 100) -> Segment:
    """A segment as the whisperx backend gives it: each word with its own decoder tokens (two per
    word here), the segment's tokens all of its words'."""
    plain = timed(text, start)
    words = [DecodedWord(**w.model_dump(), tokens=[first_token + 2 * i, first_token + 2 * i + 1])
             for i, w in enumerate(plain.words)]
    return plain.model_copy(update={"words": words, "tokens": [t for w in words for t in w.tokens]})


def test_a_segment_keeps_the_tokens_of_the_words_it_keeps():
    """Review finding: after a drop the segment kept every decoder token (the gateway returned them
    as verbose_json `tokens` for words that were gone)."""
    looped = decoded("Hello. " + "Thank you. " * 10 + "Goodbye.", start=1.0)
    [cleaned], _ = clean_segments([looped])
    assert cleaned.text == "Hello. Thank you. Goodbye."
    assert cleaned.tokens == [100, 101, 102, 103, 104, 105, 142, 143]
    assert cleaned.tokens == [t for w in cleaned.words for t in w.tokens]

    trailing = decoded("one two three four five", start=0.8)  # "five" lies outside the speech
    [cleaned], _ = clean_segments([trailing], regions=[(0.0, 2.0)])
    assert cleaned.text == "one two three four" and cleaned.tokens == trailing.tokens[:8]

    tagged = decoded("[Music] We should leave now.", start=0.0)
    [cleaned], _ = clean_segments([tagged])
    assert cleaned.text == "We should leave now." and cleaned.tokens == tagged.tokens[2:]


def test_tokens_no_word_carries_are_unknown_after_an_edit_not_kept():
    """mlx-whisper reports tokens per segment only, and a word whose text a rule changed is no
    longer spelled by its tokens: the segment's tokens are then None (unknown), never stale."""
    plain = timed("Hello. " + "Thank you. " * 10 + "Goodbye.", start=1.0).model_copy(update={"tokens": list(range(42))})
    [cleaned], _ = clean_segments([plain])
    assert cleaned.text == "Hello. Thank you. Goodbye." and cleaned.tokens is None
    untimed = Segment(start=0, end=30, text="we will we will we will we will rock you", tokens=list(range(20)))
    [cleaned], _ = clean_segments([untimed])
    assert cleaned.text == "we will rock you" and cleaned.tokens is None
    noted = decoded("♪Hello there", start=0.0)  # the note goes, the word stays: its tokens spelled "♪Hello"
    [cleaned], _ = clean_segments([noted])
    assert cleaned.text == "Hello there" and cleaned.tokens is None


def test_an_untouched_segment_keeps_its_tokens_and_they_stay_out_of_the_words_json():
    for segment in (decoded("We should leave now. Now!", start=1.0),
                    timed("We should leave now. Now!", start=1.0).model_copy(update={"tokens": [1, 2, 3]})):
        [cleaned], _ = clean_segments([segment], regions=[(0.0, 10.0)])
        assert cleaned.text == segment.text and cleaned.tokens == segment.tokens
    dumped = clean_segments([decoded("(laughs) We should leave.", start=1.0)])[0][0].model_dump()
    assert dumped["tokens"] == [102, 103, 104, 105, 106, 107]
    assert all(set(w) == set(Word.model_fields) for w in dumped["words"]), dumped["words"]  # no word tokens
