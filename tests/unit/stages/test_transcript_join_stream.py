"""transcript_join streams the chunks (issue 22): one chunk's transcript parsed at a time, segments
written as they come. Its file must be byte for byte what the in-memory join (every chunk parsed,
all segments sorted together: the stage before issue 22, kept as join_in_memory) writes, on
generated many-chunk films: ties across chunks, unsorted segments inside a chunk, words without
times, speakers from turns, a language input or none. Chunks that overlap in time are joined in
memory, with the same result; peak memory follows one chunk, not the film."""
from __future__ import annotations

import random
import tracemalloc
from itertools import pairwise
from pathlib import Path

import pytest

from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns, SpokenLanguage
from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.services.runtime import BadInput
from captionbus.services.transcript_join.stage import STAGE, Unordered, join_in_memory, join_streaming

TEXTS = ["The quick brown fox", "jumps over", "São Paulo às três", "東京へ行きます", "a \"quoted\" word\\",
         "tab\there", "emoji 🎬 line", ""]


def chunk(rng: random.Random, start: float, length: float, aligned: bool) -> Transcript:
    """A chunk's transcript in film times: segments inside [start, start + length), shuffled (the
    join sorts them), some sharing a start, some words without times or scores."""
    segments = []
    for _ in range(rng.randrange(0, 7)):
        s = round(start + rng.random() * (length - 2), rng.choice([1, 3, 6]))
        text = rng.choice(TEXTS)
        words, t = [], s
        for w in text.split():
            d = round(rng.uniform(0.05, 0.6), 3)
            timed = rng.random() > 0.1
            words.append(Word(text=w, start=t if timed else None, end=t + d if timed else None,
                              score=rng.choice([None, round(rng.random(), 3)])))
            t = round(t + d + rng.uniform(0, 0.2), 3)
        segments.append(Segment(start=s, end=max(s, t), text=" " + text, words=words,
                                avg_logprob=rng.choice([None, -rng.random()]),
                                tokens=rng.choice([None, [rng.randrange(51865) for _ in range(rng.randrange(5))]]),
                                flags=rng.choice([[], ["lyrics"]])))
        if rng.random() < 0.2:  # the same key twice: sorted() keeps their order
            segments.append(segments[-1].model_copy(update={"text": "twin"}))
    rng.shuffle(segments)
    return Transcript(language="en", language_probability=round(rng.random(), 4), duration=round(start + length, 3),
                      model=rng.choice(["base", None]), aligned=aligned, segments=segments)


def film(rng: random.Random, chunks: int, chunk_s: float = 30.0) -> list[Transcript]:
    aligned = rng.random() < 0.5
    parts = [chunk(rng, k * chunk_s, chunk_s, aligned or rng.random() < 0.2) for k in range(chunks)]
    for before, after in pairwise(parts):  # a tie across a chunk boundary now and then
        if before.segments and after.segments and rng.random() < 0.3:
            last = max(before.segments, key=lambda s: (s.start, s.end))
            after.segments.append(last.model_copy(update={"text": "tie"}))
    return parts


def turns(rng: random.Random, until: float) -> SpeakerTurns:
    out, t = [], 0.0
    while t < until:
        d = rng.uniform(0.5, 8.0)
        out.append(SpeakerTurn(start=round(t, 3), end=round(t + d, 3), speaker=rng.choice(["SPEAKER_00", "SPEAKER_01"])))
        t += d + rng.uniform(0, 1.5)
    rng.shuffle(out)
    return SpeakerTurns(duration=until, speakers=["SPEAKER_00", "SPEAKER_01"], turns=out)


def write(parts: list[Transcript], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(parts):
        paths.append(folder / f"chunk{k}.json")
        paths[-1].write_text(part.model_dump_json(indent=1))
    return paths


@pytest.mark.parametrize("seed", range(6))
def test_the_streamed_join_writes_the_in_memory_join_byte_for_byte(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    parts = film(rng, rng.randrange(30, 90))
    language = SpokenLanguage(language="en", probability=0.9) if seed % 2 else None
    speakers = turns(rng, 30.0 * len(parts)) if seed % 3 else None
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    expected = join_in_memory(parts, language, speakers, old)
    assert join_streaming(iter(parts), language, speakers, new) == expected
    assert new.read_bytes() == old.read_bytes()
    assert expected["segments"] >= len(parts) and (speakers is None or 0 < expected["words_without_speaker"] < expected["words"])
    assert not list(tmp_path.glob("*.segments"))  # the spool file is gone


def test_the_stage_streams_from_its_input_files(make_context, tmp_path: Path):
    rng = random.Random(7)
    parts = film(rng, 40)
    speakers = turns(rng, 1200.0)
    (tmp_path / "turns.json").write_text(speakers.model_dump_json())
    ctx = make_context("transcript_join", inputs={"turns": tmp_path / "turns.json"},
                       input_lists={"transcripts": write(parts, tmp_path / "in")})
    out = STAGE.handle(ctx.request, ctx)["transcript"]
    expected = join_in_memory(parts, None, speakers, tmp_path / "old.json")
    assert out.read_bytes() == (tmp_path / "old.json").read_bytes()
    assert ctx.metrics == {"chunks": 40.0, "segments": expected["segments"], "speakers": 2.0,
                           "words_without_speaker": expected["words_without_speaker"]}


def test_no_chunks_is_the_header_alone(make_context, tmp_path: Path):
    language = tmp_path / "language.json"
    language.write_text(SpokenLanguage(language="pt", probability=0.7).model_dump_json())
    ctx = make_context("transcript_join", inputs={"language": language})
    out = STAGE.handle(ctx.request, ctx)["transcript"]
    join_in_memory([], SpokenLanguage(language="pt", probability=0.7), None, tmp_path / "old.json")
    assert out.read_bytes() == (tmp_path / "old.json").read_bytes()


def test_overlapping_chunks_are_joined_in_memory_with_the_same_result(make_context, tmp_path: Path):
    rng = random.Random(3)
    parts = film(rng, 12)
    late = next(k for k in range(1, 12) if parts[k].segments and any(p.segments for p in parts[:k]))
    parts[late].segments.append(Segment(start=0.0, end=0.5, text=" early", words=[Word(text="early", start=0.0, end=0.5)]))
    with pytest.raises(Unordered, match=f"chunk {late} has a segment at 0 s"):
        join_streaming(iter(parts), None, None, tmp_path / "new.json")
    ctx = make_context("transcript_join", input_lists={"transcripts": write(parts, tmp_path / "in")})
    out = STAGE.handle(ctx.request, ctx)["transcript"]
    join_in_memory(parts, None, None, tmp_path / "old.json")
    assert out.read_bytes() == (tmp_path / "old.json").read_bytes()


def test_chunks_in_two_languages_fail_as_before(make_context, tmp_path: Path):
    parts = film(random.Random(4), 6)
    parts[4] = parts[4].model_copy(update={"language": "de"})
    with pytest.raises(BadInput) as old:
        join_in_memory(parts, None, None, tmp_path / "old.json")
    ctx = make_context("transcript_join", input_lists={"transcripts": write(parts, tmp_path / "in")})
    with pytest.raises(BadInput) as new:
        STAGE.handle(ctx.request, ctx)
    assert str(new.value) == str(old.value) and "different languages (de, en)" in str(new.value)


def test_a_broken_chunk_is_named_by_its_index(make_context, tmp_path: Path):
    paths = write(film(random.Random(5), 5), tmp_path / "in")
    paths[3].write_text('{"language": "en", "segments": [{"start": "soon", "end": 1, "text": "x"}]}')
    ctx = make_context("transcript_join", input_lists={"transcripts": paths})
    with pytest.raises(BadInput, match=r"^input 'transcripts\[3\]' is not valid Transcript JSON: segments.0.start='soon'"):
        STAGE.handle(ctx.request, ctx)


def peak_bytes(run) -> int:
    """The Python heap's peak while `run()` runs (tracemalloc; also used by test_subs_stream)."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_follows_one_chunk_not_the_film(make_context, tmp_path: Path):
    """The Python heap's peak while joining 20 vs 80 chunks (tracemalloc): the streamed stage's
    grows by less than a fifth (one chunk parsed at a time, a few chunks' headers kept), the
    in-memory join's about 4x (every chunk's words at once) -- measured, not assumed."""
    peaks: dict[str, list[int]] = {"streamed": [], "in memory": []}
    for n in (20, 80):
        paths = write(film(random.Random(n), n), tmp_path / f"in{n}")
        ctx = make_context("transcript_join", input_lists={"transcripts": paths})
        peaks["streamed"].append(peak_bytes(lambda ctx=ctx: STAGE.handle(ctx.request, ctx)))
        old = tmp_path / f"old{n}.json"
        peaks["in memory"].append(peak_bytes(lambda ctx=ctx, old=old: join_in_memory(
            ctx.input_list("transcripts", Transcript), None, None, old)))
    (s20, s80), (m20, m80) = peaks["streamed"], peaks["in memory"]
    assert m80 > 3 * m20, peaks  # the test can see growth
    assert s80 < 1.2 * s20, peaks
