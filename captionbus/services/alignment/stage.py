"""alignment: re-times the words of an ASR transcript by forced alignment with a wav2vec2 CTC
model for the transcript's language (whisperx.load_align_model + whisperx.align).

Inputs: `audio` (16 kHz mono 16-bit WAV, the demux output), `transcript` (transcript JSON from
asr, captionbus.contracts.transcript.Transcript).
Params: declaration.AlignmentParams: `language` or the job's `source_language`
(optional; when given it must be the transcript's language).
Outputs: `transcript` (transcript.json): the same segments with the same text, speakers and
flags; words re-timed and `aligned=True`. Segment start/end only move inwards, to their first
word's start and last word's end.

Guarantees, whatever the model did: word times never go backwards (each word starts at or after
the previous word's end), every word lies inside its segment, and a word without times gets
times interpolated between its neighbours (in proportion to its length).

No model for the language (not configured, or it fails to load): the input transcript is
passed on unchanged (`aligned=False`, ASR word times) with a warning; the job goes on. A broken
configured model is a fallback rather than a failure on purpose: alignment only refines times
that are already usable, the warning (with the load error) reaches the job's events, and a
fleet with one bad model folder should still deliver subtitles. A failed load is retried after
RETRY_FAILED_LOAD_S, so a fixed folder is picked up without a restart.

Models: `config/alignment.yaml` maps language -> local folder, Hugging Face id or torchaudio
pipeline name (whisperx's defaults); the service option model_<lang> (or
CAPTIONBUS_ALIGN_MODEL_<LANG>) overrides one language. Service options:
declaration.AlignmentOptions (`captionbus stages alignment`).
Models load on first use of their language and stay warm. Local folders load with
`local_files_only` (the per-call form of HF_HUB_OFFLINE: no hub request at all); with
HF_HUB_OFFLINE=1 set, hub ids load only from the local Hugging Face cache and torchaudio
pipelines are not downloaded.

Sentence splitting (why no punkt download). whisperx.align cuts each segment into sentences with
NLTK's Punkt and, when the `punkt_tab` data is missing, calls `nltk.download('punkt_tab')`,
which needs the network. The split does not affect any time: characters are aligned over the
whole segment in one CTC pass before it, and words are cut at spaces; the split only divides
whisperx's output into sentence sub-segments, which this stage merges back into the input's
segments anyway. So setup() writes parameter-free Punkt models (the four empty `punkt_tab`
files for each language whisperx asks for) into a private temporary NLTK data dir at the front
of `nltk.data.path`: Punkt then splits at sentence punctuation without trained abbreviation
lists, nltk finds its data, and nothing is downloaded. whisperx itself runs unmodified.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captionbus.contracts import StageRequest
from captionbus.contracts.declarations.alignment import ALIGNMENT, AlignmentOptions, AlignmentParams
from captionbus.contracts.languages import UnknownLanguage, check_language
from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.core import settings as core_settings
from captionbus.core.hardware import usable_cores
from captionbus.services.audio import SAMPLE_RATE, read_wav, wav_duration
from captionbus.services.runtime import BadInput, SetupContext, StageContext, StageDefinition
from captionbus.services.runtime.cache import model_identity
from captionbus.services.runtime.options import default_device

RETRY_FAILED_LOAD_S = 600.0
# whisperx aligns these languages character by character (no spaces between words).
LANGUAGES_WITHOUT_SPACES = ("ja", "zh")
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


# ---------------------------------------------------------------- pure helpers (unit-tested)

def squeeze(text: str) -> str:
    return "".join(text.split())


def target_words(segment: Segment, language: str) -> list[str]:
    """The words the output segment will have: the input's words when they spell the segment
    text (asr's always do), else the text cut the way whisperx cuts it."""
    if segment.words and squeeze("".join(w.text for w in segment.words)) == squeeze(segment.text):
        return [w.text for w in segment.words]
    if language in LANGUAGES_WITHOUT_SPACES:
        return [c for c in segment.text if not c.isspace()]
    return segment.text.split()


def regroup(units: list[dict], targets: list[str]) -> list[Word] | None:
    """Aligned units (whisperx words: {"word", "start", "end", "score"}, in text order) -> one
    Word per target text, each spanning the units its characters fall in. None when the units
    do not spell the targets' characters.

    whisperx builds each sentence's words from the characters up to and including the one after
    the sentence, so where sentences abut without a space ("Really?! Yes": "?" | "!") that
    character appears twice, with the same times both times; the extra copy is skipped."""
    target_chars = squeeze("".join(targets))
    owner: list[int] = []  # for each target character: the unit that timed it
    for index, unit in enumerate(units):
        for char in squeeze(str(unit.get("word", ""))):
            if len(owner) < len(target_chars) and char == target_chars[len(owner)]:
                owner.append(index)
    if len(owner) != len(target_chars):
        return None
    words, position = [], 0
    for text in targets:
        width = len(squeeze(text))
        covering = [units[i] for i in sorted(set(owner[position : position + width]))]
        position += width
        starts = [float(u["start"]) for u in covering if _is_time(u.get("start"))]
        ends = [float(u["end"]) for u in covering if _is_time(u.get("end"))]
        scores = [float(u["score"]) for u in covering if _is_time(u.get("score"))]
        words.append(
            Word(
                text=text,
                start=min(starts) if starts and ends else None,
                end=max(ends) if starts and ends else None,
                score=round(sum(scores) / len(scores), 3) if scores else None,
            )
        )
    return words


def _is_time(value: Any) -> bool:
    return value is not None and value == value  # NaN != NaN


def enforce_word_times(words: list[Word], segment_start: float, segment_end: float) -> list[Word]:
    """Words with times that never go backwards and lie inside [segment_start, segment_end];
    a word missing its start or end gets both interpolated in the gap between its timed
    neighbours (or the segment edges), shared in proportion to word length."""
    low, high = float(segment_start), max(float(segment_start), float(segment_end))
    out = [w.model_copy() for w in words]
    last_end = low
    for word in out:  # timed words: clamp into the segment, then push forward past the previous end
        if not (_is_time(word.start) and _is_time(word.end)):
            word.start = word.end = None
            continue
        start = min(max(float(word.start), low, last_end), high)
        end = min(max(float(word.end), start), high)
        word.start, word.end = start, end
        last_end = end
    index = 0
    while index < len(out):  # runs of untimed words share the gap they sit in
        if out[index].start is not None:
            index += 1
            continue
        run_end = index
        while run_end < len(out) and out[run_end].start is None:
            run_end += 1
        gap_start = out[index - 1].end if index > 0 else low
        gap_end = out[run_end].start if run_end < len(out) else high
        weights = [max(1, len(squeeze(w.text))) for w in out[index:run_end]]
        total, done = float(sum(weights)), 0
        for word, weight in zip(out[index:run_end], weights):
            word.start = gap_start + (gap_end - gap_start) * done / total
            done += weight
            word.end = gap_start + (gap_end - gap_start) * done / total
        index = run_end
    for word in out:  # rounding and clamping are monotonic, so the order survives them
        word.start = min(max(round(word.start, 3), low), high)
        word.end = min(max(round(word.end, 3), low), high)
    return out


def tighten(segment: Segment) -> Segment:
    """The segment's start/end moved in to its words (never out)."""
    if not segment.words:
        return segment
    start = max(segment.start, segment.words[0].start)
    end = min(segment.end, segment.words[-1].end)
    if end < start:
        return segment
    return segment.model_copy(update={"start": start, "end": end})


def resolve_source(value: str, models_dir: Path) -> tuple[str, bool]:
    """A configured model -> (what to load, is it a local folder). Relative folders are looked
    up under the models dir; anything else is a hub id or torchaudio pipeline name."""
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith("."):
        return str(path), True
    if (models_dir / path).is_dir():
        return str(models_dir / path), True
    return value, False


def configured_models(options: dict[str, Any], environ: dict[str, str], config_path: Path) -> dict[str, str | None]:
    """language -> configured model (None = alignment off for it): the config file, then
    CAPTIONBUS_ALIGN_MODEL_<LANG>, then the service option model_<lang>."""
    import yaml

    try:
        data = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise RuntimeError(f"alignment models config {config_path} is unreadable: {err}")
    models = data.get("models") or {}
    bad_keys = [k for k in models if not isinstance(k, str)]
    if bad_keys:
        raise RuntimeError(f"{config_path}: language keys {bad_keys} are not strings (quote them: YAML reads no/on/yes as booleans)")
    table: dict[str, str | None] = {k.lower(): (str(v) if v else None) for k, v in models.items()}
    for key, value in environ.items():
        if key.startswith("CAPTIONBUS_ALIGN_MODEL_"):
            table[key[len("CAPTIONBUS_ALIGN_MODEL_"):].lower()] = value or None
    for key, value in options.items():
        if key.lower().startswith("model_"):
            table[key[len("model_"):].lower()] = str(value) if value else None
    return table


# ---------------------------------------------------------------- models

@dataclass
class LoadedModel:
    model: Any
    metadata: dict
    source: str
    load_seconds: float


@dataclass
class Aligner:
    """What setup() returns: the model table and the warm models (LRU by language)."""

    sources: dict[str, str | None]
    models_dir: Path
    device: str
    cache_size: int
    cache_dir: str | None
    punkt_dir: Path
    loaded: OrderedDict = field(default_factory=OrderedDict)
    failed: dict[str, tuple[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def model_for(self, language: str, log) -> tuple[LoadedModel | None, str | None, float]:
        """(model, None, load seconds) or (None, why not, 0). Caller holds the lock."""
        if language in self.loaded:
            self.loaded.move_to_end(language)
            return self.loaded[language], None, 0.0
        configured = self.sources.get(language)
        if not configured:
            return None, f"no alignment model for {language} (set CAPTIONBUS_ALIGN_MODEL_{language.upper()} or config/alignment.yaml)", 0.0
        if language in self.failed and time.monotonic() - self.failed[language][1] < RETRY_FAILED_LOAD_S:
            return None, self.failed[language][0], 0.0
        started = time.monotonic()
        try:
            loaded = self._load(language, configured)
        except Exception as err:  # any load error is a fallback, not a crash (module docstring)
            # whisperx replaces the real error with a generic "could not be found in huggingface"
            cause = err.__cause__ or err.__context__ or err
            detail = f"{type(cause).__name__}: {' '.join(str(cause).split())}"
            reason = f"alignment model for {language} ({configured}) failed to load ({detail[:300]})"
            self.failed[language] = (reason, time.monotonic())
            log.warning("alignment model failed to load", language=language, model=configured, error=detail[:2000], whisperx=str(err))
            return None, reason, 0.0
        seconds = time.monotonic() - started
        loaded.load_seconds = seconds
        self.failed.pop(language, None)
        self.loaded[language] = loaded
        while len(self.loaded) > self.cache_size:
            evicted, _ = self.loaded.popitem(last=False)
            log.info("alignment model unloaded", language=evicted)
        log.info("alignment model loaded", language=language, model=loaded.source, seconds=round(seconds, 2))
        return loaded, None, seconds

    def _load(self, language: str, configured: str) -> LoadedModel:
        import whisperx

        source, local = resolve_source(configured, self.models_dir)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if local and not Path(source).is_dir():
            raise FileNotFoundError(f"model folder {source} does not exist")
        if not local and offline:
            import torchaudio

            if source in torchaudio.pipelines.__all__:
                raise RuntimeError(f"torchaudio pipeline {source} would be downloaded, but HF_HUB_OFFLINE is set; configure a local folder")
        model, metadata = whisperx.load_align_model(
            language, self.device, model_name=source, model_dir=self.cache_dir, model_cache_only=local or offline
        )
        model.eval()
        return LoadedModel(model, metadata, source, 0.0)


def parameter_free_punkt(languages: set[str]) -> Path:
    """A private NLTK data dir with an untrained Punkt model per language (module docstring)."""
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="captionbus-punkt-"))
    atexit.register(shutil.rmtree, root, True)
    for language in languages:
        folder = root / "tokenizers" / "punkt_tab" / language
        folder.mkdir(parents=True)
        for name in PUNKT_FILES:
            (folder / name).write_text("")
    return root


def _sources(options: AlignmentOptions) -> dict[str, str | None]:
    config_file = Path(options.config) if options.config else core_settings.config_path("alignment.yaml")
    overrides = {f"model_{language}": model for language, model in options.models.items()}
    return configured_models(overrides, {}, config_file)  # options.models holds CAPTIONBUS_ALIGN_MODEL_* too


def declare_model(ctx: SetupContext) -> str:
    """Every model this worker may align with, before setup() imports torch and whisperx (about
    10 s here), so the stage cache answers hits meanwhile. Models load lazily per language, so
    the identity is the whole configured table (language -> source, local folders stamped by
    size/mtime): changing any language's model makes every alignment entry a miss - coarse, but
    never a stale hit."""
    models_dir = Path(ctx.models_dir)
    table = {
        language: (model_identity("wav2vec2-ctc", resolve_source(model, models_dir)[0]) if model else None)
        for language, model in sorted(_sources(ctx.options).items())
    }
    return "alignment|" + json.dumps(table, sort_keys=True)


def setup(ctx: SetupContext) -> Aligner:
    import nltk
    import torch
    from whisperx.utils import PUNKT_LANGUAGES

    options: AlignmentOptions = ctx.options
    sources = _sources(options)
    torch.set_num_threads(options.threads or usable_cores())
    punkt_dir = parameter_free_punkt(set(PUNKT_LANGUAGES.values()) | {"english"})
    nltk.data.path.insert(0, str(punkt_dir))
    aligner = Aligner(
        sources=sources,
        models_dir=Path(ctx.models_dir),
        device=options.device or default_device(),
        cache_size=options.cache_size,
        cache_dir=options.cache_dir,
        punkt_dir=punkt_dir,
    )
    ctx.log.info("alignment ready", languages=sorted(k for k, v in sources.items() if v), device=aligner.device)
    return aligner


def describe_model(resources: Aligner | None) -> str | None:
    if resources is None:
        return None
    models = list(resources.loaded.items())  # a copy: called from the heartbeat thread
    loaded = ", ".join(f"{lang}: {m.source}" for lang, m in models) or "none loaded yet"
    return f"wav2vec2 CTC per language ({loaded}; {resources.device})"


# ---------------------------------------------------------------- request handling

def transcript_language(params: AlignmentParams, transcript: Transcript) -> str:
    try:
        language = check_language(transcript.language)
    except UnknownLanguage as unknown:
        raise BadInput(f"transcript language: {unknown}")
    if transcript.translated_from:
        raise BadInput(
            f"the transcript is a translation ({transcript.translated_from} -> {language}); "
            f"alignment needs the transcript of what is spoken in the audio"
        )
    wanted = params.language or params.source_language
    if wanted not in (None, "", "auto"):
        try:
            wanted = check_language(wanted)
        except UnknownLanguage as unknown:
            raise BadInput(str(unknown))
        if wanted != language:
            raise BadInput(
                f"the job says the audio is in {wanted!r} but the transcript is in {language!r}; "
                f"align a transcript of the same language"
            )
    return language


def align_segment(aligner: Aligner, model: LoadedModel, audio, segment: Segment, language: str) -> tuple[list[Word] | None, int]:
    """(words re-timed by whisperx.align, how many of them it timed), or (None, 0) when whisperx
    could not align this segment (nothing alignable, outside the audio, no CTC path)."""
    import whisperx

    duration = audio.shape[-1] / SAMPLE_RATE
    # whisperx scales frame indices by (end - start): an end past the audio would stretch the times
    end = min(segment.end, duration)
    if not segment.text.strip() or segment.start >= end:
        return None, 0
    result = whisperx.align(
        [{"start": segment.start, "end": end, "text": segment.text}],
        model.model, model.metadata, audio, aligner.device,
    )
    units = [w for sub in result["segments"] for w in sub.get("words", [])]
    if not units:
        return None, 0
    words = regroup(units, target_words(segment, language))
    if words is None:
        return None, 0
    return words, sum(1 for w in words if w.start is not None)


def align_in_window(aligner: Aligner, model: LoadedModel, path: Path, duration: float, segment: Segment,
                    language: str) -> tuple[list[Word] | None, int]:
    """align_segment on the segment's own samples only (read from the WAV by seeking: memory
    follows the segment, not the film): whisperx.align cuts exactly [start, end] out of the
    audio it is given, so handing it that window with the times moved changes nothing else."""
    import torch

    start, end = max(0.0, segment.start), min(segment.end, duration)
    if end <= start:
        return None, 0
    window = torch.from_numpy(read_wav(path, start_s=start, end_s=end)).unsqueeze(0)
    local = segment.model_copy(update={"start": segment.start - start, "end": segment.end - start})
    words, timed = align_segment(aligner, model, window, local, language)
    if words is None:
        return None, 0

    def move(t: float | None) -> float | None:
        return None if t is None else round(t + start, 3)

    return [w.model_copy(update={"start": move(w.start), "end": move(w.end)}) for w in words], timed


def handle(request: StageRequest, ctx: StageContext) -> dict[str, Path]:
    aligner: Aligner = ctx.resources
    transcript = ctx.input("transcript", Transcript)
    language = transcript_language(ctx.params, transcript)
    duration = wav_duration(ctx.input_path("audio"))
    started = time.monotonic()
    out = ctx.work_dir / "transcript.json"
    total_words = sum(len(s.words) for s in transcript.segments)

    def keep_input(reason: str | None) -> dict[str, Path]:
        if reason:
            ctx.warn(f"{reason}: kept ASR word times")
            ctx.skip_cache(reason)  # a model configured or loadable later should get its chance
        out.write_text(transcript.model_dump_json(indent=1))
        ctx.metrics.update(alignment_s=time.monotonic() - started, words=float(total_words), words_aligned=0.0,
                           fallback=1.0 if reason else 0.0, segments=float(len(transcript.segments)))
        ctx.progress(1.0, "kept ASR word times" if reason else "nothing to align")
        return {"transcript": out}

    if not transcript.segments:
        return keep_input(None)
    if duration == 0:
        raise BadInput("audio is empty but the transcript has speech; align the audio the transcript came from")

    with aligner.lock:
        model, reason, load_seconds = aligner.model_for(language, ctx.log)
        if model is None:
            return keep_input(reason)
        ctx.progress(0.02, f"aligning with {Path(model.source).name}")
        segments, words_aligned, unaligned_segments = [], 0, 0
        for n, segment in enumerate(transcript.segments):
            words, timed = align_in_window(aligner, model, ctx.input_path("audio"), duration, segment, language)
            if words is None:
                unaligned_segments += 1
                words = segment.words  # this segment keeps its ASR word times
            words_aligned += timed
            fixed = segment.model_copy(update={"words": enforce_word_times(words, segment.start, segment.end)})
            segments.append(tighten(fixed) if timed else fixed)
            ctx.progress(0.02 + 0.98 * (n + 1) / len(transcript.segments), f"segment {n + 1}/{len(transcript.segments)}")

    if unaligned_segments:
        ctx.warn(f"{unaligned_segments} of {len(segments)} segment(s) could not be aligned: kept their ASR word times")
    aligned = transcript.model_copy(update={"segments": segments, "aligned": words_aligned > 0})
    out.write_text(aligned.model_dump_json(indent=1))
    ctx.metrics.update(
        alignment_s=time.monotonic() - started,
        model_load_s=load_seconds,
        words=float(sum(len(s.words) for s in segments)),
        words_aligned=float(words_aligned),
        fallback=0.0,
        segments=float(len(segments)),
    )
    return {"transcript": out}


STAGE = StageDefinition(
    spec=ALIGNMENT,
    handle=handle,
    setup=setup,
    report_packages=("whisperx", "torch", "transformers", "nltk"),
    describe_model=describe_model,
    declare_model=declare_model,
)
