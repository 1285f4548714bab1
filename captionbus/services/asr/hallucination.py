"""Cleans Whisper output of what Whisper makes up, before the transcript is written (both asr
backends). Pure: segments in, segments and a report out; no ML imports.

Rules, in the order they run:
  tags       sound tags ([Music], (applause), *laughs*) and ♪/♫ are stripped; a segment left
             empty is dropped ("sound_tag"); one with text left after a music tag or a note is
             flagged "lyrics".
  loops      Whisper's looping: the same n-gram (n = 1..6 words) repeated back to back
             (LOOP_MIN_REPEATS[n] times or more) is collapsed to one occurrence; in languages
             written without spaces the same is done on characters inside a word. The same
             segment text repeated in REPEATED_SEGMENT_MIN consecutive segments keeps the first
             ("loop").
  non_speech with speech regions (the vad stage): words that overlap the regions (widened by
             REGION_TOLERANCE_S for timing jitter) by less than MIN_SPEECH_OVERLAP of their span
             are dropped, and so are segments left without words or, for segments without word
             times, overlapping by less than that ("non_speech").
  phantom    whole segments that are one of Whisper's known phantom phrases (PHANTOM_PHRASES:
             "Thanks for watching!", Amara.org credits ...): dropped where they sit in little or
             no speech, kept and flagged "hallucination-suspect" where the regions say someone
             speaks there ("phantom"); see _drop_phantoms for the weak ones ("you", "Thank you.").
  sung       a segment of sustained words (median word SUNG_WORD_S or longer) is flagged "lyrics".
  suspect    kept segments that overlap speech only partly, or whose words Whisper itself was
             unsure of, are flagged "hallucination-suspect".

A segment whose words or text a rule changes keeps `tokens` (the decoder's, which the gateway
returns as OpenAI's verbose_json `tokens`) consistent with what is left: the tokens of the words it
keeps, where each word carries its own (DecodedWord: the whisperx backend's words are timed from
them), else None -- unknown, as the contract says, never the tokens of text that was dropped.
mlx-whisper reports tokens per segment only, so its edited segments have None.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from pydantic import Field

from captionbus.contracts.transcript import Segment, Word

LYRICS = "lyrics"
SUSPECT = "hallucination-suspect"

# n-gram length -> back-to-back occurrences that make a loop. Single words need more: people
# do say "no no no" or "very very very"; nobody says the same two words four times running.
LOOP_MIN_REPEATS = {1: 5, 2: 4, 3: 3, 4: 3, 5: 3, 6: 3}
LOOP_MAX_NGRAM = 6
# A character sequence (2..30 characters) repeated this often inside one unspaced word.
CHAR_LOOP_MIN_REPEATS = 4
REPEATED_SEGMENT_MIN = 3

MIN_SPEECH_OVERLAP = 0.2  # below this share of its span inside speech, text is non-speech
LOW_SPEECH_OVERLAP = 0.5  # a phantom phrase is dropped below this; other text flagged suspect
REGION_TOLERANCE_S = 0.2  # word times from cross-attention are off by this much at region edges
ISOLATED_GAP_S = 2.0  # without regions, a weak phantom with this much nothing around it is suspect
SUNG_WORD_S = 0.8  # median word length that speech does not reach (~0.3 s) but singing does
SUNG_MIN_WORDS = 3
LOW_WORD_SCORE = 0.15  # mean Whisper word probability under which a kept segment is suspect

# Known phantom lines: what Whisper writes over silence, music or noise because its training
# subtitles carried credits and channel outros. Sources: openai/whisper discussions #679, #928,
# #1783 and issue #1606 (Amara.org, "Thanks for watching", Korean/Japanese/Chinese outros, the
# Chinese "明镜与点点" and "李宗盛" lines, the ZDF/funk German credits, DimaTorzok in Russian),
# faster-whisper #1045, and Koenecke et al. 2024 "Careless Whisper" (phantom "Thank you for
# watching" / "you"). Entries marked (analogue) are the same outro in languages where we have
# not seen it ourselves. Matched after normalise(): lowercase, punctuation and spacing dropped.
# strong: never a line of dialogue on its own -> dropped unless the regions say it is speech.
PHANTOM_PHRASES = [
    # en
    "thank you for watching", "thanks for watching", "thank you so much for watching",
    "thank you for watching and see you next time", "thanks for watching and see you next time",
    "please subscribe", "please subscribe to my channel", "subscribe to my channel",
    "like and subscribe", "please like and subscribe", "dont forget to like and subscribe",
    "dont forget to subscribe", "see you in the next video", "see you next time",
    "subtitles by the amaraorg community", "transcription by castingwords",
    "thank you for watching please subscribe", "thanks for watching please subscribe",
    # hi (analogue): "thanks for watching", "please subscribe (to the channel)"
    "देखने के लिए धन्यवाद", "वीडियो देखने के लिए धन्यवाद", "कृपया सब्सक्राइब करें",
    "चैनल को सब्सक्राइब करें", "सब्सक्राइब करें",
    # ta, te, bn, mr (analogue): "thanks for watching"
    "பார்த்ததற்கு நன்றி", "చూసినందుకు ధన్యవాదాలు", "দেখার জন্য ধন্যবাদ", "पाहिल्याबद्दल धन्यवाद",
    # ja
    "ご視聴ありがとうございました", "ご視聴ありがとうございます", "チャンネル登録お願いします",
    "チャンネル登録よろしくお願いします", "最後までご視聴いただきありがとうございました",
    # zh
    "请不吝点赞订阅转发打赏支持明镜与点点栏目", "谢谢观看", "感谢观看", "字幕由amaraorg社区提供",
    "中文字幕志愿者李宗盛", "谢谢大家收看",
    # ko
    "시청해주셔서 감사합니다", "구독과 좋아요 부탁드립니다", "구독 좋아요 부탁드립니다",
    # de
    "vielen dank fürs zuschauen", "untertitel der amaraorgcommunity", "untertitel im auftrag des zdf",
    "untertitel im auftrag des zdf für funk 2017", "untertitelung im auftrag des zdf 2021",
    # fr, es, pt, it, nl
    "merci davoir regardé", "soustitres réalisés par la communauté damaraorg",
    "gracias por ver", "gracias por ver el video", "subtítulos realizados por la comunidad de amaraorg",
    "obrigado por assistir", "legendas pela comunidade amaraorg",
    "grazie per la visione", "sottotitoli creati dalla comunità amaraorg",
    "bedankt voor het kijken", "ondertiteld door de amaraorg gemeenschap",
    # ru
    "спасибо за просмотр", "продолжение следует", "субтитры сделал dimatorzok",
    "субтитры создавал dimatorzok", "редактор субтитров асемкин корректор аегорова",
]
# weak: also real dialogue ("You." "Thank you.") -> dropped only in silence (outside the regions,
# or the only text of a clip without regions); see _drop_phantoms.
WEAK_PHANTOM_PHRASES = [
    "you", "thank you", "thanks", "thank you very much", "bye", "bye bye",
    "धन्यवाद", "ありがとうございました", "谢谢", "감사합니다", "danke", "merci", "gracias", "спасибо",
]
# Credit lines vary by name and year: any segment matching one of these is a strong phantom.
PHANTOM_PATTERNS = [
    re.compile(p)
    for p in (
        r"amaraorg",
        r"^(subtitles|captions|transcription|transcribed|translated|translation) by\b",
        r"^untertitel(ung)? (im auftrag|der|von)\b",
        r"^sous ?titr",
        r"^субтитры (сделал|создавал|подогнал|подготовил)",
        r"dimatorzok",
        r"明镜与点点",
        r"字幕(志愿者|由|制作)",
    )
]

# Sound tags as Whisper learned them from SDH subtitles.
SOUND_TAG = re.compile(r"[\[(*]\s*([^\])*]{1,40}?)\s*[\])*]")
MUSIC_WORDS = re.compile(r"\b(music|musik|musique|música|singing|sings|song|humming|melody|instrumental)\b|音楽|音乐|संगीत", re.I)
MUSIC_NOTES = "♪♫♬🎵🎶"
UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")


@dataclass
class Dropped:
    reason: str
    start: float
    end: float
    text: str


@dataclass
class FilterReport:
    dropped: list[Dropped] = field(default_factory=list)  # whole segments
    loop_words_dropped: int = 0  # words removed by collapsing loops inside segments
    non_speech_words_dropped: int = 0
    flagged: Counter = field(default_factory=Counter)  # flag -> segments

    @property
    def dropped_by_reason(self) -> Counter:
        return Counter(d.reason for d in self.dropped)

    @property
    def anything_dropped(self) -> bool:
        return bool(self.dropped or self.loop_words_dropped or self.non_speech_words_dropped)

    def metrics(self) -> dict[str, float]:
        out = {
            "hallucinations_dropped": float(len(self.dropped)),
            "hallucination_loop_words_dropped": float(self.loop_words_dropped),
            "hallucination_non_speech_words_dropped": float(self.non_speech_words_dropped),
            "segments_flagged_lyrics": float(self.flagged[LYRICS]),
            "segments_flagged_suspect": float(self.flagged[SUSPECT]),
        }
        for reason, count in self.dropped_by_reason.items():
            out[f"hallucinations_dropped_{reason}"] = float(count)
        return out

    def summary(self) -> str:
        parts = [f"{n} {reason}" for reason, n in sorted(self.dropped_by_reason.items())]
        if self.loop_words_dropped:
            parts.append(f"{self.loop_words_dropped} looped words")
        if self.non_speech_words_dropped:
            parts.append(f"{self.non_speech_words_dropped} words outside speech")
        return ", ".join(parts)


def normalise(text: str) -> str:
    """Lowercase, no punctuation or symbols, single spaces; for comparing, not for output."""
    kept = "".join(ch if not unicodedata.category(ch)[0] in "PS" else "" for ch in text.lower())
    return " ".join(kept.split())


def _unspaced(text: str) -> bool:
    return any(unicodedata.name(ch, "").startswith(UNSPACED_SCRIPTS) for ch in text)


# ---------------------------------------------------------------- segment <-> word editing

def _joiner(segment: Segment) -> str:
    return " " if " " in segment.text.strip() or not _unspaced(segment.text) else ""


class DecodedWord(Word):
    """A word with the decoder's tokens that spell it, for this process only: `tokens` is left out
    of the transcript (excluded, and a Segment writes its words as Word), it lets a segment the
    cleaner edits keep the tokens of the words it keeps (_kept_tokens)."""

    tokens: list[int] | None = Field(default=None, exclude=True)


def _retext(word: Word, text: str) -> Word:
    """`word` saying `text`; a DecodedWord's tokens spell the old text, so they are forgotten."""
    if text == word.text:
        return word
    return word.model_copy(update={"text": text, **({"tokens": None} if isinstance(word, DecodedWord) else {})})


def _kept_tokens(segment: Segment, words: list[Word], text: str) -> list[int] | None:
    """The segment's decoder tokens once `words` (`text` for an untimed segment) are what is left:
    all of them when nothing changed; the kept words' own, in order, when each has its own; else None."""
    if segment.tokens is None:
        return None
    if [w.text for w in words] == [w.text for w in segment.words] and (segment.words or text == segment.text):
        return segment.tokens
    own = [w.tokens if isinstance(w, DecodedWord) else None for w in words]
    if not own or any(ids is None for ids in own):
        return None
    return [t for ids in own for t in ids]


def _pieces(segment: Segment) -> list[Word]:
    """The segment's words, or its text split at spaces (untimed) when it has none."""
    if segment.words:
        return [w.model_copy() for w in segment.words]
    return [Word(text=t) for t in segment.text.split()]


def _rebuilt(segment: Segment, pieces: list[Word]) -> Segment:
    texts = [t.text.strip() for t in pieces if t.text.strip()]
    text = _joiner(segment).join(texts)
    update: dict = {"text": text}
    words: list[Word] = []
    if segment.words:
        words = [t for t in pieces if t.text.strip()]
        update["words"] = words
        starts = [w.start for w in words if w.start is not None]
        ends = [w.end for w in words if w.end is not None]
        if starts and ends:
            update["start"], update["end"] = min(starts), max(ends)
    update["tokens"] = _kept_tokens(segment, words, text)
    return segment.model_copy(update=update)


def _flag(segment: Segment, flag: str, report: FilterReport) -> Segment:
    if flag in segment.flags:
        return segment
    report.flagged[flag] += 1
    return segment.model_copy(update={"flags": [*segment.flags, flag]})


# ---------------------------------------------------------------- rule: sound tags / lyrics

def strip_sound_tags(text: str) -> tuple[str, bool]:
    """Text without sound tags and music notes, and whether music was marked."""
    music = any(note in text for note in MUSIC_NOTES)

    def tag(match: re.Match) -> str:
        nonlocal music
        music = music or bool(MUSIC_WORDS.search(match.group(1)))
        return " "

    # Only tags that contain no speech-like punctuation are tags: "(laughs)" yes, "(I said so)" also
    # goes - SDH puts only sounds and speaker notes in brackets, and neither belongs in speech text.
    text = SOUND_TAG.sub(tag, text)
    for note in MUSIC_NOTES:
        text = text.replace(note, " ")
    return " ".join(text.split()), music


def _strip_tags(segment: Segment, report: FilterReport) -> Segment | None:
    if not any(ch in segment.text for ch in "[(*" + MUSIC_NOTES):
        return segment
    if not segment.words:
        text, music = strip_sound_tags(segment.text)
        cleaned = segment.model_copy(update={"text": text, "tokens": _kept_tokens(segment, [], text)})
    else:
        # Tags can span several words ("[Music", "playing]"): find them in the joined text and
        # drop the words that lie inside one; every other word stays (minus notes on its own).
        joined, spans = "", []
        for word in segment.words:
            start = len(joined) + (1 if joined else 0)
            joined = f"{joined} {word.text}" if joined else word.text
            spans.append((start, start + len(word.text)))
        _, music = strip_sound_tags(joined)
        tags = [(m.start(), m.end()) for m in SOUND_TAG.finditer(joined)]
        kept: list[Word] = []
        for word, (start, end) in zip(segment.words, spans):
            if any(tag_start <= start and end <= tag_end for tag_start, tag_end in tags):
                continue
            text, _ = strip_sound_tags(word.text)
            if text:
                kept.append(_retext(word, text))
        cleaned = _rebuilt(segment, kept)
    if not normalise(cleaned.text):
        report.dropped.append(Dropped("sound_tag", segment.start, segment.end, segment.text))
        return None
    return _flag(cleaned, LYRICS, report) if music else cleaned


# ---------------------------------------------------------------- rule: loops

def collapse_loops(keys: Sequence[str]) -> list[int]:
    """Indexes of `keys` to keep once every back-to-back repeated n-gram (n = 1..6) repeated
    LOOP_MIN_REPEATS[n] times or more is reduced to its first occurrence. Longer n-grams are
    looked for first, so "a b a b a b" collapses as "a b", not as single words."""
    keep = list(range(len(keys)))
    changed = True
    while changed:
        changed = False
        current = [keys[i] for i in keep]
        for n in range(LOOP_MAX_NGRAM, 0, -1):
            start = 0
            while start + n <= len(current):
                gram = current[start : start + n]
                repeats = 1
                while current[start + repeats * n : start + (repeats + 1) * n] == gram:
                    repeats += 1
                if repeats >= LOOP_MIN_REPEATS[n] and any(gram):
                    del keep[start + n : start + repeats * n]
                    changed = True
                    break
                start += 1
            if changed:
                break
    return keep


CHAR_LOOP = re.compile(r"(.{2,30}?)\1{%d,}" % (CHAR_LOOP_MIN_REPEATS - 1))


def collapse_char_loops(text: str) -> str:
    """"ありがとうありがとうありがとうありがとう" -> "ありがとう" (unspaced scripts only)."""
    return CHAR_LOOP.sub(r"\1", text) if _unspaced(text) else text


def _collapse_loops(segment: Segment, report: FilterReport) -> Segment:
    pieces = _pieces(segment)
    keep = collapse_loops([normalise(t.text) for t in pieces])
    changed = len(keep) < len(pieces)
    report.loop_words_dropped += len(pieces) - len(keep)
    pieces = [pieces[i] for i in keep]
    for k, piece in enumerate(pieces):
        collapsed = collapse_char_loops(piece.text)
        if collapsed != piece.text:
            pieces[k], changed = _retext(piece, collapsed), True
            report.loop_words_dropped += 1
    return _rebuilt(segment, pieces) if changed else segment


def _drop_repeated_segments(segments: list[Segment], report: FilterReport) -> list[Segment]:
    kept: list[Segment] = []
    i = 0
    while i < len(segments):
        key = normalise(segments[i].text)
        j = i + 1
        while j < len(segments) and normalise(segments[j].text) == key:
            j += 1
        kept.append(segments[i])
        if key and j - i >= REPEATED_SEGMENT_MIN:
            report.dropped.extend(Dropped("loop", s.start, s.end, s.text) for s in segments[i + 1 : j])
        else:
            kept.extend(segments[i + 1 : j])
        i = j
    return kept


# ---------------------------------------------------------------- rule: text in non-speech

def speech_overlap(start: float, end: float, regions: Sequence[tuple[float, float]], tolerance: float = 0.0) -> float:
    """Share of [start, end] inside the regions (each widened by `tolerance`); a zero-length
    span counts 1.0 when it lies inside one."""
    if end <= start:
        return 1.0 if any(a - tolerance <= start <= b + tolerance for a, b in regions) else 0.0
    inside = sum(max(0.0, min(end, b + tolerance) - max(start, a - tolerance)) for a, b in regions)
    return min(1.0, inside / (end - start))


def _drop_non_speech(segment: Segment, regions: Sequence[tuple[float, float]], report: FilterReport) -> Segment | None:
    timed = [w for w in segment.words if w.start is not None and w.end is not None]
    if timed:
        kept = [
            w
            for w in segment.words
            if w.start is None or w.end is None or speech_overlap(w.start, w.end, regions, REGION_TOLERANCE_S) >= MIN_SPEECH_OVERLAP
        ]
        if not any(w.start is not None for w in kept):
            report.dropped.append(Dropped("non_speech", segment.start, segment.end, segment.text))
            return None
        if len(kept) < len(segment.words):
            report.non_speech_words_dropped += len(segment.words) - len(kept)
            return _rebuilt(segment, kept)
        return segment
    if speech_overlap(segment.start, segment.end, regions, REGION_TOLERANCE_S) < MIN_SPEECH_OVERLAP:
        report.dropped.append(Dropped("non_speech", segment.start, segment.end, segment.text))
        return None
    return segment


# ---------------------------------------------------------------- rule: phantom phrases

_STRONG = {normalise(p) for p in PHANTOM_PHRASES}
_STRONG_SQUASHED = {p.replace(" ", "") for p in _STRONG}  # spacing varies in CJK and Korean output
_WEAK = {normalise(p) for p in WEAK_PHANTOM_PHRASES}
_SENTENCES = re.compile(r"(?<=[.!?।])\s+|(?<=[。！？])")  # "Amara.org" is not two sentences


def phantom_kind(text: str) -> str | None:
    """"strong" / "weak" when the whole text is known phantom lines (each sentence of it), else None."""
    sentences = [normalise(s) for s in _SENTENCES.split(text)]
    sentences = [s for s in sentences if s]
    if not sentences:
        return None
    kinds = []
    for sentence in sentences:
        squashed = sentence.replace(" ", "")
        if sentence in _STRONG or squashed in _STRONG_SQUASHED or any(p.search(sentence) for p in PHANTOM_PATTERNS):
            kinds.append("strong")
        elif sentence in _WEAK:
            kinds.append("weak")
        else:
            return None
    return "strong" if "strong" in kinds else "weak"


def _isolated(segments: list[Segment], i: int, duration: float | None) -> bool:
    before = segments[i].start - (segments[i - 1].end if i > 0 else 0.0)
    if i + 1 < len(segments):
        after = segments[i + 1].start - segments[i].end
    else:
        after = (duration - segments[i].end) if duration is not None else ISOLATED_GAP_S
    return before >= ISOLATED_GAP_S and after >= ISOLATED_GAP_S


def _drop_phantoms(segments: list[Segment], regions, duration: float | None, report: FilterReport) -> list[Segment]:
    """With regions: a phantom line mostly outside speech goes; inside speech a strong one is
    flagged, a weak one ("Thank you.") is dialogue. Without regions: strong lines go; a weak
    line goes when it is all there is (Whisper's "you" on a silent clip) and is flagged when it
    stands alone in a long silence, where real "Thank you."s are also said."""
    kept: list[Segment] = []
    for i, segment in enumerate(segments):
        kind = phantom_kind(segment.text)
        if kind is None:
            kept.append(segment)
            continue
        if regions is not None:
            drop = speech_overlap(segment.start, segment.end, regions, REGION_TOLERANCE_S) < LOW_SPEECH_OVERLAP
            flag = kind == "strong"
        else:
            drop = kind == "strong" or len(segments) == 1
            flag = _isolated(segments, i, duration)
        if drop:
            report.dropped.append(Dropped("phantom", segment.start, segment.end, segment.text))
        else:
            kept.append(_flag(segment, SUSPECT, report) if flag else segment)
    return kept


# ---------------------------------------------------------------- rules: sung, suspect

def _sung(segment: Segment) -> bool:
    lengths = sorted(w.end - w.start for w in segment.words if w.start is not None and w.end is not None)
    return len(lengths) >= SUNG_MIN_WORDS and lengths[len(lengths) // 2] >= SUNG_WORD_S


def _suspect(segment: Segment, regions) -> bool:
    if regions is not None and speech_overlap(segment.start, segment.end, regions, REGION_TOLERANCE_S) < LOW_SPEECH_OVERLAP:
        return True
    scores = [w.score for w in segment.words if w.score is not None]
    return bool(scores) and sum(scores) / len(scores) < LOW_WORD_SCORE


# ---------------------------------------------------------------- all together

def clean_segments(
    segments: Iterable[Segment],
    regions: Sequence[tuple[float, float]] | None = None,
    duration: float | None = None,
) -> tuple[list[Segment], FilterReport]:
    """Apply every rule (module docstring); `regions` are the speech regions in seconds, or None
    when no vad ran; `duration` the audio length (for "isolated" at the end)."""
    report = FilterReport()
    regions = None if regions is None else sorted((float(a), float(b)) for a, b in regions)
    out: list[Segment] = []
    for segment in segments:
        segment = _strip_tags(segment, report)
        if segment is None:
            continue
        segment = _collapse_loops(segment, report)
        if regions is not None:
            segment = _drop_non_speech(segment, regions, report)
            if segment is None:
                continue
        out.append(segment)
    out = _drop_repeated_segments(out, report)
    out = _drop_phantoms(out, regions, duration, report)
    for i, segment in enumerate(out):
        if _sung(segment):
            segment = _flag(segment, LYRICS, report)
        if _suspect(segment, regions):
            segment = _flag(segment, SUSPECT, report)
        out[i] = segment
    return out, report
