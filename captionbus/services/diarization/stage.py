"""diarization: 16 kHz mono WAV + the vad stage's speech regions -> who speaks when (turns.json,
captionbus.contracts.speech.SpeakerTurns), in the `diarization` env (torch, scikit-learn, onnxruntime).

What it does (captionbus/services/diarization/core.py, measured in docs/speakers.md): the speech regions are
cut into 1.5 s windows every 0.75 s, each window gets a speaker embedding (CAM++ by default, the
measured best; `embedder` picks Resemblyzer or the d-vector), all windows are clustered at once
(`speakers`: auto, N or MIN-MAX) and every 10 ms of speech takes the label whose windows cover it
most. The audio is read block by block (BLOCK_S of film at a time, only the regions inside it:
captionbus.services.audio.read_wav seeks) and only one 192-d vector per window is kept; progress is
reported per block (and a cancelled job stops at the next one). Measured through this handler
(benchmarks/diarization.py, docs/speakers.md, 1 thread, load average ~5 on 2 cores): 59 s of four
voices DER 1.6 %, 4/4 speakers, peak RSS 792-832 MB; 32 minutes DER 2.3 %, 4/4, wall RTF 0.050,
CPU 0.038 s per second of audio, peak RSS 906-915 MB (733 MB after setup).

Why one request per film, also in the chunked workflows (not one per chunk): speaker labels only
mean something if every window of the film is clustered together -- "SPEAKER_01" in chunk 1 must
be SPEAKER_01 in chunk 40. Per-chunk requests would need a second, global step over their
embeddings (a join stage holding every chunk's vectors) for no gain here: the whole-film request
is cheap next to asr (CAM++ RTF 0.05-0.12 on the 32-minute dialogue on a quiet machine,
docs/speakers.md) and runs in parallel with it (it needs only demux's audio and the vad regions);
transcript_join waits for both. On a film so long that one request is too slow, the windows
already carry film times (core.WindowEmbeddings.concat), so per-chunk embedding with one global
clustering step is the way to split it. The over-clustering runs in blocks of 1000 windows
(core.AGGLOMERATE_BLOCK), so its distances stay ~4 MB a copy however long the film.

The labels are SPEAKER_00, SPEAKER_01, ... in order of first appearance. The output names the
models and package versions that made it (`models`, `versions`). The completion also carries the
turns themselves, bounded (contracts.speech.TurnSummary: the first 2000, and every speaker's
seconds), onto the node's record in the job state, which every role reads (the dashboard's lane). Audio of zero length or with no
speech regions gives no turns and a warning, as vad does; a corrupt WAV is BadInput.

Params: declaration.DiarizationParams; service options: declaration.DiarizationOptions
(`captionbus stages diarization`).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.diarization import (
    DEFAULT_EMBEDDER,
    DIARIZATION,
    REFERENCE_MAX_S,
    REFERENCE_MIN_S,
    DiarizationOptions,
    DiarizationParams,
)
from captionbus.contracts.speech import SpeakerTurn, SpeakerTurns, SpeechRegions, TurnSummary
from captionbus.services.audio import SAMPLE_RATE, open_wav, read_wav, wav_duration
from captionbus.services.runtime import BadInput, SetupContext, StageContext, StageDefinition
from captionbus.services.runtime.cache import model_identity

BLOCK_S = 120.0  # film seconds read and embedded at a time (one progress report each)
VERSIONED = ("torch", "torchaudio", "scikit-learn", "onnxruntime", "numpy")


@dataclass
class Embedders:
    """The embedders this process has loaded (the default at setup, others on first use)."""

    options: DiarizationOptions
    models_dir: Path
    loaded: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def path(self, name: str) -> Path:
        from captionbus.services.diarization.models import DEFAULT_FILES

        configured = getattr(self.options, name)
        return Path(configured) if configured else self.models_dir / DEFAULT_FILES[name]

    def get(self, name: str) -> Any:
        from captionbus.services.diarization.models import load_embedder

        with self.lock:
            if name not in self.loaded:
                self.loaded[name] = load_embedder(name, path=self.path(name), threads=self.options.threads)
            return self.loaded[name]


def setup(ctx: SetupContext) -> Embedders:
    embedders = Embedders(ctx.options, Path(ctx.models_dir))
    started = time.monotonic()
    try:
        embedders.get(DEFAULT_EMBEDDER)
    except FileNotFoundError as e:  # the service cannot start: say the command that fixes it
        raise RuntimeError(str(e)) from None
    ctx.log.info("speaker embedder loaded", embedder=DEFAULT_EMBEDDER, model=str(embedders.path(DEFAULT_EMBEDDER)),
                 seconds=round(time.monotonic() - started, 2))
    return embedders


def declare_model(ctx: SetupContext) -> str:
    """Every embedder file a request may pick, stamped (a replaced file is a new model)."""
    embedders = Embedders(ctx.options, Path(ctx.models_dir))
    return ";".join(model_identity(name, embedders.path(name)) for name in ("campplus", "resemblyzer", "dvector"))


def describe_model(resources: Embedders | None) -> str | None:
    if resources is None:
        return None
    return ", ".join(f"{name} ({e.path.name})" for name, e in resources.loaded.items())


def versions() -> dict[str, str]:
    out = {}
    for package in VERSIONED:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def blocks(regions: list[tuple[float, float]], block_s: float = BLOCK_S) -> list[tuple[float, float, list]]:
    """Regions grouped into spans of about `block_s` (a region is never split): (start, end, regions)."""
    out: list[tuple[float, float, list]] = []
    for start, end in regions:
        if out and end - out[-1][0] <= block_s:
            out[-1] = (out[-1][0], end, out[-1][2] + [(start, end)])
        else:
            out.append((start, end, [(start, end)]))
    return out


def reference_vectors(params: DiarizationParams, ctx: StageContext, embedder: Any) -> dict[str, Any]:
    """Known speakers: name -> the vector of their reference clip (models.reference_vector). The
    clips are artifacts the params name (uploaded at submit, converted there to 16 kHz mono WAV);
    a clip that is not one, or is not 2-10 s long, is BadInput: the door checks it first, so only
    a client that skipped the door gets here."""
    from captionbus.services.diarization import models

    out = {}
    for n, (name, ref) in enumerate((params.references or {}).items()):
        path = ctx.artifact(f"reference-{n}", ref)
        what = f"the reference clip of {name!r}"
        seconds = wav_duration(path, what)
        if not REFERENCE_MIN_S - 0.1 <= seconds <= REFERENCE_MAX_S + 0.1:
            raise BadInput(f"{what} is {seconds:.1f} s; a reference clip is {REFERENCE_MIN_S:g}-{REFERENCE_MAX_S:g} s")
        try:
            out[name] = models.reference_vector(embedder, read_wav(path, what))
        except ValueError as e:
            raise BadInput(f"{what}: {e}") from None
    return out


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    from captionbus.services.diarization import core, models

    params: DiarizationParams = ctx.params
    count = core.SpeakerCount.parse(params.speakers)
    speech = ctx.input("regions", SpeechRegions)
    audio = ctx.input_path("audio")
    with open_wav(audio) as reader:
        duration = reader.getnframes() / SAMPLE_RATE
    regions = [(min(r.start, duration), min(r.end, duration)) for r in speech.regions if r.start < duration]
    try:
        embedder = ctx.resources.get(params.embedder)
    except FileNotFoundError as e:  # a non-default embedder this worker has no weights for
        raise BadInput(f"embedder {params.embedder}: {e}") from None
    started = time.monotonic()
    references = reference_vectors(params, ctx, embedder)
    parts = []
    spans = blocks(regions, BLOCK_S)
    for n, (lo, hi, inside) in enumerate(spans):
        samples = read_wav(audio, start_s=lo, end_s=hi)
        parts.append(models.embed_regions(embedder, samples, [(a - lo, b - lo) for a, b in inside], offset_s=lo))
        ctx.progress(0.9 * (n + 1) / len(spans), f"{hi:.0f} s of {duration:.0f} s embedded")
    windows = core.WindowEmbeddings.concat(parts)
    embedded = time.monotonic()
    settings = core.AUTO_SETTINGS[params.embedder]
    turns = core.diarize_windows(windows, regions, count, settings, references, settings.reference_match)
    result = SpeakerTurns(
        duration=round(duration, 3),
        speakers=list(dict.fromkeys(t.speaker for t in turns)),
        turns=[SpeakerTurn(start=t.start, end=t.end, speaker=t.speaker) for t in turns],
        requested=params.speakers,
        models={"embedder": f"{embedder.name} ({embedder.path.name}, {embedder.dim}-d)",
                "regions": speech.backend,
                "clustering": "agglomerative, cosine, average linkage + centroid merge (scikit-learn)",
                **({"references": f"{len(references)} known speakers, centroid cosine >= {settings.reference_match}"}
                   if references else {})},
        versions=versions(),
    )
    out = ctx.work_dir / "turns.json"
    out.write_text(result.model_dump_json(indent=1))
    ctx.speaker_turns = TurnSummary.of(result)  # on the node's record: the dashboard's lane for every role
    seconds = time.monotonic() - started
    ctx.metrics.update(audio_duration_s=duration, windows=float(len(windows)), embed_s=embedded - started,
                       cluster_s=time.monotonic() - embedded, diarization_s=seconds,
                       realtime_factor=seconds / duration if duration else 0.0,
                       speakers=float(len(result.speakers)), turns=float(len(turns)))
    if duration == 0:
        ctx.warn("the audio is empty (0 samples): no speaker turns")
    elif not regions:
        ctx.warn("no speech regions in the audio: no speaker turns")
    elif not turns:
        ctx.warn("every speech region is too short for a speaker embedding (under 0.4 s): no speaker turns")
    ctx.progress(1.0, f"{len(result.speakers)} speakers, {len(turns)} turns")
    return {"turns": out}


STAGE = StageDefinition(
    spec=DIARIZATION,
    handle=handle,
    setup=setup,
    report_packages=("torch", "scikit-learn", "onnxruntime"),
    describe_model=describe_model,
    declare_model=declare_model,
    cache_ignores=("source_language", "target_languages"),  # the job's languages change nothing here
)
