"""What every CueResult must satisfy, whatever the input: shared by the property and golden tests."""
from __future__ import annotations

from typing import Sequence

from captionbus.contracts.transcript import Word
from captionbus.core.subtitles import CueResult, Rules, check_cues, display_len

# Rules the engine never breaks, even on hopeless input (it drifts off the speech instead).
ALWAYS_HELD = {"line_count", "min_duration", "max_duration", "min_gap", "overlap", "order",
               "speaker_line", "dialogue"}


def assert_valid(result: CueResult, words: Sequence[Word] | None, rules: Rules,
                 fps: float | None = None) -> None:
    cues = result.cues
    q = rules.time_quantum_ms
    if words is not None:
        expected = [w for w in words if w.text.strip()]
        got = [w for c in cues for w in c.words]
        assert [id(w) for w in got] == [id(w) for w in expected], "words not exactly once, in order"
    gap = rules.min_gap_ms(fps)
    for k, c in enumerate(cues):
        assert c.words, f"cue {k} has no words"
        assert c.start_ms % q == 0 and c.end_ms % q == 0, f"cue {k} off the {q} ms grid"
        assert 0 <= c.start_ms < c.end_ms
        assert rules.min_duration_ms <= c.end_ms - c.start_ms <= rules.max_duration * 1000
        assert len(c.lines) <= rules.max_lines
        # The lines carry exactly the cue's words, unbroken (a dialogue cue: after each line's dash).
        sep, lines = rules.word_separator, c.lines
        if len(set(c.voices)) > 1:
            assert len(set(c.voices)) == 2 and len(lines) == 2, f"cue {k}: {c.voices} in {lines}"
            assert all(line.startswith(rules.dialogue_dash) for line in lines), f"cue {k}: undashed {lines}"
            lines = [line[len(rules.dialogue_dash):] for line in lines]
        assert sep.join(lines) == sep.join(w.text.strip() for w in c.words)
        if k:
            assert c.start_ms - cues[k - 1].end_ms >= gap, f"cue {k}: gap under two frames"
    reported = {(p.rule, p.cue) for p in result.problems}
    for v in check_cues(cues, rules, fps):
        assert v.rule not in ALWAYS_HELD, v
        assert (v.rule, v.cue) in reported, f"unreported violation {v}"
    for p in result.problems:
        assert p.rule not in ALWAYS_HELD, p
        if p.rule in ("line_length", "long_word"):
            assert any(display_len(w.text.strip()) > rules.max_chars_per_line for w in cues[p.cue].words), p
