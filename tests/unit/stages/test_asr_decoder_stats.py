"""The whisperx backend's pure parts, without whisperx: a chunk's decoder statistics spread over
its segments (with_decoder_stats), and the sample a window is cut at (audio.sample_index), which
must be the same whether a film or a chunk of it is decoded."""
from __future__ import annotations

import zlib

import numpy as np

from captionbus.contracts.transcript import Segment, Word
from captionbus.services.asr.hallucination import DecodedWord
from captionbus.services.asr.whisperx_backend import with_decoder_stats
from captionbus.services.audio import SAMPLE_RATE, sample_index

TEXT = " Seven sailors watch. The sunset glows."
DECODED = {"tokens": [11, 12, 13, 14, 15, 16, 17], "avg_logprob": -0.31, "no_speech_prob": 0.02}


def word(text: str, start: float, tokens: list[int] | None) -> DecodedWord:
    return DecodedWord(text=text, start=start, end=start + 0.3, score=0.9, tokens=tokens)


def segment(*words: Word) -> Segment:
    return Segment(start=words[0].start, end=words[-1].end, text=" ".join(w.text for w in words), words=list(words))


def test_each_segment_gets_its_own_words_tokens_and_the_chunks_statistics():
    first = segment(word("Seven", 0.0, [11]), word("sailors", 0.4, [12, 13]), word("watch.", 0.8, [14]))
    second = segment(word("The", 2.0, [15]), word("sunset", 2.4, [16]), word("glows.", 2.8, [17]))
    out = with_decoder_stats([first, second], TEXT, DECODED)
    assert [s.tokens for s in out] == [[11, 12, 13, 14], [15, 16, 17]]
    raw = TEXT.strip().encode()
    for s in out:  # faster-whisper's compression ratio of the chunk's text, shared by its segments
        assert (s.avg_logprob, s.no_speech_prob) == (-0.31, 0.02)
        assert s.compression_ratio == len(raw) / len(zlib.compress(raw))
    assert [w.text for w in out[0].words] == ["Seven", "sailors", "watch."]  # words untouched


def test_a_word_without_tokens_leaves_its_segment_without_tokens_not_another_segments():
    """A word the hallucination cleaner re-texted (tokens None) or a plain Word from elsewhere
    carries no decoder tokens: its segment's tokens are unknown (None), the other segment keeps
    its own, and nothing raises."""
    first = segment(word("Seven", 0.0, [11]), word("sailors", 0.4, None), word("watch.", 0.8, [14]))
    second = segment(word("The", 2.0, [15]), word("sunset", 2.4, [16]), word("glows.", 2.8, [17]))
    plain = segment(Word(text="The", start=2.0, end=2.3), word("sunset", 2.4, [16]))
    out = with_decoder_stats([first, second], TEXT, DECODED)
    assert [s.tokens for s in out] == [None, [15, 16, 17]]
    assert out[0].avg_logprob == -0.31  # the statistics are still the chunk's
    assert with_decoder_stats([second, plain], TEXT, DECODED)[1].tokens is None


def test_the_chunks_only_segment_takes_all_its_tokens_when_its_words_do_not_carry_them():
    lone = segment(word("Seven", 0.0, [11]), Word(text="sailors", start=0.4, end=0.7))
    assert with_decoder_stats([lone], TEXT, DECODED)[0].tokens == DECODED["tokens"]
    untimed = Segment(start=0.0, end=3.0, text=TEXT.strip())  # no word times at all
    assert with_decoder_stats([untimed], TEXT, DECODED)[0].tokens == DECODED["tokens"]


def test_without_decoder_statistics_the_segments_are_returned_as_they_are():
    first = segment(word("Seven", 0.0, None))
    assert with_decoder_stats([first], TEXT, None) == [first]
    assert with_decoder_stats([first], TEXT, None)[0].tokens is None


def test_a_window_is_cut_at_the_same_film_sample_from_the_film_and_from_a_chunk():
    """The chunked workflow hands the asr stage regions in chunk times (film time minus the
    chunk's start, both whole milliseconds) widened by a 0.1 s margin; the window must start at
    the same film sample as when the whole film is decoded. Truncating (int) misses by one
    sample for some of them; rounding never does."""
    rng = np.random.default_rng(7)
    starts = np.round(rng.uniform(0.0, 7200.0, 2000), 3)
    chunk_starts = np.round(starts - rng.uniform(1.0, 60.0, 2000), 3)
    truncated_misses = 0
    for film_t, chunk_t in zip(starts.tolist(), chunk_starts.tolist()):
        in_film, in_chunk = film_t - 0.1, (film_t - chunk_t) - 0.1
        assert sample_index(in_chunk) + sample_index(chunk_t) == sample_index(in_film)
        truncated_misses += int(in_chunk * SAMPLE_RATE) + int(chunk_t * SAMPLE_RATE) != int(in_film * SAMPLE_RATE)
    assert truncated_misses > 0  # the case this guards against really occurs
