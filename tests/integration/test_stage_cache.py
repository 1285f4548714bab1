"""The stage output cache against a real nats-server: an identical request (same input bytes,
params, model, env) completes from the cache without running the handler; anything that
changes the result runs it again."""
from __future__ import annotations

import threading
from pathlib import Path

from captionbus.contracts import StageRequest
from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns, TurnSummary
from captionbus.services.runtime import StageDefinition
from tests.integration.test_runtime import run

CALLS: list[str] = []
_lock = threading.Lock()


def _upper(request: StageRequest, ctx) -> dict[str, Path]:
    with _lock:
        CALLS.append(request.job_id)
    text = ctx.input_path("text").read_text()
    out = ctx.work_dir / f"upper.{request.params.get('suffix', 'txt')}"
    out.write_text(text.upper())
    ctx.metrics["chars"] = float(len(text))
    return {"upper": out}


UPPER = StageDefinition(name="upper", handle=_upper, describe_model=lambda _: "upper-v1")


async def complete(bus, job_id: str, ref, params: dict | None = None):
    """Request `upper` on `ref` for a new job; its StageCompleted."""
    await bus.request(job_id, "upper", inputs={"text": ref}, params=params or {})
    return await bus.wait_for("stage_completed", job_id)


def test_identical_request_completes_from_cache(nats_server: str, captionbus_home: Path, tmp_path: Path):
    CALLS.clear()
    source = tmp_path / "in.txt"
    source.write_text("namaste world")

    async def body(bus):
        await bus.start(UPPER)
        ref = await bus.store.put(source, name="in.txt")

        first = await complete(bus, "j0001", ref, {"source_language": "hi", "target_languages": ["en"]})
        # Another job, same input and params (the job-wide target list may differ: not a stage input).
        second = await complete(bus, "j0002", ref, {"source_language": "hi", "target_languages": ["ta"]})
        assert CALLS == ["j0001"], "the second request ran the handler"
        assert second.outputs == first.outputs
        assert second.metrics["cache_hit"] == 1.0 and second.metrics["chars"] == 13.0
        assert "cache_hit" not in first.metrics and second.worker["cache"] == "hit"
        assert (await bus.store.get(second.outputs["upper"])).read_text() == "NAMASTE WORLD"

        # Different params, different input bytes, or cache switched off: the handler runs.
        await complete(bus, "j0003", ref, {"suffix": "md"})
        other = tmp_path / "other.txt"
        other.write_text("namaste world!")
        await complete(bus, "j0004", await bus.store.put(other, name="in.txt"))
        await complete(bus, "j0005", ref, {"source_language": "hi", "cache": "false"})
        assert CALLS == ["j0001", "j0003", "j0004", "j0005"]

    run(nats_server, captionbus_home, body)


def test_cache_entry_whose_artifact_vanished_runs_again(nats_server: str, captionbus_home: Path, tmp_path: Path):
    CALLS.clear()
    source = tmp_path / "in.txt"
    source.write_text("hello")

    async def body(bus):
        await bus.start(UPPER)
        ref = await bus.store.put(source, name="in.txt")
        first = await complete(bus, "j0001", ref)
        bus.store.local_path(first.outputs["upper"]).unlink()  # e.g. a cleaned-up artifact root
        second = await complete(bus, "j0002", ref)
        assert CALLS == ["j0001", "j0002"] and "cache_hit" not in second.metrics

    run(nats_server, captionbus_home, body)


def test_local_cache_outlives_the_bus(tmp_path: Path, captionbus_home: Path):
    """`captionbus run` starts a private server per run: with local artifacts the cache is kept
    on disk, so a second server (the next run) still finds it."""
    from captionbus.server import EmbeddedServer

    CALLS.clear()
    source = tmp_path / "in.txt"
    source.write_text("again")
    outputs = []
    for n in range(2):
        server = EmbeddedServer(tmp_path / f"nats{n}")
        server.start()
        try:
            async def body(bus, n=n):
                await bus.start(UPPER)
                ref = await bus.store.put(source, name="in.txt")
                outputs.append(await complete(bus, f"j000{n}", ref))

            run(server.url, captionbus_home, body)
        finally:
            server.stop()
    assert CALLS == ["j0000"] and outputs[1].metrics["cache_hit"] == 1.0
    assert list((captionbus_home / "stage-cache").glob("*.json"))


def test_fleet_cache_lives_in_the_kv_bucket(nats_server: str, captionbus_home: Path, tmp_path: Path):
    """With the object store (hosts share nothing but the bus) entries go to KV cb_stage_cache."""
    from captionbus.contracts import subjects
    from captionbus.core.artifacts import ArtifactStore

    CALLS.clear()
    source = tmp_path / "in.txt"
    source.write_text("fleet")

    async def body(bus):
        bus.settings.artifacts_mode = "object"
        bus.store = ArtifactStore(bus.settings, bus.js)
        await bus.start(UPPER)
        ref = await bus.store.put(source, name="in.txt")
        for job in ("j0001", "j0002"):
            await complete(bus, job, ref)
        kv = await bus.js.key_value(subjects.STAGE_CACHE_BUCKET)
        assert len(await kv.keys()) == 1
        assert bus.of_kind("stage_completed", "j0002")[0].metrics["cache_hit"] == 1.0

    run(nats_server, captionbus_home, body)
    assert CALLS == ["j0001"] and not (captionbus_home / "stage-cache").exists()


def _warning_upper(request: StageRequest, ctx) -> dict[str, Path]:
    outputs = _upper(request, ctx)
    ctx.warn("shouted on purpose")
    if request.params.get("fallback"):
        ctx.skip_cache("a fallback a rerun may improve")
    return outputs


WARNING_UPPER = StageDefinition(name="upper", handle=_warning_upper, describe_model=lambda _: "upper-v1")


def test_hits_repeat_warnings_and_fallbacks_are_not_cached(nats_server: str, captionbus_home: Path, tmp_path: Path):
    CALLS.clear()
    source = tmp_path / "in.txt"
    source.write_text("warn me")

    async def body(bus):
        await bus.start(WARNING_UPPER)
        ref = await bus.store.put(source, name="in.txt")
        for job in ("j0001", "j0002"):
            await complete(bus, job, ref)
        assert [w.message for w in bus.of_kind("stage_warning", "j0002")] == ["shouted on purpose"]
        for job in ("j0003", "j0004"):
            await complete(bus, job, ref, {"fallback": True})

    run(nats_server, captionbus_home, body)
    assert CALLS == ["j0001", "j0003", "j0004"]


def test_worker_settings_and_the_files_they_name_are_in_the_key(tmp_path: Path, monkeypatch):
    """A model folder rebuilt in place, a changed setting or a code change is a different worker."""
    import os

    from captionbus.services.runtime.cache import worker_fingerprint

    config, code = tmp_path / "config", tmp_path / "code"
    config.mkdir(), code.mkdir()
    (config / "translation.yaml").write_text("a: 1\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"x" * 10)
    monkeypatch.setenv("CAPTIONBUS_NLLB_MODEL", str(model))
    monkeypatch.setenv("CAPTIONBUS_HOME", str(tmp_path / "home-a"))
    base = worker_fingerprint({}, [config], code)
    monkeypatch.setenv("CAPTIONBUS_HOME", str(tmp_path / "home-b"))
    assert worker_fingerprint({}, [config], code) == base  # where data lives is not what is computed
    (model / "weights.bin").write_bytes(b"y" * 11)
    changed_model = worker_fingerprint({}, [config], code)
    assert changed_model != base
    assert worker_fingerprint({"num_beams": 2}, [config], code) != changed_model
    (config / "translation.yaml").write_text("a: 2\n")
    assert worker_fingerprint({}, [config], code) != changed_model
    os.utime(model)  # touching the folder itself changes nothing; its files count


def test_a_worker_with_the_cache_off_runs_everything(nats_server: str, captionbus_home: Path, tmp_path: Path,
                                                      monkeypatch):
    monkeypatch.setenv("CAPTIONBUS_STAGE_CACHE", "off")
    CALLS.clear()
    source = tmp_path / "in.txt"
    source.write_text("again and again")

    async def body(bus):
        await bus.start(UPPER)
        ref = await bus.store.put(source, name="in.txt")
        for job in ("j0001", "j0002"):
            await complete(bus, job, ref)

    run(nats_server, captionbus_home, body)
    assert CALLS == ["j0001", "j0002"] and not (captionbus_home / "stage-cache").exists()


def test_params_a_stage_never_reads_do_not_split_the_cache(nats_server: str, captionbus_home: Path, tmp_path: Path):
    """demux-like stages ignore the job's source language: -s hi and -s en share their output."""
    CALLS.clear()
    blind = StageDefinition(name="upper", handle=_upper, describe_model=lambda _: "upper-v1",
                            cache_ignores=("source_language",))
    source = tmp_path / "in.txt"
    source.write_text("same bytes")

    async def body(bus):
        await bus.start(blind)
        ref = await bus.store.put(source, name="in.txt")
        for job, language in (("j0001", "hi"), ("j0002", "en")):
            await complete(bus, job, ref, {"source_language": language})

    run(nats_server, captionbus_home, body)
    assert CALLS == ["j0001"]


def _lines(request: StageRequest, ctx) -> dict[str, Path]:
    with _lock:
        CALLS.append(request.job_id)
    text = ctx.input_path("text").read_text()
    out = ctx.work_dir / "lines.txt"
    out.write_text(text)
    ctx.items["lines"] = len(text.splitlines())
    ctx.speaker_turns = TurnSummary.of(SpeakerTurns(  # as diarization sets it: one turn per line here
        duration=len(text), speakers=["SPEAKER_00"],
        turns=[SpeakerTurn(start=n, end=n + 0.5, speaker="SPEAKER_00") for n in range(len(text.splitlines()))]))
    return {"lines": out}


LINES = StageDefinition(name="lines", handle=_lines, describe_model=lambda _: "lines-v1")


def test_item_counts_and_speaker_turns_reach_the_coordinator_and_survive_a_cache_hit(
        nats_server: str, captionbus_home: Path, tmp_path: Path):
    """A workflow fans out over StageCompleted.items: a hit must report the same count; and the
    node's record shows the same speaker turns (StageCompleted.speaker_turns) after a hit."""
    CALLS.clear()
    source = tmp_path / "in.txt"
    source.write_text("one\ntwo\nthree\n")

    async def body(bus):
        await bus.start(LINES)
        ref = await bus.store.put(source, name="in.txt")
        first, second = [], []
        for job_id, into in (("j0001", first), ("j0002", second)):
            await bus.request(job_id, "lines", inputs={"text": ref}, params={})
            into.append(await bus.wait_for("stage_completed", job_id))
        assert CALLS == ["j0001"]
        assert first[0].items == {"lines": 3} == second[0].items
        assert first[0].speaker_turns.turns == [(0, 0.5, 0), (1, 1.5, 0), (2, 2.5, 0)]
        assert first[0].speaker_turns == second[0].speaker_turns
        assert second[0].metrics["cache_hit"] == 1.0 and not any(k.startswith("items") for k in second[0].metrics)

    run(nats_server, captionbus_home, body)


def _first_line(request: StageRequest, ctx) -> dict[str, Path]:
    with _lock:
        CALLS.append(request.job_id)
    out = ctx.work_dir / "first.txt"
    out.write_text(ctx.input_path("text").read_text().splitlines()[0])
    return {"first": out}


FIRST_LINE = StageDefinition(
    name="first_line", handle=_first_line, describe_model=lambda _: "first-v1",
    cache_inputs=lambda request, ctx: {"first": ctx.input_path("text").read_text().splitlines()[0]},
)


def test_a_stage_keys_the_cache_on_what_it_reads(nats_server: str, captionbus_home: Path, tmp_path: Path):
    """StageDefinition.cache_inputs (the asr stage on one chunk): another input whose part the
    stage reads is unchanged is a hit; a change in that part is a miss."""
    CALLS.clear()
    files = {}
    for name, text in (("a", "same\nold tail"), ("b", "same\nnew tail"), ("c", "other\nold tail")):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text(text)

    async def body(bus):
        await bus.start(FIRST_LINE)
        for job_id, name in (("j0001", "a"), ("j0002", "b"), ("j0003", "c")):
            await bus.request(job_id, "first_line", inputs={"text": await bus.store.put(files[name], name="in.txt")},
                              params={})
            await bus.wait_for("stage_completed", job_id)
        assert CALLS == ["j0001", "j0003"]

    run(nats_server, captionbus_home, body)


def test_a_cache_hit_is_answered_while_the_model_still_loads(nats_server: str, captionbus_home: Path, tmp_path: Path):
    """A stage that declares its model before loading it (the configured model file and its
    stamp) answers a cached request while setup() is still running; a changed model file is
    another identity: a miss, which waits for the model ("loading model") and runs."""
    import asyncio
    import dataclasses
    import os

    from captionbus.core.bus import StagePolicy
    from captionbus.services.runtime.cache import model_identity
    from captionbus.services.runtime.serve import serve

    CALLS.clear()
    model = tmp_path / "model.bin"
    model.write_text("weights v1")
    gate = threading.Event()  # setup() of the slow workers ends when the test says so
    setups: list[str] = []

    def slow_setup(ctx):
        setups.append("started")
        gate.wait(60)
        setups.append("done")
        return {"model": str(model)}

    declared = dict(declare_model=lambda ctx: model_identity("upper", model))
    fast = dataclasses.replace(UPPER, setup=lambda ctx: {"model": str(model)}, **declared)
    slow = dataclasses.replace(UPPER, setup=slow_setup, **declared)
    source = tmp_path / "in.txt"
    source.write_text("namaste")

    async def body(bus):
        async def start(definition):
            stop = asyncio.Event()
            task = asyncio.create_task(serve(definition, bus.settings, bus.url, env_name="test", stop=stop,
                                             policy=StagePolicy(ack_wait=2.0, max_deliver=3)))
            return task, stop

        async def until(predicate, timeout=20.0):
            async with asyncio.timeout(timeout):
                while not predicate():
                    await asyncio.sleep(0.05)

        task, stop = await start(fast)
        first = await complete(bus, "j0001", await bus.store.put(source, name="in.txt"))
        assert CALLS == ["j0001"]
        stop.set()
        await task

        task, stop = await start(slow)
        await until(lambda: setups == ["started"])
        hit = await complete(bus, "j0002", await bus.store.put(source, name="in.txt"))
        assert hit.metrics["cache_hit"] == 1.0 and hit.outputs == first.outputs
        assert setups == ["started"] and not gate.is_set(), "the hit waited for the model"
        gate.set()
        stop.set()
        await task

        # The model file changes (same path): a new identity, so a miss; it waits for setup.
        gate.clear()
        setups.clear()
        model.write_text("weights v2, retrained")
        os.utime(model, ns=(1, 1))
        task, stop = await start(slow)
        await until(lambda: setups == ["started"])
        await bus.request("j0003", "upper", inputs={"text": await bus.store.put(source, name="in.txt")})
        progress = await bus.wait_for("stage_progress", "j0003")
        assert progress.message == "loading model"
        await asyncio.sleep(0.5)
        assert not bus.of_kind("stage_completed", "j0003") and CALLS == ["j0001"]
        gate.set()
        miss = await bus.wait_for("stage_completed", "j0003", timeout=20)
        assert "cache_hit" not in miss.metrics and CALLS == ["j0001", "j0003"]
        stop.set()
        await task

    run(nats_server, captionbus_home, body)


def test_declared_model_identity_follows_the_model_files(tmp_path: Path):
    """What asr and vad declare before loading: the configured source plus a stamp of its files."""
    import os

    import structlog

    from captionbus.contracts.declarations.asr import AsrOptions
    from captionbus.contracts.declarations.vad import VadOptions
    from captionbus.services.asr.stage import declare_model as asr_model
    from captionbus.services.runtime import SetupContext
    from captionbus.services.runtime.cache import model_identity
    from captionbus.services.vad.stage import declare_model as vad_model

    folder = tmp_path / "whisper-base-ct2"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    log = structlog.get_logger("test")

    def asr(**options):
        return asr_model(SetupContext(stage="asr", env="t", models_dir=tmp_path, log=log,
                                      options=AsrOptions(backend="whisperx", **options)))

    first = asr()  # the default model folder under models_dir
    assert first.startswith(f"whisperx|{folder}|") and asr(model=str(folder)) == first
    (folder / "model.bin").write_bytes(b"weights, retrained")
    os.utime(folder / "model.bin", ns=(1, 1))
    assert asr() != first, "a changed model file must change the identity (a cache miss)"
    assert asr(model="Systran/faster-whisper-tiny") == "whisperx|Systran/faster-whisper-tiny"

    onnx = tmp_path / "silero_vad.onnx"
    onnx.write_bytes(b"onnx")
    vad = vad_model(SetupContext(stage="vad", env="t", models_dir=tmp_path, log=log, options=VadOptions(model=str(onnx))))
    assert vad == model_identity("silero-vad-onnx", onnx) and vad.startswith(f"silero-vad-onnx|{onnx}|")


def test_alignment_declares_its_whole_model_table_before_loading(tmp_path: Path):
    """Alignment loads its models lazily per language, so it declares the configured table:
    a local folder is stamped (retrained weights: a new identity), a hub id is itself, and
    switching one language off changes the identity too."""
    import os

    import structlog

    from captionbus.contracts.declarations.alignment import AlignmentOptions
    from captionbus.services.alignment.stage import declare_model
    from captionbus.services.runtime import SetupContext
    from captionbus.services.runtime.cache import model_identity

    folder = tmp_path / "wav2vec2-en"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    config = tmp_path / "alignment.yaml"
    config.write_text("models:\n  en: wav2vec2-en\n  hi: some/hub-model\n")
    log = structlog.get_logger("test")

    def declared(**models):
        options = AlignmentOptions(config=str(config), models=models)
        return declare_model(SetupContext(stage="alignment", env="t", models_dir=tmp_path, log=log, options=options))

    first = declared()
    assert first.startswith("alignment|") and model_identity("wav2vec2-ctc", folder) in first
    assert "wav2vec2-ctc|some/hub-model" in first and declared() == first
    (folder / "model.safetensors").write_bytes(b"weights, retrained")
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert declared() != first, "retrained weights must be a cache miss"
    assert declared(hi=None) != declared(), "alignment switched off for a language changes the identity"


def test_translation_and_separation_declare_their_models_before_loading(tmp_path: Path, monkeypatch):
    """NLLB, IndicTrans2 and demucs name what setup() will load without importing torch: the
    option / env override wins, a local folder is stamped, and a changed source is a new identity."""
    import os

    import structlog

    from captionbus.contracts.declarations.source_separation import SourceSeparationOptions
    from captionbus.contracts.declarations.translation import IndicTrans2Options, NllbOptions
    from captionbus.services.runtime import SetupContext
    from captionbus.services.runtime.cache import model_identity
    from captionbus.services.source_separation.stage import STAGE as DEMUCS
    from captionbus.services.translation.indictrans2_stage import STAGE as INDICTRANS2
    from captionbus.services.translation.nllb_stage import STAGE as NLLB

    log = structlog.get_logger("test")
    folder = tmp_path / "nllb-tiny"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")

    def declared(stage, options):
        return stage.declare_model(SetupContext(stage=stage.name, env="t", models_dir=tmp_path, log=log, options=options))

    monkeypatch.delenv("CAPTIONBUS_NLLB_MODEL", raising=False)
    default = declared(NLLB, NllbOptions())
    local = declared(NLLB, NllbOptions(model=str(folder)))
    assert local != default and model_identity("translation_nllb", folder) in local
    monkeypatch.setenv("CAPTIONBUS_NLLB_MODEL", str(folder))
    assert declared(NLLB, NllbOptions()) == local, "the env override is what load_nllb reads"
    (folder / "model.safetensors").write_bytes(b"weights, retrained")
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert declared(NLLB, NllbOptions()) != local

    indic = declared(INDICTRANS2, IndicTrans2Options())
    assert indic.startswith("translation_indictrans2|") and len(json_table(indic)) >= 2, indic

    repo = tmp_path / "demucs-repo"
    repo.mkdir()
    (repo / "tiny.th").write_bytes(b"weights")
    separated = declared(DEMUCS, SourceSeparationOptions(model="tiny", repo=str(repo)))
    assert separated == model_identity("demucs:tiny", repo)
    assert declared(DEMUCS, SourceSeparationOptions(model="htdemucs")) == "demucs:htdemucs|pretrained"


def json_table(declared: str) -> dict:
    import json

    return json.loads(declared.split("|", 1)[1])
