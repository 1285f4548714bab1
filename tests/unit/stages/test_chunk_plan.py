"""captionbus/services/chunk/plan.py: cuts only in pauses, at the first long-enough pause after target_s,
never longer than max_s, every region in exactly one chunk; and transcript_join."""
from __future__ import annotations

import random

import pytest

from captionbus.contracts.speech import SpokenLanguage
from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.services.chunk.plan import EDGE_S, plan_chunks, whisper_windows
from captionbus.services.runtime import BadInput
from captionbus.services.transcript_join.stage import join


def spans(chunks):
    return [(r.start, r.end) for c in chunks.chunks for r in c.regions]


def test_cuts_at_the_first_long_pause_after_the_target_where_a_whisper_window_starts():
    # 10 s of speech, 1 s pauses. Decoded whole, the asr stage's windows (regions widened by
    # 0.1 s, grouped greedily up to 30 s) start at regions 0, 2 and 4: a cut after region 0
    # (already past target_s) would make the chunks decode other windows than the film does.
    regions = [(i * 11.0, i * 11.0 + 10) for i in range(6)]
    assert whisper_windows(regions, 70.0) == {0, 2, 4}
    plan = plan_chunks(regions, 70.0, target_s=8, min_silence_s=0.5, max_s=60)
    assert [[(r.start, r.end) for r in c.regions] for c in plan.chunks] == [
        [(0, 10), (11, 21)], [(22, 32), (33, 43)], [(44, 54), (55, 65)]]
    first, second, _ = plan.chunks
    assert first.start == 0 and first.end == 21.5 == second.start  # the middle of the pause
    assert plan.chunks[-1].end == 65 + EDGE_S and not any(c.split for c in plan.chunks)


def test_a_pause_too_short_to_cut_in_is_passed_over():
    # 5 s of speech, 0.2 s pause (too short), 5 s, 1 s pause, ...: all one Whisper window, and
    # max_s leaves room for it: one chunk, as the film decodes it
    regions = [(0, 5), (5.2, 10.2), (11.2, 16.2), (17.2, 22.2)]
    plan = plan_chunks(regions, 30.0, target_s=8, min_silence_s=0.5, max_s=30)
    assert len(plan.chunks) == 1 and spans(plan) == [(0, 5), (5.2, 10.2), (11.2, 16.2), (17.2, 22.2)]
    # max_s shorter than a window: cut anyway, at the widest pause, never in the 0.2 s one
    tight = plan_chunks(regions, 30.0, target_s=8, min_silence_s=0.5, max_s=14)
    assert [[(r.start, r.end) for r in c.regions] for c in tight.chunks] == [
        [(0, 5), (5.2, 10.2)], [(11.2, 16.2), (17.2, 22.2)]]


@pytest.mark.parametrize("seed", range(20))
def test_each_chunk_decodes_the_whisper_windows_the_whole_film_decodes(seed):
    """What the asr stage does with one chunk (its regions in chunk times, widened and grouped
    into windows) gives the windows it forms on the whole film: the same audio, the same words."""
    rng = random.Random(seed)
    t, regions = rng.uniform(0.5, 5), []
    while t < 1200:
        length = rng.uniform(0.3, 25)
        regions.append((round(t, 3), round(t + length, 3)))
        t += length + rng.choice([0.3, 0.4, 0.7, 1.2, 3.0])
    duration = t + 1
    whole = whisper_windows(regions, duration)
    windows_of = lambda rs: [rs[i] for i in sorted(whisper_windows(rs, duration))]  # noqa: E731
    plan = plan_chunks(regions, duration, target_s=60, min_silence_s=0.3, max_s=120)
    assert len(plan.chunks) > 5
    in_chunks = []
    for c in plan.chunks:
        local = [(r.start - c.start, r.end - c.start) for r in c.regions]
        starts = whisper_windows(local, c.end - c.start)
        in_chunks += [(round(local[i][0] + c.start, 3), round(local[i][1] + c.start, 3)) for i in sorted(starts)]
    assert in_chunks == windows_of(regions) and len(whole) == len(in_chunks)


def test_no_chunking_is_one_chunk_and_no_speech_is_none():
    assert [(c.start, c.end) for c in plan_chunks([(3, 4)], 60, 0, 0.3, None).chunks] == [(0, 60)]
    assert plan_chunks([], 60, 30, 0.3, 60).chunks == []


def test_max_is_enforced_at_the_widest_pause_and_inside_a_region_only_when_it_alone_is_too_long():
    # pauses of 0.1 s only (below min_silence): the chunk must still end before max_s
    regions = [(i * 3.0, i * 3.0 + 2.9) for i in range(40)]
    plan = plan_chunks(regions, 120, target_s=20, min_silence_s=0.5, max_s=30)
    assert all(c.end - c.start <= 30 + 1e-6 for c in plan.chunks)
    assert spans(plan) == [(round(a, 3), round(b, 3)) for a, b in regions] and not any(c.split for c in plan.chunks)
    long = plan_chunks([(10, 100)], 120, target_s=20, min_silence_s=0.5, max_s=30)
    assert all(c.end - c.start <= 30 + 1e-6 for c in long.chunks)
    assert [c.split for c in long.chunks] == [True, True, True, False]  # 90 s in pieces of 22.5 s
    assert long.chunks[0].regions[0].start == 10 and long.chunks[-1].regions[-1].end == 100


@pytest.mark.parametrize("seed", range(20))
def test_random_films_every_region_once_in_order_windows_disjoint(seed):
    rng = random.Random(seed)
    t, regions = rng.uniform(0, 5), []
    while t < 1800:
        length = rng.uniform(0.3, 40)
        regions.append((round(t, 3), round(t + length, 3)))
        t += length + rng.choice([0.05, 0.2, 0.4, 1.0, 3.0])
    duration = t + rng.uniform(0, 10)
    plan = plan_chunks(regions, duration, target_s=60, min_silence_s=0.3, max_s=120)
    assert spans(plan) == [r for r in regions if r[0] < duration]  # none dropped, none doubled, in order
    for a, b in zip(plan.chunks, plan.chunks[1:]):
        assert a.end <= b.start  # windows never overlap
    for c in plan.chunks:
        assert c.end - c.start <= 120 + 1e-6
        assert c.start <= c.regions[0].start and c.regions[-1].end <= c.end


def transcript(lang: str, *segments: tuple[float, float, str]) -> Transcript:
    return Transcript(language=lang, duration=100, segments=[
        Segment(start=s, end=e, text=t, words=[Word(text=t, start=s, end=e)]) for s, e, t in segments])


def test_join_puts_segments_in_time_order_and_refuses_mixed_languages():
    joined = join([transcript("en", (0, 1, "one")), transcript("en", (50, 51, "two"), (52, 53, "three"))],
                  SpokenLanguage(language="en", probability=0.9))
    assert joined.text == "one two three" and joined.language_probability == 0.9 and joined.duration == 100
    assert join([], SpokenLanguage(language="de")).language == "de"
    with pytest.raises(BadInput, match="different languages"):
        join([transcript("en"), transcript("fr")], None)
    # the chunk stage's language without -s says none: the one chunk's detected language stands
    detected = transcript("fr", (0, 1, "un")).model_copy(update={"language_probability": 0.8})
    joined = join([detected], SpokenLanguage(language=None))
    assert (joined.language, joined.language_probability, joined.text) == ("fr", 0.8, "un")
    assert join([], SpokenLanguage(language=None)).language == "en"  # no speech: nothing was decoded


def test_the_chunk_stage_reports_its_count_and_refuses_more_chunks_than_a_job_state_holds(tmp_path):
    from captionbus.contracts.speech import SpeechRegion, SpeechRegions, SpeechChunks
    from captionbus.services.chunk.stage import handle
    from captionbus.services.runtime.testing import make_fake_context

    regions = SpeechRegions(backend="silero", duration=7200,
                            regions=[SpeechRegion(start=i * 6, end=i * 6 + 5) for i in range(1200)])
    (tmp_path / "regions.json").write_text(regions.model_dump_json())
    ctx = make_fake_context(tmp_path / "a", "chunk", inputs={"regions": tmp_path / "regions.json"})
    chunks = SpeechChunks.model_validate_json(handle(ctx.request, ctx)["chunks"].read_text())
    assert ctx.items == {"chunks": len(chunks.chunks)} == {"chunks": 240}  # a 2-hour film at the default 30 s
    # not given: none (the language node detects it for several chunks; one chunk, in its decode)
    assert SpokenLanguage.model_validate_json(handle(ctx.request, ctx)["language"].read_text()).language is None
    given = make_fake_context(tmp_path / "c", "chunk", inputs={"regions": tmp_path / "regions.json"},
                              params={"source_language": "EN"})
    assert SpokenLanguage.model_validate_json(handle(given.request, given)["language"].read_text()).language == "en"
    tiny = make_fake_context(tmp_path / "b", "chunk", inputs={"regions": tmp_path / "regions.json"},
                             params={"target_s": 5})
    with pytest.raises(BadInput, match="1200 chunks; at most 300 .* use --chunk-s 36 or more"):
        handle(tiny.request, tiny)


def test_an_unset_target_stretches_for_a_film_too_long_for_one_job_and_a_given_one_is_kept(tmp_path):
    """A 10-hour film at the default 30 s would be ~1200 chunks, over MAX_CHUNKS: with target_s
    unset the chunk stage picks longer chunks (and says so); a target_s the job gave is refused."""
    from captionbus.contracts.speech import SpeechRegion, SpeechRegions, SpeechChunks
    from captionbus.services.chunk.stage import MAX_CHUNKS, handle
    from captionbus.services.runtime.testing import make_fake_context

    regions = SpeechRegions(backend="silero", duration=36000,
                            regions=[SpeechRegion(start=i * 6, end=i * 6 + 5) for i in range(6000)])
    (tmp_path / "regions.json").write_text(regions.model_dump_json())
    ctx = make_fake_context(tmp_path / "a", "chunk", inputs={"regions": tmp_path / "regions.json"})
    chunks = SpeechChunks.model_validate_json(handle(ctx.request, ctx)["chunks"].read_text())
    assert 100 < len(chunks.chunks) <= MAX_CHUNKS
    assert min(c.end - c.start for c in chunks.chunks[:-1]) > 170  # target ceil(36000 / 300 * 1.5) = 180, cut mid-pause
    assert chunks.chunks[0].start == 0 and chunks.chunks[-1].end == 36000
    given = make_fake_context(tmp_path / "b", "chunk", inputs={"regions": tmp_path / "regions.json"},
                              params={"target_s": 60})
    with pytest.raises(BadInput, match="6000 chunks|[0-9]+ chunks; at most 300 .* use --chunk-s 180 or more"):
        handle(given.request, given)


def test_audio_up_to_chunk_above_s_is_one_chunk_unless_the_job_gives_a_target(tmp_path, monkeypatch):
    """The default workflows cut only audio longer than CAPTIONBUS_CHUNK_ABOVE_S (the chunk
    worker's setting, or the job's chunk_above_s); --chunk-s N cuts whatever the length."""
    from captionbus.contracts.speech import SpeechRegion, SpeechRegions, SpeechChunks
    from captionbus.services.chunk.stage import handle
    from captionbus.services.runtime.testing import make_fake_context

    regions = SpeechRegions(backend="silero", duration=100,
                            regions=[SpeechRegion(start=i * 6, end=i * 6 + 5) for i in range(16)])
    (tmp_path / "regions.json").write_text(regions.model_dump_json())

    def count(name: str, **params) -> int:
        ctx = make_fake_context(tmp_path / name, "chunk", inputs={"regions": tmp_path / "regions.json"}, params=params)
        chunks = SpeechChunks.model_validate_json(handle(ctx.request, ctx)["chunks"].read_text())
        assert ctx.items == {"chunks": len(chunks.chunks)}
        return len(chunks.chunks)

    monkeypatch.delenv("CAPTIONBUS_CHUNK_ABOVE_S", raising=False)
    assert count("default") == 1  # 100 s, under the default 120 s
    cut = count("given", target_s=30)
    assert cut > 1  # a target the job gave always cuts
    assert count("job", chunk_above_s=60) == cut  # the job's (or a workflow's: chunked.yaml 0) threshold
    monkeypatch.setenv("CAPTIONBUS_CHUNK_ABOVE_S", "99")
    assert count("worker") == cut  # the chunk worker's setting
    monkeypatch.setenv("CAPTIONBUS_CHUNK_ABOVE_S", "100")
    assert count("equal") == 1
    assert count("zero", target_s=0, chunk_above_s=0) == 1  # --chunk-s 0: the escape hatch
