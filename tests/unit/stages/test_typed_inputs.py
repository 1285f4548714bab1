"""`ctx.input(name, Model)`: the one way a stage reads a JSON input. The runtime's context (fed by a
real fetch function on a real event loop thread) and the test context stage authors use
(captionbus/services/runtime/testing.py) run the same code, so both give the same one-line BadInput."""
from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest

from captionbus.contracts.speech import SpeechRegion, SpeechRegions, SpokenLanguage
from captionbus.contracts.transcript import Transcript
from captionbus.services.runtime.context import RequestContext
from captionbus.services.runtime.errors import BadInput
from captionbus.services.runtime.testing import artifact_ref, make_fake_context

BROKEN = {
    "not json": "input 'regions' is not valid SpeechRegions JSON: Invalid JSON: expected ident at line 1 column 2",
    '{"duration": 3, "backend": "silero", "regions": [{"start": 2, "end": 1}]}':
        "input 'regions' is not valid SpeechRegions JSON: regions.0={'start': 2, 'end': 1}: "
        "region ends (1.0) before it starts (2.0)",
    '{"regions": []}': "input 'regions' is not valid SpeechRegions JSON: field 'backend' is missing; "
                       "field 'duration' is missing",
}


@pytest.fixture
def runtime_context(tmp_path):
    """A RequestContext as serve.py builds it, its fetch copying from a local folder (the
    artifact store's part) on a loop running in its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    store = tmp_path / "store"
    store.mkdir()

    async def fetch(ref, dest: Path) -> Path:
        return Path(shutil.copy(store / ref.name, dest / ref.name))

    async def emit(event) -> None:
        pass

    def make(files: dict[str, str], lists: dict[str, list[str]] | None = None) -> RequestContext:
        refs = {}
        for name, text in [*files.items(), *((f"{k}{i}", t) for k, ts in (lists or {}).items() for i, t in enumerate(ts))]:
            (store / f"{name}.json").write_text(text)
            refs[name] = artifact_ref(store / f"{name}.json")
        request = make_fake_context(tmp_path / "req", "asr").request.model_copy(update={
            "inputs": {k: refs[k] for k in files},
            "input_lists": {k: [refs[f"{k}{i}"] for i in range(len(ts))] for k, ts in (lists or {}).items()}})
        return RequestContext(request, work_dir=tmp_path / "work", resources=None, log=None, delivery=1,
                              loop=loop, fetch=fetch, emit=emit)

    yield make
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _regions() -> str:
    return SpeechRegions(backend="silero", duration=3, regions=[SpeechRegion(start=0.5, end=1.5)]).model_dump_json()


def test_the_runtime_context_parses_an_input_and_a_list(runtime_context):
    ctx = runtime_context({"regions": _regions()},
                          {"languages": [SpokenLanguage(language="en").model_dump_json(),
                                         SpokenLanguage(language="hi").model_dump_json()]})
    assert ctx.input("regions", SpeechRegions).regions[0].end == 1.5
    assert [s.language for s in ctx.input_list("languages", SpokenLanguage)] == ["en", "hi"]
    with pytest.raises(BadInput, match="needs input 'transcript'"):
        ctx.input("transcript", Transcript)


@pytest.mark.parametrize("text, message", BROKEN.items())
def test_a_broken_input_is_one_bad_input_line_from_either_context(runtime_context, tmp_path, text, message):
    (tmp_path / "regions.json").write_text(text)
    fake = make_fake_context(tmp_path / "fake", "asr", inputs={"regions": tmp_path / "regions.json"})
    for ctx in (runtime_context({"regions": text}), fake):
        with pytest.raises(BadInput) as refused:
            ctx.input("regions", SpeechRegions)
        assert str(refused.value) == message and "\n" not in str(refused.value)


def test_a_list_item_is_named_by_its_index(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(Transcript(language="en", segments=[]).model_dump_json())
    bad.write_text('{"language": "en", "segments": [{"start": "soon", "end": 1, "text": "x"}]}')
    ctx = make_fake_context(tmp_path / "w", "transcript_join", input_lists={"transcripts": [good, bad]})
    with pytest.raises(BadInput, match=r"^input 'transcripts\[1\]' is not valid Transcript JSON: segments.0.start='soon'"):
        ctx.input_list("transcripts", Transcript)
