"""A SignIVF build's cheaper choice of lists (list_assignment.py) on real FAISS: nearly always
the exact nearest centroid, never a list the exact scores rank below another candidate, and
an index filled so searches as one filled exactly; and the exact choice wherever the
projection would miss too often."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dedup import FaceGenerator
from dedup.core.errors import FailedPrecondition
from dedup.core.vectors import normalize_rows
from dedup.gallery.embedded.index import (
    FastScanIVFIndex,
    SearchOptions,
    SignIVFIndex,
    training_size,
)
from dedup.gallery.embedded.list_assignment import MIN_AGREEMENT, ProjectedAssignment, fitted

NLIST = 64
SIZE = 20_000


def uneven(count: int, seed: int) -> np.ndarray:
    """Vectors with a few strong directions, as face embeddings have."""
    rng = np.random.default_rng(seed)
    spectrum = (1.0 / np.sqrt(np.arange(1, 513))).astype(np.float32)
    return normalize_rows(rng.standard_normal((count, 512), dtype=np.float32) * spectrum)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return uneven(SIZE, 3)


@pytest.fixture(scope="module")
def trained(vectors) -> SignIVFIndex:
    index = SignIVFIndex(512, NLIST)
    index.train(vectors[: training_size(index.kind, 512)])
    return index


def centroids_of(index: SignIVFIndex) -> np.ndarray:
    return index._centroids.reconstruct_n(0, index.nlist)


def exact_lists(index: SignIVFIndex, vectors: np.ndarray) -> np.ndarray:
    return (vectors @ centroids_of(index).T).argmax(axis=1)


def projected(trained: SignIVFIndex, sample: np.ndarray) -> ProjectedAssignment:
    assignment = fitted(centroids_of(trained), sample)
    assert assignment is not None
    return assignment


def test_the_build_lists_are_the_exact_nearest_centroids_nearly_always(trained, vectors):
    assignment = projected(trained, vectors[:training_size(trained.kind, 512)])
    assert assignment.agreement >= MIN_AGREEMENT
    chosen = assignment.lists_of(vectors)
    assert chosen.shape == (SIZE, 1) and chosen.dtype == np.int64
    agreement = float(np.mean(chosen[:, 0] == exact_lists(trained, vectors)))
    assert agreement >= MIN_AGREEMENT - 0.01, agreement


def test_a_centroid_is_assigned_its_own_list(trained, vectors):
    assignment = projected(trained, vectors[:training_size(trained.kind, 512)])
    assert assignment.lists_of(centroids_of(trained))[:, 0].tolist() == list(range(NLIST))


def test_a_gallery_the_projection_misses_is_assigned_exactly(trained):
    isotropic = FaceGenerator(11).persons(12_000)
    assert fitted(centroids_of(trained), isotropic) is None


def test_a_missed_nearest_centroid_gives_way_only_to_a_projected_candidate(trained, vectors):
    # isotropic vectors: the projection keeps little of them, so some nearest centroids are
    # missed; the list chosen instead is the best in full of the candidates projected
    fit = projected(trained, vectors[:training_size(trained.kind, 512)])
    vectors = FaceGenerator(11).persons(4000)
    centroids = centroids_of(trained)
    assignment = ProjectedAssignment(centroids, fit.pca, fit.projected, 8, 0.0)
    chosen = assignment.lists_of(vectors)[:, 0]
    scores = vectors @ centroids.T
    shortlists = assignment.shortlist(vectors, 8)
    assert np.sum(chosen != scores.argmax(axis=1)) >= 20  # the case under test occurs
    for row in range(len(vectors)):
        assert chosen[row] in shortlists[row]
        best_candidate = shortlists[row][np.argmax(scores[row, shortlists[row]])]
        assert scores[row, chosen[row]] == pytest.approx(scores[row, best_candidate])


PARTITIONED = [SignIVFIndex, FastScanIVFIndex]


@pytest.mark.parametrize("kind", PARTITIONED, ids=lambda kind: kind.__name__)
def test_an_index_filled_so_searches_as_one_filled_exactly(vectors, kind):
    ids = np.arange(SIZE, dtype=np.int64) * 7 + 1
    filled, added = kind(512, NLIST), kind(512, NLIST)
    for index in (filled, added):
        index.train(vectors[: training_size(index.kind, 512)])
    filled.fill(ids, vectors)
    added.add(ids, vectors)
    queries = normalize_rows(vectors[:300] + 0.5 * uneven(300, 9))
    every_list = SearchOptions(nprobe=NLIST)
    for (_, filled_scores), (_, added_scores) in zip(
            filled.search(queries, 10, every_list), added.search(queries, 10, every_list),
            strict=True):
        assert filled_scores.tolist() == added_scores.tolist()
    own = filled.search(vectors[:300], 1, SearchOptions(nprobe=4))
    assert [found.tolist() for found, _ in own] == [[i] for i in ids[:300]]


def test_a_fast_scan_build_fills_the_lists_the_two_steps_choose(vectors):
    """FastScanIVF's fill lets FAISS assign lists through list_assignment's two steps, made
    a FAISS index (ProjectedAssignment.as_quantizer); the exact centroids come back after."""
    index = FastScanIVFIndex(512, NLIST)
    sample = vectors[: training_size(index.kind, 512)]
    index.train(sample)
    # One projected candidate, so that the two steps' lists differ from the exact ones.
    assignment = dataclasses.replace(projected(index, sample), candidates=1)
    index._fill_quantizer = assignment.as_quantizer()
    index.fill(np.arange(SIZE, dtype=np.int64), vectors)
    sizes = [index._index.invlists.list_size(i) for i in range(NLIST)]
    assert sizes == np.bincount(assignment.lists_of(vectors)[:, 0], minlength=NLIST).tolist()
    assert sizes != np.bincount(exact_lists(index, vectors), minlength=NLIST).tolist()
    assert index._index.quantizer.this == index._centroids.this
    index.add(np.array([SIZE], np.int64), vectors[:1])  # exactly: the centroids' choice
    assert index._index.invlists.list_size(int(exact_lists(index, vectors[:1])[0])) == \
        sizes[int(exact_lists(index, vectors[:1])[0])] + 1


@pytest.mark.parametrize("kind", PARTITIONED, ids=lambda kind: kind.__name__)
def test_fill_needs_the_centroids_of_train(vectors, kind):
    index = kind(512, NLIST)
    with pytest.raises(FailedPrecondition, match="fill follows train"):
        index.fill(np.arange(3, dtype=np.int64), vectors[:3])
