"""The translation stage every backend shares (captionbus.services.translation.core), with fake
translators that are pure functions, plus its pure helpers: sentence units, splitting a unit's
translation back over its segments, the glossary's placeholders. The real model path is
tests/integration/test_stage_translation_nllb.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog

from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.services import declarations
from captionbus.services.runtime import BadInput, SetupContext
from captionbus.services.translation.core import translation_stage
from captionbus.services.translation.glossary import (
    Glossary,
    GlossaryError,
    Term,
    parse_glossary,
    restore,
)
from captionbus.services.translation.units import (
    SegmentText,
    ends_sentence,
    group_units,
    split_translation,
)

# ---------------------------------------------------------------- sentence units

def seg(text: str, start: float, end: float | None = None, speaker: str | None = None) -> SegmentText:
    return SegmentText(text, start, start + 1.0 if end is None else end, speaker)


def test_units_join_segments_until_a_sentence_ends_danda_included():
    segments = [seg("so yesterday I went", 0), seg("to the market and", 1), seg("bought mangoes.", 2),
                seg("मैं कल बाज़ार", 3), seg("गया था।", 4), seg("Done?", 5)]
    units = group_units(segments)
    assert [u.indices for u in units] == [(0, 1, 2), (3, 4), (5,)]
    assert units[0].text == "so yesterday I went to the market and bought mangoes."
    assert units[1].text == "मैं कल बाज़ार गया था।"


def test_units_break_at_caps_speaker_changes_long_pauses_and_empty_segments():
    six = [seg(f"word{i}", i) for i in range(6)]
    assert [u.indices for u in group_units(six, max_segments=4)] == [(0, 1, 2, 3), (4, 5)]
    assert [u.indices for u in group_units(six, max_segments=1)] == [(i,) for i in range(6)]
    assert [u.indices for u in group_units(six, max_chars=11)] == [(0, 1), (2, 3), (4, 5)]
    speakers = [seg("hello", 0, speaker="A"), seg("there", 1, speaker="B"), seg("friend", 2, speaker="B")]
    assert [u.indices for u in group_units(speakers)] == [(0,), (1, 2)]
    pause = [seg("and then", 0, 1.0), seg("silence", 3.5, 4.0)]  # 2.5 s gap
    assert [u.indices for u in group_units(pause)] == [(0,), (1,)]
    holes = [seg("one", 0), seg("  ", 1), seg("two", 2)]
    assert [u.indices for u in group_units(holes)] == [(0,), (2,)]


def test_sentence_end_sees_through_closing_quotes():
    assert ends_sentence('He said "no."') and ends_sentence("क्या?") and ends_sentence("终わり。")
    assert not ends_sentence("and then") and not ends_sentence("") and not ends_sentence("3,")


def test_unit_text_joined_without_spaces_for_scripts_written_without():
    units = group_units([seg("今日は", 0), seg("いい天気です。", 1)], separator="")
    assert units[0].text == "今日はいい天気です。"


# ---------------------------------------------------------------- splitting back

def test_split_follows_source_length_shares_at_word_boundaries():
    translation = "aa bb cc dd ee ff gg hh"
    parts = split_translation(translation, ["x" * 30, "x" * 10])  # 3/4 and 1/4 of the source
    assert parts == ["aa bb cc dd ee ff", "gg hh"]
    assert " ".join(parts) == translation


def test_split_gives_every_segment_a_word_while_words_last():
    parts = split_translation("one two three", ["a very very long source segment", "b", "c"])
    assert parts == ["one", "two", "three"]
    assert split_translation("only", ["a", "b", "c"]) == ["only", "", ""]
    assert split_translation("", ["a", "b"]) == ["", ""]
    assert split_translation("  all   of it ", ["just one"]) == ["all of it"]


def test_split_keeps_order_and_every_word_for_many_shapes():
    words = [f"w{i}" for i in range(23)]
    for sources in (["a"] * 5, ["abc", "d" * 40, "ef", "g" * 9], ["x"] * 23, ["y"] * 30):
        parts = split_translation(" ".join(words), sources)
        assert len(parts) == len(sources)
        assert " ".join(p for p in parts if p).split() == words
        if len(sources) <= len(words):
            assert all(parts)


def test_split_without_spaces_cuts_between_grapheme_clusters():
    parts = split_translation("हिन्दी में", ["ab", "cd"], separator="")
    assert "".join(parts) == "हिन्दीमें"
    assert not any(p.startswith(("ि", "्", "े", "ं")) for p in parts), parts  # no part starts with a mark


# ---------------------------------------------------------------- glossary

def test_glossary_formats():
    tsv = "# names and words to keep\nyaar\nRaj\tराज\nbhai\tfrère\tfr, de\n\n"
    terms = parse_glossary(tsv)
    assert terms == [Term("yaar"), Term("Raj", "राज"), Term("bhai", "frère", frozenset({"fr", "de"}))]
    assert parse_glossary([["Raj", "राज"], ["yaar"], "bhai", ["Mumbai", "Mumbai"]]) == [
        Term("Raj", "राज"), Term("yaar"), Term("bhai"), Term("Mumbai")]
    assert parse_glossary({"Raj": "राज"}) == [Term("Raj", "राज")]
    assert parse_glossary(None) == [] and parse_glossary("") == []
    for bad in ("\tonly target", "a\tb\tc\td", [["a", "b", "c"]], [[1, 2]], 42):
        with pytest.raises(GlossaryError):
            parse_glossary(bad)


def test_protect_and_restore_keep_and_map_whole_words_only():
    glossary = Glossary(parse_glossary("yaar\nRaj\tराज\nNew Delhi\tनई दिल्ली"))
    protected = glossary.protect("Yaar, Raj went to New Delhi, not to Rajasthan with his yaarana.")
    assert protected.text == "[1], [2] went to [3], not to Rajasthan with his yaarana."
    translated = "[2] est allé à [3] , [1] ."  # a model reorders placeholders freely
    assert restore(protected, translated) == ("राज est allé à नई दिल्ली , Yaar .", 0)  # keep = as written


def test_protect_matches_devanagari_as_whole_words():
    glossary = Glossary([Term("राज")])
    assert glossary.protect("राज और राजा").text == "[1] और राजा"  # the vowel sign makes राजा another word


def test_literal_bracket_numbers_are_left_alone_and_model_variants_restored():
    glossary = Glossary([Term("Raj")])
    protected = glossary.protect("see note [1] about Raj")
    assert protected.text == "see note [1] about [2]"
    assert restore(protected, "voir note [1] sur [ २ ]") == ("voir note [1] sur Raj", 0)  # Devanagari digit, spaces


def test_lost_placeholder_is_inserted_near_its_source_position():
    glossary = Glossary([Term("Raj", "राज")])
    protected = glossary.protect("Raj said hello to everyone here today")
    assert restore(protected, "il a dit bonjour à tout le monde") == ("राज il a dit bonjour à tout le monde", 1)
    end = glossary.protect("hello to everyone here today said Raj")
    assert restore(end, "bonjour à tous ici aujourd'hui a dit") == ("bonjour à tous ici aujourd'hui a dit राज", 1)
    assert restore(end, "") == ("राज", 1)


def test_glossary_for_target_and_later_terms_win():
    terms = [Term("bhai", "brother"), Term("bhai", "frère", frozenset({"fr"})), Term("Raj")]
    assert {t.source: t.target for t in Glossary.for_target(terms, "fr").terms} == {"bhai": "frère", "Raj": ""}
    assert {t.source: t.target for t in Glossary.for_target(terms, "de").terms} == {"bhai": "brother", "Raj": ""}


# ---------------------------------------------------------------- the stage with fake translators

class ReverseWords:
    """Translation stand-in: each text's words in reverse order; records what it was given."""

    def __init__(self):
        self.calls: list[tuple[list[str], str, str]] = []

    def translate(self, texts, source, target):
        self.calls.append((list(texts), source, target))
        return [" ".join(reversed(t.split())) for t in texts]

    def describe(self):
        return "reverse-words (test)"


class DropsBrackets(ReverseWords):
    """A model that loses every placeholder."""

    def translate(self, texts, source, target):
        return [" ".join(w for w in reversed(t.split()) if "[" not in w) for t in texts]


class SaysNothing(ReverseWords):
    def translate(self, texts, source, target):
        return ["" for _ in texts]


def make_service(translator, stage="translation_nllb", options=None):
    definition = translation_stage(declarations()[stage][1], lambda ctx: translator, report_packages=("pydantic",))
    service = definition.setup(SetupContext(stage=stage, env="test", models_dir=Path("/nonexistent"),
                                            log=structlog.get_logger(), options=options or {}))
    return definition, service


SOURCE = Transcript(
    language="hi", duration=9.0, aligned=True,
    segments=[
        Segment(start=0.5, end=2.0, text="yaar mera dost Raj", words=[Word(text="yaar", start=0.5, end=0.8)], speaker="A"),
        Segment(start=2.1, end=3.4, text="kal aa raha hai.", speaker="A", flags=["lyrics"]),
        Segment(start=4.0, end=5.0, text="  "),
        Segment(start=5.2, end=8.9, text="बहुत अच्छा।", speaker="B"),
    ],
)


def write_transcript(tmp_path: Path, transcript: Transcript = SOURCE, name="transcript.json") -> Path:
    path = tmp_path / name
    path.write_text(transcript.model_dump_json())
    return path


def run(definition, service, make_context, inputs, params):
    ctx = make_context(definition.name, inputs=inputs, params=params, resources=service)
    outputs = definition.handle(ctx.request, ctx)
    return Transcript.model_validate_json(outputs["transcript"].read_text()), ctx, outputs


def test_translates_sentence_units_and_keeps_segment_times(tmp_path, make_context):
    translator = ReverseWords()
    definition, service = make_service(translator)
    out, ctx, outputs = run(definition, service, make_context, {"transcript": write_transcript(tmp_path)},
                            {"target_language": "fr", "source_language": "hi"})
    assert outputs["transcript"].name == "transcript.fr.json"
    # the two segments of the first sentence went to the model as one text
    assert translator.calls == [(["yaar mera dost Raj kal aa raha hai.", "बहुत अच्छा।"], "hi", "fr")]
    assert (out.language, out.translated_from, out.model, out.aligned) == ("fr", "hi", "reverse-words (test)", False)
    assert [(s.start, s.end, s.speaker, s.flags) for s in out.segments] == [
        (s.start, s.end, s.speaker, s.flags) for s in SOURCE.segments]
    assert all(s.words == [] for s in out.segments)
    # "hai. raha aa kal Raj dost mera yaar" split 18:16 (the source segments' lengths)
    assert [s.text for s in out.segments] == ["hai. raha aa kal Raj", "dost mera yaar", "", "अच्छा। बहुत"]
    assert ctx.metrics["units"] == 2 and ctx.metrics["segments"] == 4 and ctx.metrics["batches"] == 1
    assert ctx.metrics["chars_in"] == len("yaar mera dost Raj kal aa raha hai.") + len("बहुत अच्छा।")
    assert ctx.metrics["chars_out"] == sum(len(s.text) for s in out.segments)
    assert ctx.metrics["translation_s"] >= 0 and "model_load_s" in ctx.metrics
    assert ctx.progress_events[-1][0] == 1.0 and not ctx.warnings


def test_context_off_translates_each_segment_alone_and_batches(tmp_path, make_context):
    translator = ReverseWords()
    definition, service = make_service(translator)
    out, ctx, _ = run(definition, service, make_context, {"transcript": write_transcript(tmp_path)},
                      {"target_language": "fr", "context": False, "batch_size": 2})
    assert [texts for texts, _, _ in translator.calls] == [["yaar mera dost Raj", "kal aa raha hai."], ["बहुत अच्छा।"]]
    assert translator.calls[0][1] == "hi"  # source_language unset: the transcript's language
    assert out.segments[1].text == "hai. raha aa kal"  # alone now: all of its own sentence
    assert ctx.metrics["batches"] == 2
    assert [f for f, _ in ctx.progress_events] == [0.0, 0.5, 1.0]


def test_glossary_terms_survive_and_map(tmp_path, make_context):
    glossary_file = tmp_path / "service.tsv"
    glossary_file.write_text("Raj\tRajesh\ndost\tami\tfr\n", encoding="utf-8")
    translator = ReverseWords()
    definition, service = make_service(translator, options={"glossary": str(glossary_file)})
    out, ctx, _ = run(definition, service, make_context, {"transcript": write_transcript(tmp_path)},
                      {"target_language": "fr", "glossary": [["yaar"], ["Raj", "राज"]]})  # the job's Raj wins
    assert translator.calls[0][0][0] == "[1] mera [2] [3] kal aa raha hai."
    assert " ".join(s.text for s in out.segments[:2]) == "hai. raha aa kal राज ami mera yaar"
    assert ctx.metrics["glossary_terms_protected"] == 3 and ctx.metrics["glossary_placeholders_lost"] == 0


def test_service_glossary_from_env_var(tmp_path, make_context, monkeypatch):
    glossary_file = tmp_path / "g.tsv"
    glossary_file.write_text("Raj\tRajesh\n", encoding="utf-8")
    monkeypatch.setenv("CAPTIONBUS_TRANSLATION_GLOSSARY", str(glossary_file))
    definition, service = make_service(ReverseWords())
    out, _, _ = run(definition, service, make_context, {"transcript": write_transcript(tmp_path)}, {"target_language": "fr"})
    assert out.segments[0].text.endswith("Rajesh")


def test_lost_placeholders_are_put_back_with_a_warning(tmp_path, make_context):
    definition, service = make_service(DropsBrackets())
    out, ctx, _ = run(definition, service, make_context, {"transcript": write_transcript(tmp_path)},
                      {"target_language": "fr", "glossary": "Raj"})
    assert "Raj" in " ".join(s.text for s in out.segments)
    assert ctx.metrics["glossary_placeholders_lost"] == 1
    assert any("glossary placeholder" in w for w in ctx.warnings)


def test_empty_model_output_keeps_source_text_flagged(tmp_path, make_context):
    definition, service = make_service(SaysNothing())
    out, ctx, _ = run(definition, service, make_context, {"transcript": write_transcript(tmp_path)}, {"target_language": "fr"})
    assert out.segments[0].text == "yaar mera dost Raj" and out.segments[0].flags == ["untranslated"]
    assert out.segments[1].flags == ["lyrics", "untranslated"] and out.segments[2].flags == []
    assert any("untranslated" in w for w in ctx.warnings)


def test_empty_transcript_gives_empty_translation_and_a_warning(tmp_path, make_context):
    translator = ReverseWords()
    definition, service = make_service(translator)
    empty = write_transcript(tmp_path, Transcript(language="en", segments=[]))
    out, ctx, _ = run(definition, service, make_context, {"transcript": empty}, {"target_language": "fr"})
    assert out.segments == [] and out.language == "fr" and out.translated_from == "en"
    assert translator.calls == [] and any("no text" in w for w in ctx.warnings)
    assert ctx.metrics["units"] == 0


@pytest.mark.parametrize("params, inputs, message", [
    ({"target_language": "xx"}, None, "unknown language code 'xx'"),
    ({"target_language": "hi"}, None, "both 'hi'"),
    ({"target_language": "fr", "source_language": "la"}, None, "does not translate la -> fr (it has no la)"),
    ({}, None, "no target_language"),
    ({"target_language": "fr", "glossary": "\tno source"}, None, "source term is empty"),
    # the params model (captionbus/contracts/declarations/translation.py: TranslationParams) refuses these before the handler
    ({"target_language": "fr", "batch_size": 0}, None, "batch_size=0: Input should be greater than or equal to 1"),
    ({"target_language": "fr", "batch_size": 65}, None, "batch_size=65: Input should be less than or equal to 64"),
    ({"target_language": "fr", "batch_size": "many"}, None, "batch_size='many': Input should be a valid integer"),
    ({"target_language": "fr", "beam_size": 4}, None, "unknown param 'beam_size'"),
    ({"target_language": "fr", "glossary": ["x" * 201]}, None, "glossary"),
    ({"target_language": "fr"}, "not json", "input 'transcript' is not valid Transcript JSON: Invalid JSON"),
    ({"target_language": "fr"}, json.dumps({"segments": []}), "Transcript JSON: field 'language' is missing"),
])
def test_bad_input_is_refused_with_a_reason(tmp_path, make_context, params, inputs, message):
    translator = ReverseWords()
    definition, service = make_service(translator)
    path = write_transcript(tmp_path)
    if inputs is not None:
        path.write_text(inputs)
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(definition, service, make_context, {"transcript": path}, params)
    assert translator.calls == []


def test_a_pair_routed_to_the_other_backend_is_refused(tmp_path, make_context):
    definition, service = make_service(ReverseWords(), stage="translation_indictrans2")
    english = write_transcript(tmp_path, Transcript(language="en", segments=[Segment(start=0, end=1, text="hi")]))
    with pytest.raises(BadInput, match="translation_indictrans2 does not translate en -> fr"):
        run(definition, service, make_context, {"transcript": english}, {"target_language": "fr"})
    out, _, _ = run(definition, service, make_context, {"transcript": english}, {"target_language": "hi"})
    assert out.segments[0].text == "hi"


def test_describe_model_and_definition_shape():
    definition, service = make_service(ReverseWords())
    assert definition.name == "translation_nllb" and definition.report_packages == ("pydantic",)
    assert definition.describe_model(service) == "reverse-words (test)" and definition.describe_model(None) is None


def test_glossary_size_and_placeholder_numbers_are_bounded():
    from captionbus.services.translation.glossary import (
        MAX_TERMS,
        Glossary,
        GlossaryError,
        parse_glossary,
        restore,
    )

    with pytest.raises(GlossaryError, match=f"at most {MAX_TERMS}"):
        parse_glossary([[f"term{n}", ""] for n in range(MAX_TERMS + 1)])
    with pytest.raises(GlossaryError, match="longer than"):
        parse_glossary([["x" * 300, ""]])
    protected = Glossary(parse_glossary([["Bollywood", ""]])).protect("see [9999] and Bollywood")
    assert "[10000]" in protected.text
    restored, lost = restore(protected, protected.text)
    assert restored == "see [9999] and Bollywood" and lost == 0
