"""Words with times -> cues: where cues start and end, their lines, and their times.

1. Flatten the transcript into words with repaired times (missing times interpolated, overlaps cut,
   integer ms on the rules' grid), so every later step can trust start <= end <= next start.
2. Choose cue boundaries by dynamic programming over the word stream: a cue must fit max_lines x
   max_chars, span at most max_duration of speech and never cross a long pause or a change of
   speaker -- except a dialogue cue (build_cues only): one change between two known speakers, each
   speaker's words whole on one line that starts with the dialogue dash (speakers.py), the first
   part starting and the second ending where an utterance does (a turn, a sentence end, a pause).
   Among those, prefer ends at sentence ends, pauses and clause marks, balanced lines and cue sizes,
   and reading speeds the timing can meet. A dialogue cue costs more than two cues
   (DIALOGUE_COST), so the engine makes one only where two short turns would otherwise be too short
   to read or too fast: the quick exchanges the style guides put in one subtitle.
3. Place the cues in time (timing.py), then check the result with the same checker users run;
   whatever still breaks a rule is returned as a problem, never hidden.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.core.subtitles import linebreak, speakers
from captionbus.core.subtitles.check import check_cues
from captionbus.core.subtitles.cues import Cue, CueResult, Problem
from captionbus.core.subtitles.formats import read_subtitles, write_subtitles
from captionbus.core.subtitles.graphemes import clusters, display_len
from captionbus.core.subtitles.rules import Rules
from captionbus.core.subtitles.timing import place_cues

# Cue-level costs (see linebreak.py for the break scale).
CUE_COST = 1.0           # each extra cue: favours fewer, fuller cues
FILL_COST = 0.5          # x (chars / capacity)^2: favours even cue sizes over one full and one tiny
END_WEIGHT = 2.0         # a cue boundary matters more than a line break
DANGLING_SENTENCE = 2.0  # a cue that ends one sentence and starts another it doesn't finish
SPEED_COST = 5.0         # per unit of reading-speed excess the timing can't absorb
SHORT_COST = 2.0         # a cue whose free time is under min_duration
# Two speakers in one cue: above what merging two comfortable cues saves (CUE_COST, less the fill
# term), below what one too-short or too-fast cue costs (SHORT_COST, SPEED_COST): a dialogue cue
# only where separate cues would be hard to read.
DIALOGUE_COST = 1.5
# stream_cues hands out the cues that are final every this many tokens
FLUSH_EVERY = 64


@dataclass
class _Token:
    word: Word
    text: str
    length: int
    start: int
    end: int
    speaker: str | None
    group: int  # segment, or source cue for translations


def _ms(value: float | None) -> float | None:
    if value is None or isinstance(value, float) and math.isnan(value):
        return None
    return max(0.0, float(value) * 1000)


def _spread(lengths: Sequence[int], lo: float, hi: float) -> list[tuple[float, float]]:
    """Share [lo, hi] between words in proportion to their length (plus one for the space)."""
    hi = max(hi, lo)
    weights = [n + 1 for n in lengths]
    total, acc, out = sum(weights), 0, []
    for w in weights:
        a = lo + (hi - lo) * acc / total
        acc += w
        out.append((a, lo + (hi - lo) * acc / total))
    return out


def _segment_tokens(words: Sequence[Word], seg_start: float | None, seg_end: float | None,
                    speaker: str | None, group: int) -> list[_Token]:
    words = [w for w in words if w.text.strip()]
    texts = [w.text.strip() for w in words]
    lengths = [display_len(t) for t in texts]
    times: list[tuple[float, float] | None] = []
    for w in words:
        s, e = _ms(w.start), _ms(w.end)
        times.append((s, max(s, e)) if s is not None and e is not None else None)
    seg_lo = _ms(seg_start) or 0.0
    seg_hi = _ms(seg_end)
    # Untimed runs get a share of the time between their timed neighbours.
    k = 0
    while k < len(words):
        if times[k] is not None:
            k += 1
            continue
        run_end = k
        while run_end < len(words) and times[run_end] is None:
            run_end += 1
        lo = times[k - 1][1] if k else seg_lo
        if run_end < len(words):
            hi = times[run_end][0]
        else:
            hi = seg_hi if seg_hi is not None else lo + 300.0 * (run_end - k)
        times[k:run_end] = _spread(lengths[k:run_end], lo, hi)
        k = run_end
    return [_Token(w, t, n, int(round(s)), int(round(e)), speaker, group)
            for w, t, n, (s, e) in zip(words, texts, lengths, times)]


def _repaired(tokens: Iterable[_Token], rules: Rules) -> Iterator[_Token]:
    """Grid the times and make them monotonic and disjoint: a word is cut where the next begins.
    Each token comes out once the next one's start is known (one token of look-ahead)."""
    q = rules.time_quantum_ms
    last = 0
    held: _Token | None = None
    for t in tokens:
        t.start = max(last, int(round(t.start / q)) * q)
        t.end = max(t.start, int(round(t.end / q)) * q)
        last = t.start
        if held is not None:
            held.end = min(held.end, t.start)
            yield held
        held = t
    if held is not None:
        yield held


def _repair(tokens: list[_Token], rules: Rules) -> None:
    """_repaired on a list, in place."""
    for _ in _repaired(tokens, rules):
        pass


def _segments_tokens(segments: Iterable[Segment]) -> Iterator[_Token]:
    for g, seg in enumerate(segments):
        words = seg.words
        if not words and seg.text.strip():  # a segment without word times still becomes cues
            words = [Word(text=t) for t in seg.text.split()]
        seg_tokens = _segment_tokens(words, seg.start, seg.end, seg.speaker, g)
        for t in seg_tokens:  # a word's own speaker (diarization) over its segment's
            if t.word.speaker is not None:
                t.speaker = t.word.speaker
        yield from seg_tokens


def _named(tokens: Iterable[_Token], names: Mapping[str, str], style: str) -> Iterator[_Token]:
    """Write a named speaker's name before the first word they say after someone else (or at the
    start): part of that word's text, so line length and reading speed count it."""
    previous: str | None = None
    for t in tokens:
        if t.speaker is not None and t.speaker != previous and t.speaker in names:
            t.text = speakers.name_prefix(names[t.speaker], style) + t.text
            t.length = display_len(t.text)
        if t.speaker is not None:
            previous = t.speaker
        yield t


class _Layout:
    """Where cues start and end: a shortest path over the boundaries between tokens (boundary k
    lies between tokens k-1 and k; a cue is an edge i -> j), fed one token at a time.

    dialogue: a cue may hold two speakers (a dialogue cue), any two or only these (first, second)
    pairs; voices: a speaker's WebVTT voice when it is not the label itself (their name).

    Streaming (issue 22: subtitle_gen's memory followed the film). Boundaries are weighed in
    order, each once every edge from it can be (the tokens up to where its cues stop fitting are
    in). Once boundaries 0..d-1 are weighed, the best path to the end, whatever comes, crosses d
    on an edge from a weighed boundary p whose edges reach d or beyond ("open"), and the best
    path to p is final. An edge reaches at most a cue's worth of tokens, so the open boundaries
    are few and their back pointers soon run through one boundary c (as a Viterbi decoder's
    traceback converges): the cues before c are final. `flush()` hands them out (timed and
    checked against the cue before them) and forgets their tokens. The arithmetic is the
    all-at-once programme's, in the same order (every best[j] is the same sum of the same
    floats), so the cues are the same; only when they come out differs (tests/unit/subtitles/
    test_subs_stream.py; against the engine before this, on generated films: the same files).
    What stays per token handed out: a None in each of the programme's lists (~0.1 KB).
    """

    def __init__(self, rules: Rules, fps: float | None, hard_groups: bool = False, lead_ms: float | None = None,
                 dialogue: bool | frozenset[tuple[str, str]] = False, voices: Mapping[str, str] | None = None):
        self.rules, self.fps, self.hard_groups, self.lead_ms = rules, fps, hard_groups, lead_ms
        self.dialogue, self.voices = dialogue, voices or {}
        self.sep_len = display_len(rules.word_separator)
        self.gap = rules.min_gap_ms(fps)
        self.lead = rules.max_lead * 1000 if lead_ms is None else lead_ms
        self.lag = rules.max_lag * 1000
        self.dash_len = display_len(rules.dialogue_dash)
        self.tokens: list[_Token | None] = []
        # per boundary: break cost, a cue must end here, a sentence ends here, a change between two
        # known speakers that a dialogue cue may hold
        self.bcost: list = [0.0]
        self.hard: list = [True]
        self.sentence: list = [True]
        self.turn: list = [False]
        self.prefix: list = [0]
        self.best: list = [0.0]
        self.back: list = [0]
        self.reach: list = [0]  # per boundary: the furthest cue end its edges were weighed to
        self.relaxed = 0  # boundaries whose edges are all weighed
        self.final = False  # every token is in
        self.done = 0  # cues are handed out up to this boundary
        self.forgotten = 0
        self.cues_out = 0
        self.last_cue: Cue | None = None

    def push(self, t: _Token) -> None:
        self.tokens.append(t)
        self.prefix.append(self.prefix[-1] + t.length)
        self.best.append(math.inf)
        self.back.append(0)
        self.reach.append(0)
        k = len(self.tokens) - 1
        if k:
            self._boundary(k)
        self._advance()

    def _boundary(self, k: int) -> None:
        rules, dialogue = self.rules, self.dialogue
        a, b = self.tokens[k - 1], self.tokens[k]
        pause = b.start - a.end
        new_group = a.group != b.group
        change = a.speaker != b.speaker
        turn = (change and bool(dialogue) and a.speaker is not None and b.speaker is not None
                and (dialogue is True or (a.speaker, b.speaker) in dialogue))
        hard = ((change and not turn) or pause >= rules.hard_pause * 1000 or (self.hard_groups and new_group))
        cost = linebreak.text_break_cost(a.text, b.text, rules)
        self.sentence.append(cost == linebreak.SENTENCE)
        if new_group and not self.hard_groups:
            cost = min(cost, linebreak.CLAUSE)
        if pause >= rules.soft_pause * 1000:
            cost = max(0.0, min(cost, linebreak.BEFORE_CONJ) - linebreak.CLAUSE)
        self.bcost.append(0.0 if hard or turn else cost)
        self.hard.append(hard or (turn and rules.max_lines < 2))
        self.turn.append(turn)

    def _advance(self) -> None:
        while self.relaxed < len(self.tokens) and self._relax(self.relaxed):
            self.relaxed += 1

    def _relax(self, i: int) -> bool:
        """Weigh every cue that starts at boundary i; False when that needs a token not yet in
        (then it is weighed again, whole, once more are: re-weighing an edge changes nothing)."""
        tokens, hard, turn, sentence, bcost, prefix = (self.tokens, self.hard, self.turn, self.sentence,
                                                       self.bcost, self.prefix)
        best, back, rules = self.best, self.back, self.rules
        n, final = len(tokens), self.final
        if best[i] == math.inf:
            return True
        sep_len, gap, lag, dash_len = self.sep_len, self.gap, self.lag, self.dash_len
        width, capacity = rules.max_chars_per_line, rules.max_cue_chars
        earliest = tokens[i].start - self.lead
        if i:
            earliest = max(earliest, tokens[i - 1].end + gap)
        last_sentence = -1
        turn_at = -1
        for j in range(i + 1, n + 1):
            if j == n and not final:
                return False
            if j > i + 1:
                if hard[j - 1]:
                    break
                if turn[j - 1]:
                    if turn_at >= 0 or not (i == 0 or hard[i] or turn[i] or sentence[i]):
                        break  # never a third speaker's turn; the first part starts an utterance
                    turn_at = j - 1
                if sentence[j - 1]:
                    last_sentence = j - 1
            span = tokens[j - 1].end - tokens[i].start
            single = j == i + 1
            if turn_at >= 0:
                # A dialogue cue: each speaker's words on their own dashed line.
                upper = prefix[turn_at] - prefix[i] + sep_len * (turn_at - i - 1) + dash_len
                lower = prefix[j] - prefix[turn_at] + sep_len * (j - turn_at - 1) + dash_len
                if upper > width or lower > width or span > rules.max_duration * 1000:
                    break
                if j < n and not (hard[j] or turn[j] or sentence[j]):
                    continue  # the second speaker's part ends where their utterance does
                chars = upper + lower
                cost = CUE_COST + FILL_COST * (chars / capacity) ** 2 + DIALOGUE_COST
                if j < n:
                    cost += END_WEIGHT * bcost[j]
            else:
                chars = prefix[j] - prefix[i] + sep_len * (j - i - 1)
                if not single and (chars > capacity or span > rules.max_duration * 1000):
                    break
                cost = CUE_COST + FILL_COST * (chars / capacity) ** 2
                if chars > width:
                    found = linebreak.split_lines([t.length for t in tokens[i:j]],
                                                  [0.0, *bcost[i + 1:j]], rules, sep_len)
                    if found is None:
                        if not single:
                            break  # more words won't fit either
                        cost += 100.0  # a lone word longer than the lines: allowed, reported
                    else:
                        cost += found[0]
                if j < n:
                    cost += END_WEIGHT * bcost[j]
                    if last_sentence > 0 and not sentence[j] and not hard[j] and not turn[j]:
                        cost += DANGLING_SENTENCE
            latest = tokens[j - 1].end + lag
            if j < n:
                latest = min(latest, tokens[j].start - gap)
            free = min(latest - earliest, rules.max_duration * 1000)
            if free < rules.min_duration * 1000:
                cost += SHORT_COST
            need = chars * 1000 / rules.max_cps if rules.max_cps > 0 else 0
            if need > free:
                cost += SPEED_COST * (need / max(free, 1.0) - 1)
            self.reach[i] = j
            if best[i] + cost < best[j]:
                best[j], back[j] = best[i] + cost, i
        return True

    def flush(self) -> CueResult:
        """The cues that are final by now (see the class), with their problems."""
        d = self.relaxed
        open_ = [p for p in range(self.done, d) if self.best[p] < math.inf and self.reach[p] >= d]
        common: set[int] | None = None
        for p in open_:
            chain = {self.done}
            while p > self.done:
                chain.add(p)
                p = self.back[p]
            if p != self.done:  # every path still open runs through the last cut (see the class)
                raise AssertionError(f"a path skips boundary {self.done} (to {p})")
            common = chain if common is None else common & chain
        return self._hand_out(max(common) if common else self.done)

    def finish(self) -> CueResult:
        """Every cue left, once every token is in."""
        self.final = True
        self._advance()
        return self._hand_out(len(self.tokens))

    def _hand_out(self, upto: int) -> CueResult:
        if upto <= self.done:
            return CueResult([], [])
        edges = [upto]
        while edges[-1] > self.done:
            edges.append(self.back[edges[-1]])
        edges.reverse()
        then = self.tokens[upto].start if upto < len(self.tokens) else math.inf
        result = self._finish(list(itertools.pairwise(edges)), then)
        self.done = upto
        for name in ("bcost", "hard", "sentence", "turn", "prefix", "best", "back", "reach"):
            values = getattr(self, name)
            for k in range(self.forgotten, upto):
                values[k] = None
        for k in range(max(0, self.forgotten - 1), upto - 1):  # tokens[upto - 1]: the next cue's earliest
            self.tokens[k] = None
        self.forgotten = upto
        return result

    def _finish(self, ranges: list[tuple[int, int]], then: float) -> CueResult:
        """Lines, times and problems of the cues `ranges` (token ranges, in order); `then`: where
        the speech after the last of them starts."""
        tokens, bcost, rules = self.tokens, self.bcost, self.rules
        sep = rules.word_separator
        lines_per_cue, voices_per_cue, chars = [], [], []
        for i, j in ranges:
            texts = [t.text for t in tokens[i:j]]
            turn_at = next((k for k in range(i + 1, j) if tokens[k].speaker != tokens[k - 1].speaker), None)
            if turn_at is not None:  # a dialogue cue (only _relax's dialogue ranges hold two speakers)
                lines = [rules.dialogue_dash + _one_line(texts[:turn_at - i], sep),
                         rules.dialogue_dash + _one_line(texts[turn_at - i:], sep)]
                who = [tokens[i].speaker, tokens[turn_at].speaker]
            else:
                lines = linebreak.lay_lines(texts, [0.0, *bcost[i + 1:j]], rules)
                if lines is None:  # a word longer than the lines: kept whole, reported below
                    pieces, _, glued = linebreak.hyphen_pieces(texts)
                    lines = linebreak.join_lines(pieces, [], sep, glued)
                who = [tokens[i].speaker] * len(lines)
            lines_per_cue.append(lines)
            voices_per_cue.append([] if None in who else [self.voices.get(w, w) for w in who])
            chars.append(sum(display_len(x) for x in lines))
        after = self.last_cue.end_ms if self.last_cue is not None else None
        times = place_cues([(tokens[i].start, tokens[j - 1].end) for i, j in ranges], chars, rules, self.fps,
                           self.lead_ms, after=after, then=then)
        cues = [Cue(s, e, lines, [t.word for t in tokens[i:j]], tokens[i].speaker, who)
                for (i, j), (s, e), lines, who in zip(ranges, times, lines_per_cue, voices_per_cue)]
        # the cue before these (handed out earlier) is checked again for their order and gap only
        before = [self.last_cue] if self.last_cue is not None else []
        first = self.cues_out
        problems = [Problem(v.rule, first + v.cue - len(before), v.message)
                    for v in check_cues(before + cues, rules, self.fps) if v.cue >= len(before)]
        for k, (i, j) in enumerate(ranges):
            for t in tokens[i:j]:
                if t.length > rules.max_chars_per_line:
                    problems.append(Problem("long_word", first + k, f"{t.text!r} is {t.length} chars, longer than a line"))
            s, e = cues[k].start_ms, cues[k].end_ms
            speech_start, speech_end = tokens[i].start, tokens[j - 1].end
            if s < speech_start - rules.max_lead * 1000 - 1 or s > speech_start + rules.max_start_delay * 1000 + 1:
                problems.append(Problem("sync", first + k, f"starts {(s - speech_start) / 1000:+.2f} s from its speech"))
            elif e > speech_end + rules.max_lag * 1000 + 1 or e < speech_end - rules.max_lead * 1000 - 1:
                problems.append(Problem("sync", first + k, f"ends {(e - speech_end) / 1000:+.2f} s from its speech"))
        problems.sort(key=lambda p: (p.cue if p.cue is not None else -1, p.rule))
        self.cues_out += len(cues)
        self.last_cue = cues[-1] if cues else self.last_cue
        return CueResult(cues, problems)


def _layout(tokens: list[_Token], rules: Rules, fps: float | None,
            hard_groups: bool = False, lead_ms: float | None = None,
            dialogue: bool | frozenset[tuple[str, str]] = False,
            voices: Mapping[str, str] | None = None) -> CueResult:
    """The cues of `tokens`, all at once (_Layout)."""
    layout = _Layout(rules, fps, hard_groups, lead_ms, dialogue, voices)
    for t in tokens:
        layout.push(t)
    return layout.finish()


def _one_line(texts: list[str], sep: str) -> str:
    pieces, _, glued = linebreak.hyphen_pieces(texts)
    return linebreak.join_lines(pieces, [], sep, glued)[0]


def _transcript_layout(segments: Callable[[], Iterable[Segment]], rules: Rules, fps: float | None,
                       speaker_names: Mapping[str, str] | None, name_style: speakers.NameStyle):
    """(a _Layout set up for a transcript's cues, its tokens as they come: repaired, named)."""
    tokens = _repaired(_segments_tokens(segments()), rules)
    names = {}
    if speaker_names:  # who speaks first, second ...: a pass over the words before the one that lays them out
        names = speakers.resolve_names(speaker_names,
                                       speakers.appearance_order(t.speaker for t in _segments_tokens(segments())))
    if names:
        speakers.name_prefix("", name_style)  # an unknown style fails before any work
        tokens = _named(tokens, names, name_style)
    return _Layout(rules, fps, dialogue=True, voices=names), tokens


def build_cues(transcript: Transcript, rules: Rules, fps: float | None = None,
               speaker_names: Mapping[str, str] | None = None,
               name_style: speakers.NameStyle = "brackets") -> CueResult:
    """Cues for a transcript's words. Every word (with non-blank text) lands in exactly one cue, in order.

    Speakers (a word's `speaker`, else its segment's): no line holds two, a cue holds two only as a
    dialogue cue (one dashed line each), each cue's `voices` name its lines' speakers for WebVTT.
    speaker_names (keys: labels or places in order of appearance, speakers.resolve_names) writes
    a name where its speaker starts talking, in `name_style` (speakers.name_prefix). A transcript
    without speakers gives exactly the cues it always did.
    """
    layout, tokens = _transcript_layout(lambda: transcript.segments, rules, fps, speaker_names, name_style)
    for t in tokens:
        layout.push(t)
    return layout.finish()


def stream_cues(segments: Callable[[], Iterable[Segment]], rules: Rules, fps: float | None = None,
                speaker_names: Mapping[str, str] | None = None,
                name_style: speakers.NameStyle = "brackets") -> Iterator[CueResult]:
    """build_cues over a transcript's segments as they come (`segments()` iterates them; twice when
    speaker_names are given): the same cues and problems, in batches, each as soon as it is final,
    holding a few cues' worth of words instead of the film's (_Layout)."""
    layout, tokens = _transcript_layout(segments, rules, fps, speaker_names, name_style)
    for n, t in enumerate(tokens, 1):
        layout.push(t)
        if n % FLUSH_EVERY == 0:
            yield layout.flush()
    yield layout.finish()


def _split_text(text: str, rules: Rules) -> list[str]:
    if rules.word_separator:
        return text.split()
    return [c for c in clusters("".join(text.split()))]


def _tokens_over_cues(source_cues: Sequence[Cue], texts: Sequence[str], rules: Rules,
                      join_gap_ms: float | None = None) -> list[_Token]:
    """Untimed text laid over cue times, each word a share of the time by its length.

    With join_gap_ms, cues closer than that form one block of continuous speech and share its time,
    so a crowded cue borrows from a roomy neighbour; each word keeps its cue as its group.
    """
    blocks: list[list[int]] = []
    for k, cue in enumerate(source_cues):
        prev = source_cues[k - 1] if k else None
        if (blocks and join_gap_ms is not None and prev is not None and prev.speaker == cue.speaker
                and cue.start_ms - prev.end_ms < join_gap_ms):
            blocks[-1].append(k)
        else:
            blocks.append([k])
    tokens: list[_Token] = []
    for block in blocks:
        words, groups = [], []
        for k in block:
            split = _split_text(texts[k], rules)
            words += [Word(text=t) for t in split]
            groups += [k] * len(split)
        first, last = source_cues[block[0]], source_cues[block[-1]]
        end = max(source_cues[k].end for k in block)
        block_tokens = _segment_tokens(words, first.start, max(end, last.end), first.speaker, block[0])
        for t, g in zip(block_tokens, groups):
            t.group = g
        _not_before_own_cue(block_tokens, source_cues)
        tokens += block_tokens
    _repair(tokens, rules)
    for t in tokens:  # these words are ours: give them the times they were laid out with
        t.word.start, t.word.end = t.start / 1000, t.end / 1000
    return tokens


def _not_before_own_cue(tokens: list[_Token], source_cues: Sequence[Cue]) -> None:
    """A word is never said before the cue it was written in began: a crowded cue may borrow time
    from the roomy cue after it, never from the one before. A cue whose words the block's spread
    put too early gets them spread again over [its own start, where its last word ended]."""
    k = 0
    while k < len(tokens):
        g, first = tokens[k].group, k
        while k < len(tokens) and tokens[k].group == g:
            k += 1
        own = tokens[first:k]
        lo = source_cues[g].start_ms
        if own[0].start >= lo:
            continue
        hi = max(own[-1].end, lo + 1)
        for t, (a, b) in zip(own, _spread([t.length for t in own], lo, hi)):
            t.start, t.end = int(round(a)), int(round(b))


def distribute_translation(source_cues: Sequence[Cue], translated_texts: Sequence[str], rules: Rules,
                           fps: float | None = None) -> CueResult:
    """Cues for text without word times, one text per source cue, laid over that cue's time.

    Each source cue's span is shared among its words by length; a text too long for one cue is split
    with the same rules, and no output cue straddles two source cues. The output cues' words are new
    Word objects with the interpolated times.
    """
    if len(source_cues) != len(translated_texts):
        raise ValueError(f"{len(translated_texts)} texts for {len(source_cues)} source cues")
    tokens = _tokens_over_cues(source_cues, translated_texts, rules)
    result = _layout(tokens, rules, fps, hard_groups=True)
    for k, text in enumerate(translated_texts):
        if not text.strip():
            result.problems.append(Problem("empty_text", None, f"no text for source cue {k + 1}"))
    return result


def reflow(cues: Sequence[Cue], rules: Rules, fps: float | None = None) -> CueResult:
    """Re-lay existing cues (e.g. a user's SRT) with the rules; old cue ends are good break points.

    No cue starts before its first word: a file's words get their times spread over the cue they
    were in, so the old cue's start is the earliest the speech is known to begin, and showing text
    before it (the `max_lead` the engine allows on ASR word times) would put it over silence or the
    previous speaker."""
    cues, pairs = _split_dialogue(cues, rules)
    texts = [rules.word_separator.join(c.lines) for c in cues]
    tokens = _tokens_over_cues(cues, texts, rules, join_gap_ms=rules.soft_pause * 1000)
    result = _layout(tokens, rules, fps, hard_groups=False, lead_ms=0, dialogue=pairs)
    for cue in result.cues:  # the parts' labels are ours, not speakers a file named
        if cue.speaker is not None and cue.speaker.startswith(_PART):
            cue.speaker, cue.voices = None, []
    return result


_PART = "\x00dialogue-part:"  # a label no file's speaker name can be (pysubs2 reads ASS names as text)


def _split_dialogue(cues: Sequence[Cue], rules: Rules) -> tuple[list[Cue], frozenset[tuple[str, str]]]:
    """A file's dialogue cue (every line starts with the dash, two lines or more) as one cue per
    line, each its own speaker over its share of the time: re-flowing it then keeps each line's
    words apart and may rebuild the dialogue cue, but never joins the lines into one
    ("-Are you coming? -In a minute."). Only a cue's own lines may share a dialogue cue again:
    whether the last line of one cue and the first of the next are one person, a file doesn't say."""
    out: list[Cue] = []
    pairs: set[tuple[str, str]] = set()
    for k, cue in enumerate(cues):
        parts = speakers.dialogue_cue(cue.lines, rules.dialogue_dash)
        if parts is None or len(parts) < 2:  # "-20 degrees" / "-30 tomorrow" are no speakers' lines
            out.append(cue)
            continue
        labels = [f"{_PART}{k}.{n}" for n in range(len(parts))]
        pairs.update(zip(labels, labels[1:]))
        spans = _spread([display_len(p) for p in parts], cue.start_ms, cue.end_ms)
        for part, label, (a, b) in zip(parts, labels, spans):
            out.append(Cue(int(round(a)), int(round(b)), [part], speaker=label))
    return out, frozenset(pairs)


def fix_file(path: str | Path, out: str | Path, rules: Rules, fps: float | None = None,
             fmt: str | None = None, encoding: str | None = None):
    """Re-flow a subtitle file with `rules` and write it to `out` (format from fmt or out's suffix).

    Returns the engine's CueResult: the new cues and any problems it could not avoid.
    """
    result = reflow(read_subtitles(path, encoding=encoding), rules, fps)
    write_subtitles(result.cues, out, fmt)
    return result
