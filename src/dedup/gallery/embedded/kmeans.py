"""Spherical k-means for a partition's centroids, each iteration's assignment by
list_assignment's int8 products.

FAISS's k-means assigns the sample to the centroids by the float product every iteration,
which made the training the largest share of a live rebuild once the fill assigned by int8
products (99 of 142 s at 1,000,000 clustered, on the rebuild's one core). This is the same
Lloyd iteration as FAISS's (faiss/Clustering.cpp): centroids drawn from the sample, each
point to its exact nearest centroid, each centroid the normalised mean of its points, and an
empty centroid given half of a large one (FAISS's split_clusters); only the assignment is
cheaper, and it is exact.
"""

from __future__ import annotations

import faiss
import numpy as np
import numpy.typing as npt

from dedup.core.vectors import Matrix, normalize_rows
from dedup.gallery.embedded.list_assignment import int8_assignment

_SPLIT = 1.0 / 1024  # how far apart the two halves of a split centroid are moved


def spherical_kmeans(sample: Matrix, nlist: int, iterations: int, seed: int,
                     threads: int = 1) -> npt.NDArray[np.float32]:
    """`nlist` unit centroids of `sample` (at least `nlist` rows)."""
    sample = np.ascontiguousarray(sample, np.float32)
    rng = np.random.default_rng(seed)
    centroids = sample[rng.choice(len(sample), nlist, replace=False)].copy()
    for _ in range(iterations):
        lists = nearest(centroids, sample, threads)
        centroids = _means(sample, lists, nlist)
        _split_empty(centroids, np.bincount(lists, minlength=nlist), rng)
        centroids = normalize_rows(centroids)
    return centroids


def nearest(centroids: npt.NDArray[np.float32], vectors: npt.NDArray[np.float32],
            threads: int) -> npt.NDArray[np.int64]:
    assignment = int8_assignment(centroids, threads)
    if assignment is not None:
        return assignment.lists_of(vectors)
    exact = faiss.IndexFlatIP(centroids.shape[1])
    exact.add(centroids)
    lists: npt.NDArray[np.int64] = exact.search(vectors, 1)[1][:, 0]
    return lists


def _means(sample: npt.NDArray[np.float32], lists: npt.NDArray[np.int64], nlist: int
           ) -> npt.NDArray[np.float32]:
    """Each list's mean (zero for an empty one)."""
    order = np.argsort(lists, kind="stable")
    counts = np.bincount(lists, minlength=nlist)
    means = np.zeros((nlist, sample.shape[1]), np.float32)
    # a list at a time: numpy's reduceat over the sorted rows is several times slower
    for list_no, members in enumerate(np.split(order, np.cumsum(counts)[:-1])):
        if len(members):
            means[list_no] = sample[members].mean(axis=0)
    return means


def _split_empty(centroids: npt.NDArray[np.float32], counts: npt.NDArray[np.int64],
                 rng: np.random.Generator) -> None:
    """Each empty centroid takes half of a centroid chosen in proportion to its size, the
    two moved slightly apart (in place)."""
    points = int(counts.sum())
    if counts.max(initial=0) <= 1:
        return  # nothing to split (a sample hardly larger than nlist)
    for empty in np.flatnonzero(counts == 0).tolist():
        while True:  # as FAISS: a centroid with more points is likelier to be split
            donor = int(rng.integers(len(centroids)))
            if rng.random() * (points - len(centroids)) < counts[donor] - 1:
                break
        centroids[empty] = centroids[donor]
        sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
        centroids[empty] *= 1 + sign * _SPLIT
        centroids[donor] *= 1 - sign * _SPLIT
        counts[empty] = counts[donor] // 2
        counts[donor] -= counts[empty]
