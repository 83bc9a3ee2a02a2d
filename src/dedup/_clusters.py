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
import numpy.typing as npt

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


def find_clusters(gallery: Gallery, min_score: float, min_distinct_id_numbers: int
                  ) -> Iterator[Cluster | Progress]:
    """With an exact live index its neighbour search is used; with an approximate one, a
    job-local IVF over sign codes proposes candidates that exact scores then confirm."""
    search: Callable[[Matrix], list[list[tuple[int, float]]]]
    if gallery.index.exact:
        search = lambda matrix: _neighbours(gallery, matrix, min_score)  # noqa: E731
    else:
        search = _SignCandidates(gallery, min_score).neighbours
    groups = _UnionFind()
    pending: list[tuple[int, int]] = []  # (highest key, root), checked lazily
    total = gallery.store.model_counts().get(gallery.model_id, 0)
    searched = emitted = 0
    for keys, matrix in gallery.store.iter_vectors(BLOCK, only_model=gallery.only_model()):
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


def _neighbours(gallery: Gallery, matrix: Matrix, min_score: float
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


class _SignCandidates:
    """Candidates by Hamming distance between sign codes (512 random hyperplanes), from an
    IVF over the codes, then exact cosine from the stored vectors.

    Two unit vectors at cosine s differ in about 512 * arccos(s) / pi of the bits (189 at
    0.40; unrelated faces: 256 +- 11). A candidate is scored exactly if it lies within that
    many bits plus 4 standard deviations.
    """

    BITS = 512
    NPROBE = 32
    K = 32

    def __init__(self, gallery: Gallery, min_score: float) -> None:
        self.gallery = gallery
        self.min_score = min_score
        dimension = gallery.config.dimension
        self.rotation = faiss.RandomRotationMatrix(dimension, self.BITS)
        self.rotation.init(1234)
        keys, codes = self._all_codes()
        nlist = max(1, min(4096, int(4 * math.sqrt(max(1, len(keys))))))
        self.index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(self.BITS), self.BITS, nlist)
        self.index.nprobe = min(self.NPROBE, nlist)  # a job-local index: safe to set here
        sample = codes[np.linspace(0, len(codes) - 1, min(len(codes), 64 * nlist)).astype(int)]
        self.index.train(sample)
        self.index.add_with_ids(codes, keys)
        p = math.acos(max(-1.0, min(1.0, min_score))) / math.pi
        self.max_bits = self.BITS * p + 4 * math.sqrt(self.BITS * p * (1 - p))

    def _codes(self, matrix: Matrix) -> npt.NDArray[np.uint8]:
        projected = self.rotation.apply(np.ascontiguousarray(matrix, np.float32))
        return np.packbits(projected > 0, axis=1)

    def _all_codes(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        keys, codes = [], []
        for block_keys, matrix in self.gallery.store.iter_vectors(
                20_000, only_model=self.gallery.only_model()):
            keys.append(np.asarray(block_keys, np.int64))
            codes.append(self._codes(matrix))
        if not keys:
            return np.empty(0, np.int64), np.empty((0, self.BITS // 8), np.uint8)
        return np.concatenate(keys), np.vstack(codes)

    def neighbours(self, matrix: Matrix) -> list[list[tuple[int, float]]]:
        distances, ids = self.index.search(self._codes(matrix), self.K)
        rows: list[list[tuple[int, float]]] = []
        for query, near, found in zip(matrix, distances, ids, strict=True):
            candidates = found[(found >= 0) & (near <= self.max_bits)]
            if not len(candidates):
                rows.append([])
                continue
            kept, vectors = self.gallery.store.vectors(candidates)
            scores = vectors @ query
            rows.append([(key, float(score)) for key, score in zip(kept, scores, strict=True)
                         if score >= self.min_score])
        return rows


def _complete(gallery: Gallery, groups: _UnionFind, pending: list[tuple[int, int]],
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


def _cluster(gallery: Gallery, keys: list[int], weakest: float, min_ids: int
             ) -> Cluster | None:
    registrations = [face.registration for face in gallery.store.faces(keys, with_vectors=False)]
    id_numbers = sorted({registration.id_number for registration in registrations})
    if len(id_numbers) < min_ids:
        return None
    registrations.sort(key=lambda registration: registration.registration_id)
    return Cluster(registrations, id_numbers, weakest)
