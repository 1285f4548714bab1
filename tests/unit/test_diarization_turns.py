"""captionbus/services/diarization/core.py's model-free parts in the plain interpreter: speaker counts, windows,
turns from labelled windows, words to turns. (Clustering needs scikit-learn, which lives in the
diarization env: tests/integration/test_diarization_core.py runs it there.)"""
from __future__ import annotations

import numpy as np
import pytest

from captionbus.services.diarization.core import (
    MAX_SPEAKERS, SpeakerCount, SpeakerCountError, Turn, WindowEmbeddings, assign_words, speaker_name,
    turns_from_windows, windows_in_regions,
)


@pytest.mark.parametrize("text,expected", [
    ("auto", (1, MAX_SPEAKERS)), (None, (1, MAX_SPEAKERS)), ("3", (3, 3)), (2, (2, 2)), ("2-4", (2, 4)),
    (" 2 - 4 ", (2, 4)), ("AUTO", (1, MAX_SPEAKERS)),
])
def test_speaker_count_parse(text, expected):
    count = SpeakerCount.parse(text)
    assert (count.min, count.max) == expected
    assert count.fixed == (expected[0] if expected[0] == expected[1] else None)


@pytest.mark.parametrize("text", ["0", "4-2", "two", "-1", "1-", f"{MAX_SPEAKERS + 1}", "2-99", "", "2,3"])
def test_speaker_count_rejects(text):
    with pytest.raises(SpeakerCountError, match="speakers"):
        SpeakerCount.parse(text)


def test_windows_cover_regions_and_end_at_their_ends():
    windows = windows_in_regions([(0.0, 4.0), (5.0, 5.3), (6.0, 7.0)], window_s=1.5, step_s=0.75)
    assert windows[:5] == [(0.0, 1.5), (0.75, 2.25), (1.5, 3.0), (2.25, 3.75), (2.5, 4.0)]
    # (5.0, 5.3) is under MIN_WINDOW_S: no window; (6, 7) is shorter than a window: one of its own
    assert windows[5:] == [(6.0, 7.0)]


def _labelled(spans: list[tuple[float, float, int]]) -> tuple[WindowEmbeddings, np.ndarray]:
    starts = np.array([s for s, _, _ in spans])
    ends = np.array([e for _, e, _ in spans])
    return WindowEmbeddings(starts, ends, np.eye(len(spans), 4, dtype=np.float32)), np.array([k for *_, k in spans])


def test_turns_change_between_window_centres():
    # speaker 0 in 0-3 s, speaker 1 in 3-6 s, one region, windows 1.5/0.75 labelled by majority
    regions = [(0.0, 6.0)]
    spans = [(a, a + 1.5, 0 if a + 0.75 < 3.0 else 1) for a in np.arange(0, 4.6, 0.75)]
    windows, labels = _labelled(spans)
    turns = turns_from_windows(windows, labels, regions)
    assert [t.speaker for t in turns] == [speaker_name(0), speaker_name(1)]
    assert turns[0].start == 0.0 and turns[-1].end == 6.0
    assert abs(turns[0].end - 3.0) <= 0.4  # the change lies between the last 0 and first 1 centres


def test_short_turn_is_absorbed_and_regions_stay_apart():
    windows, labels = _labelled([(0.0, 1.5, 0), (0.75, 2.25, 0), (1.5, 3.0, 0), (1.6, 1.8, 1), (4.0, 5.0, 1)])
    turns = turns_from_windows(windows, labels, [(0.0, 3.0), (4.0, 5.0)])
    assert turns == [Turn(0.0, 3.0, speaker_name(0)), Turn(4.0, 5.0, speaker_name(1))]


def test_region_without_windows_takes_nearest_speaker():
    windows, labels = _labelled([(0.0, 1.5, 0), (3.0, 4.5, 1)])
    turns = turns_from_windows(windows, labels, [(0.0, 1.5), (4.6, 4.8), (3.0, 4.5)])
    assert Turn(4.6, 4.8, speaker_name(1)) in turns


def test_window_embeddings_concat_shifts_chunks_into_film_time():
    chunk = WindowEmbeddings(np.array([0.0, 1.0]), np.array([1.5, 2.5]), np.ones((2, 3), np.float32))
    both = WindowEmbeddings.concat([chunk, chunk.shifted(600.0), WindowEmbeddings(np.zeros(0), np.zeros(0),
                                                                                   np.zeros((0, 3)))])
    assert list(both.starts) == [0.0, 1.0, 600.0, 601.0] and both.vectors.shape == (4, 3)
    with pytest.raises(ValueError, match="different models"):
        WindowEmbeddings.concat([chunk, WindowEmbeddings(np.zeros(1), np.ones(1), np.ones((1, 5)))])


def test_words_go_to_the_turn_covering_most_of_them():
    turns = [Turn(0.0, 2.0, "A"), Turn(2.0, 4.0, "B"), Turn(6.0, 7.0, "C")]
    words = [
        {"start": 0.5, "end": 0.9},  # inside A
        {"start": 1.8, "end": 2.5},  # 0.2 in A, 0.5 in B
        {"start": 1.9, "end": 2.05},  # 0.1 in A, 0.05 in B
        {"start": 4.2, "end": 4.4},  # 0.2 s after B: nearest within 0.5 s
        {"start": 5.0, "end": 5.2},  # 0.8 s from anything: unknown
        {"start": 6.5, "end": 6.5},  # zero length inside C
    ]
    assert assign_words(words, turns) == ["A", "B", "A", "B", None, "C"]
    assert assign_words(words, []) == [None] * len(words)
