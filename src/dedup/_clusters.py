"""Cluster finding: every group of registrations that share one face across ID numbers.

The gallery is walked in key order, a block of stored embeddings at a time; each block is one
FAISS search for every embedding's neighbours at or above the score, and each pair found is
joined in a union-find. Scores are symmetric, so a group is complete once its highest key has
been searched: every neighbour of each member was then seen. Complete groups are yielded at
once, while the walk goes on.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from ._backend import Backend
from ._gallery import Gallery
from ._models import Registration
from ._vectors import Matrix

BLOCK = 1024
_FIRST_K = 32


@dataclass(frozen=True)
class Cluster:
    registrations: list[Registration]
    id_numbers: list[str]
    min_link_score: float


@dataclass(frozen=True)
class Progress:
    searched: int
    total: int
    clusters: int


class _UnionFind:
    """Groups of keys, each with its members, highest key and weakest joining score."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}  # by root
        self.highest: dict[int, int] = {}  # by root
        self.weakest: dict[int, float] = {}  # by root

    def root(self, key: int) -> int:
        if key not in self.parent:
            self.parent[key], self.members[key], self.highest[key] = key, [key], key
            self.weakest[key] = 1.0
            return key
        top = key
        while self.parent[top] != top:
            top = self.parent[top]
        while self.parent[key] != top:  # path compression
            self.parent[key], key = top, self.parent[key]
        return top

    def join(self, a: int, b: int, score: float) -> int:
        root_a, root_b = self.root(a), self.root(b)
        if root_a != root_b:
            if len(self.members[root_a]) < len(self.members[root_b]):
                root_a, root_b = root_b, root_a
            self.parent[root_b] = root_a
            self.members[root_a].extend(self.members.pop(root_b))
            self.highest[root_a] = max(self.highest[root_a], self.highest.pop(root_b))
            self.weakest[root_a] = min(self.weakest[root_a], self.weakest.pop(root_b))
        self.weakest[root_a] = min(self.weakest[root_a], score)
        return root_a

    def remove(self, root: int) -> tuple[list[int], float]:
        members = self.members.pop(root)
        for key in members:
            del self.parent[key]
        del self.highest[root]
        return members, self.weakest.pop(root)


def find_clusters(gallery: Backend, min_score: float, min_distinct_id_numbers: int
                  ) -> Iterator[Cluster | Progress]:
    """With an exact live index (or Milvus, whose candidates are re-scored exactly) the
    backend's neighbour search is used; with an approximate embedded index, a job-local IVF
    proposes candidates that exact scores then confirm."""
    search: Callable[[Matrix], list[list[tuple[int, float]]]]
    if isinstance(gallery, Gallery) and not gallery.index.exact:
        search = _IVFCandidates(gallery, min_score).neighbours
    else:
        search = lambda matrix: _neighbours(gallery, matrix, min_score)  # noqa: E731
    groups = _UnionFind()
    pending: list[tuple[int, int]] = []  # (highest key, root), checked lazily
    total = gallery.comparable_count()
    searched = emitted = 0
    for keys, matrix in gallery.iter_vectors(BLOCK):
        for key, neighbours in zip(keys, search(matrix), strict=True):
            for other, score in neighbours:
                if other != key:
                    root = groups.join(key, other, score)
                    heapq.heappush(pending, (groups.highest[root], root))
        searched += len(keys)
        for cluster in _complete(gallery, groups, pending, keys[-1], min_distinct_id_numbers):
            emitted += 1
            yield cluster
        yield Progress(searched, total, emitted)
    for cluster in _complete(gallery, groups, pending, None, min_distinct_id_numbers):
        emitted += 1
        yield cluster
    yield Progress(searched, total, emitted)


def _neighbours(gallery: Backend, matrix: Matrix, min_score: float
                ) -> list[list[tuple[int, float]]]:
    """Every neighbour >= min_score: k widens for the rare query whose k-th is still above."""
    k = _FIRST_K
    rows = gallery.neighbours_of_many(matrix, k, min_score)
    for i, row in enumerate(rows):
        wider = k
        while len(row) >= wider and wider < 10_000:
            wider *= 4
            row = gallery.neighbours_of_many(matrix[i:i + 1], wider, min_score)[0]
        rows[i] = row
    return rows


class _IVFCandidates:
    """Candidates from a job-local IVF index (k-means lists, 8-bit scalar codes) over the
    whole gallery, confirmed by exact cosine from the stored vectors.

    The serving index may be BinarySign (no good for all-pairs search) or an IVF with the
    serving nprobe; this one is built for the job and dropped after it. Candidates whose
    approximate score is within MARGIN of min_score are scored exactly.
    """

    NPROBE = 64
    K = 32
    MARGIN = 0.05  # SQ8's score error is about 0.01
    TRAIN_PER_LIST = 32

    def __init__(self, gallery: Gallery, min_score: float) -> None:
        self.gallery = gallery
        self.min_score = min_score
        total = max(1, gallery.store.model_counts().get(gallery.model_id, 0))
        nlist = max(1, min(4096, int(4 * math.sqrt(total))))
        dimension = gallery.config.dimension
        self.quantizer = faiss.IndexFlatIP(dimension)  # the IVF index does not own it
        self.index = faiss.IndexIVFScalarQuantizer(
            self.quantizer, dimension, nlist, faiss.ScalarQuantizer.QT_8bit,
            faiss.METRIC_INNER_PRODUCT)
        self.index.cp.niter = 10  # k-means iterations: 10 place the lists well enough here
        self.index.train(self._sample(nlist * self.TRAIN_PER_LIST))
        for keys, matrix in gallery.store.iter_vectors(20_000, only_model=gallery.only_model()):
            self.index.add_with_ids(np.ascontiguousarray(matrix, np.float32),
                                    np.asarray(keys, np.int64))
        self.params = faiss.SearchParametersIVF()
        self.params.nprobe = min(self.NPROBE, nlist)

    def _sample(self, size: int) -> Matrix:
        with self.gallery.store.snapshot() as snapshot:
            return snapshot.sample(size, self.gallery.model_id, self.gallery.only_model())

    def neighbours(self, matrix: Matrix) -> list[list[tuple[int, float]]]:
        queries = np.ascontiguousarray(matrix, np.float32)
        approximate, ids = self.index.search(queries, self.K, params=self.params)
        rows: list[list[tuple[int, float]]] = []
        for query, near, found in zip(queries, approximate, ids, strict=True):
            candidates = found[(found >= 0) & (near >= self.min_score - self.MARGIN)]
            if not len(candidates):
                rows.append([])
                continue
            kept, vectors = self.gallery.store.vectors(candidates)
            scores = vectors @ query
            rows.append([(key, float(score)) for key, score in zip(kept, scores, strict=True)
                         if score >= self.min_score])
        return rows


def _complete(gallery: Backend, groups: _UnionFind, pending: list[tuple[int, int]],
              searched_through: int | None, min_ids: int) -> Iterator[Cluster]:
    """Pops the groups whose highest key was searched (all of them when `searched_through`
    is None) and yields those spanning enough ID numbers."""
    while pending and (searched_through is None or pending[0][0] <= searched_through):
        highest, root = heapq.heappop(pending)
        if root not in groups.members or groups.highest[root] != highest:
            continue  # stale: the group grew or was merged since
        members, weakest = groups.remove(root)
        cluster = _cluster(gallery, members, weakest, min_ids)
        if cluster is not None:
            yield cluster


def _cluster(gallery: Backend, keys: list[int], weakest: float, min_ids: int
             ) -> Cluster | None:
    registrations = [face.registration for face in gallery.faces(keys, with_vectors=False)]
    id_numbers = sorted({registration.id_number for registration in registrations})
    if len(id_numbers) < min_ids:
        return None
    registrations.sort(key=lambda registration: registration.registration_id)
    return Cluster(registrations, id_numbers, weakest)
