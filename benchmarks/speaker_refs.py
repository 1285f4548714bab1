"""Known speakers: how alike a reference clip and a speaker's cluster are, same voice vs another
voice, on the recorded human voices (tests/speakers_media.py), to set the match threshold
(core.AutoSettings.reference_match) from measurements, not a guess.

    python benchmarks/speaker_refs.py [--embedders campplus dvector resemblyzer] [--media short dev]

Runs in the `diarization` env (it re-executes itself there). Two measurements per embedder:

1. Clips drawn apart: for each of the four actors, three reference clips each of 1, 2 and 3
   lines (about 3, 6 and 9 s; the door takes 2-10 s) and "clusters" of 3 (three) and of 15 (one)
   other lines (the centroid
   of their windows, as the stage computes a cluster's). Every reference against every cluster:
   the cosine similarity of the reference's vector (models.reference_vector) and the centroid,
   for the same actor and for another actor.
2. Real clusters: the diarization of a dialogue (`short`, `dev`: benchmarks/diarization.py's
   media, reference turns as regions, `auto`), each cluster's centroid (named by the actor most
   of its windows belong to) against references cut from lines that dialogue does not use.

It prints, for same-actor and different-actor pairs, min / 5th percentile / mean / 95th
percentile / max, and the hardest pair of actors.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def in_env() -> None:
    """Re-run this script in the diarization env unless already there."""
    try:
        import torch  # noqa: F401
    except ImportError:
        from captionbus.envs import env_python

        os.execve(str(env_python("diarization")), [str(env_python("diarization")), *sys.argv],
                  {**os.environ, "PYTHONPATH": str(REPO)})


def stats(values: list[float]) -> str:
    v = np.asarray(values)
    return (f"n={len(v):4d} min {v.min():.3f} p5 {np.percentile(v, 5):.3f} mean {v.mean():.3f} "
            f"p95 {np.percentile(v, 95):.3f} max {v.max():.3f}")


def clip_windows(embedder, clips: list[np.ndarray]) -> np.ndarray:
    from captionbus.services.diarization import models

    vectors = [models.embed_regions(embedder, c, [(0.0, len(c) / models.SR)]).vectors for c in clips]
    return np.concatenate(vectors)


def centroid(vectors: np.ndarray) -> np.ndarray:
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    m = v.mean(axis=0)
    return m / np.linalg.norm(m)


def joined(clips: list[np.ndarray], gap_s: float = 0.2) -> np.ndarray:
    gap = np.zeros(int(gap_s * 16000), np.float32)
    parts = []
    for c in clips:
        parts += [c / (np.abs(c).max() + 1e-9) * 0.5, gap]
    return np.concatenate(parts[:-1]).astype(np.float32)[: 10 * 16000]


def drawn_apart(embedder, bank: dict[str, list[Path]], seed: int) -> None:
    from captionbus.services.diarization import models

    rng = np.random.default_rng(seed)
    refs: dict[str, list[np.ndarray]] = {}
    clusters: dict[str, list[np.ndarray]] = {}
    for speaker, paths in bank.items():
        order = [np.load(paths[i]) for i in rng.permutation(len(paths))[:120]]
        refs[speaker] = [models.reference_vector(embedder, joined(order[k: k + n]))
                         for n, start in ((1, 0), (2, 3), (3, 9)) for k in range(start, start + 3 * n, n)]
        rest = order[18:]
        clusters[speaker] = ([centroid(clip_windows(embedder, rest[k: k + 3])) for k in range(0, 9, 3)]
                             + [centroid(clip_windows(embedder, rest[9:24]))])
        print(f"  ({speaker}: {len(refs[speaker])} references, {len(clusters[speaker])} clusters)", flush=True)
    same, other, pairs = [], [], {}
    by_shape: dict[tuple[int, int, bool], list[float]] = {}
    ref_lines = [1, 1, 1, 2, 2, 2, 3, 3, 3]
    cluster_lines = [3, 3, 3, 15]
    for a, ref_list in refs.items():
        for b, cents in clusters.items():
            sims = [float(r @ c) for r in ref_list for c in cents]
            (same if a == b else other).extend(sims)
            if a != b:
                pairs[(a, b)] = max(sims)
            for i, r in enumerate(ref_list):
                for j, c in enumerate(cents):
                    by_shape.setdefault((ref_lines[i], cluster_lines[j], a == b), []).append(float(r @ c))
    hardest = max(pairs, key=pairs.get)
    print(f"  clips drawn apart  same voice:    {stats(same)}")
    print(f"  clips drawn apart  another voice: {stats(other)}  (hardest: ref {hardest[0]} vs "
          f"cluster {hardest[1]}, max {pairs[hardest]:.3f})")
    for (lines, size, alike), values in sorted(by_shape.items()):
        print(f"    reference of {lines} line(s) vs a {size:2d}-line cluster, {'same' if alike else 'other'} voice: "
              f"{stats(values)}")


def real_clusters(embedder, name: str, media: Path, bank: dict[str, list[Path]], settings) -> None:
    from benchmarks.diarization import MEDIA, make_media
    from captionbus.services.audio import read_wav
    from captionbus.services.diarization import core, models

    wav = make_media(name, media)
    truth = [line.split() for line in wav.with_suffix(".rttm").read_text().splitlines()]
    turns = [(float(t[3]), float(t[3]) + float(t[4]), t[7]) for t in truth]
    samples = read_wav(wav)
    windows = models.embed_regions(embedder, samples, [(a, b) for a, b, _ in turns])
    labels = core.cluster(windows, core.SpeakerCount(), settings)
    cents = core.centroids(windows, labels)
    owner = {}
    for k in range(len(cents)):
        mids = (windows.starts[labels == k] + windows.ends[labels == k]) / 2
        who = [s for m in mids for a, b, s in turns if a <= m <= b]
        owner[k] = max(set(who), key=who.count) if who else "?"
    # references from lines the dialogue does not use: it pops from the end of each speaker's
    # seeded permutation (speakers_media.dialogue), so the front of the permutation is unused
    seed = MEDIA[name][0]
    rng = np.random.default_rng(seed)
    order = {s: list(rng.permutation(len(c))) for s, c in bank.items()}
    same, other = [], []
    for speaker in bank:
        for k in range(0, 8, 2):
            ref = models.reference_vector(embedder, joined([np.load(bank[speaker][i]) for i in order[speaker][k: k + 2]]))
            for c, who in owner.items():
                (same if who == speaker else other).append(float(ref @ cents[c]))
    print(f"  {name} clusters ({len(cents)} found, actors {sorted(owner.values())}):")
    print(f"    same voice:    {stats(same)}")
    print(f"    another voice: {stats(other)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedders", nargs="+", default=["campplus", "dvector", "resemblyzer"])
    parser.add_argument("--media", nargs="*", default=["short", "dev"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/captionbus-diarization-bench"))
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    in_env()
    from captionbus.core import settings as settings_mod
    from captionbus.services.diarization import core, models
    from tests import speakers_media as sm

    bank = sm.voice_bank()
    args.work.mkdir(parents=True, exist_ok=True)
    models_dir = settings_mod.load().models_dir
    print(f"# load average {os.getloadavg()[0]:.1f}")
    for name in args.embedders:
        embedder = models.load_embedder(name, models_dir, threads=args.threads)
        print(f"{name}:")
        drawn_apart(embedder, bank, args.seed)
        for media in args.media:
            real_clusters(embedder, media, args.work, bank, core.AUTO_SETTINGS[name])
        sys.stdout.flush()


if __name__ == "__main__":
    main()
