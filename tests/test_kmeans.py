"""The partition's spherical k-means (kmeans.py) on real onnxruntime and FAISS: it finds
planted groups, is as good as FAISS's k-means on the same sample, and gives an empty
centroid half of a large one rather than a dead list."""

from __future__ import annotations

import faiss
import numpy as np

from dedup.core.vectors import normalize_rows
from dedup.gallery.embedded.kmeans import nearest, spherical_kmeans


def grouped(groups: int, per_group: int, spread: float, seed: int) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = normalize_rows(rng.standard_normal((groups, 512), dtype=np.float32))
    members = np.repeat(centres, per_group, axis=0)
    noise = rng.standard_normal(members.shape, dtype=np.float32) * spread
    return centres, normalize_rows(members + noise)


def mean_best_score(centroids: np.ndarray, vectors: np.ndarray) -> float:
    return float((vectors @ centroids.T).max(axis=1).mean())


def test_planted_groups_are_found():
    centres, sample = grouped(32, 200, 0.03, 1)
    centroids = spherical_kmeans(sample, 96, 10, seed=3)
    assert centroids.shape == (96, 512) and centroids.dtype == np.float32
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    # every planted centre has a centroid on it (three centroids a group: Lloyd's iteration
    # from drawn centroids can leave two groups one centroid when there are just as many)
    assert (centres @ centroids.T).max(axis=1).min() > 0.95


def test_as_good_as_faiss_kmeans_on_the_same_sample():
    _, sample = grouped(400, 40, 0.06, 2)
    ours = spherical_kmeans(sample, 256, 10, seed=5)
    theirs = faiss.Kmeans(512, 256, niter=10, spherical=True, seed=5)
    theirs.train(sample)
    assert mean_best_score(ours, sample) >= mean_best_score(theirs.centroids, sample) - 0.005


def test_an_empty_centroid_takes_half_of_a_large_one():
    # half the sample is one vector repeated: centroids drawn on it all but one end up empty
    _, spread = grouped(8, 100, 0.05, 4)
    same = np.repeat(spread[:1], 800, axis=0)
    sample = np.vstack([same, spread])
    centroids = spherical_kmeans(sample, 64, 5, seed=6)
    assert np.isfinite(centroids).all()
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    used = np.bincount(nearest(centroids, sample, 1), minlength=64)
    assert (used > 0).sum() >= 60, used  # split, not left empty
