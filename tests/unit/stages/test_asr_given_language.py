"""Which language an asr chunk request decodes in (given_language): the job's `language` input
when it names one, else asr.language, else -s, else None (detect). A job of one chunk gets the
chunk stage's `language` output of null: it must not undo an asr.language option. No model is
loaded: the model answers only which languages it supports."""
from __future__ import annotations

from captionbus.contracts.declarations.asr import AsrParams
from captionbus.contracts.speech import SpokenLanguage
from captionbus.services.asr.stage import AsrModel, given_language
from captionbus.services.runtime.testing import make_fake_context


class MultilingualModel(AsrModel):
    def supported_languages(self) -> list[str]:
        return ["en", "hi", "ta", "fr"]


MODEL = MultilingualModel(backend="whisperx", engine=None, source="large-v3", load_seconds=0.0)


def language_for(tmp_path, spoken: str | None, **params) -> str | None:
    path = tmp_path / f"language-{spoken}.json"
    path.write_text(SpokenLanguage(language=spoken).model_dump_json())
    ctx = make_fake_context(tmp_path / "work", "asr", inputs={"language": path}, params=params)
    return given_language(ctx.request, ctx, AsrParams(**params), MODEL)


def test_a_null_language_input_keeps_the_asked_language(tmp_path):
    assert language_for(tmp_path, None, language="hi") == "hi"  # -o asr.language=hi, no -s, one chunk
    assert language_for(tmp_path, None, source_language="ta") == "ta"
    assert language_for(tmp_path, None) is None  # nothing asked: the request detects


def test_a_named_language_input_is_the_jobs_language(tmp_path):
    assert language_for(tmp_path, "fr") == "fr"
    assert language_for(tmp_path, "fr", source_language="en") == "fr"
