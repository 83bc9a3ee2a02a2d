"""FindClusters' candidates on an approximate index: a job-local scan of 512-bit sign codes.

Each row is searched only against the registrations with higher keys (every pair is still
seen once, from its lower key, which is all the cluster walk needs: see SignCodeCandidates),
so the all-pairs scan costs half of N² code comparisons. Sign codes keep no cluster
assumption: two unit vectors at cosine c differ in about 512 acos(c) / pi bits (189 at 0.40,
171 at 0.50), strangers in 256 ± 11.3. So the 64 nearest codes hold a pair well above the
job's score, but not always one just above it: by that binomial model a pair at exactly 0.40
falls outside its lower key's 64 nearest among 1,000,000 codes 1.3% of the time (0.11% at
0.45, 0.004% at 0.50; 4.7% at 0.40 among 10,000,000), and a job at the review threshold 0.30
misses about a quarter of such pairs. benchmarks/clusters.py at 1,000,000 registrations
(planted links at 0.5-0.8): every planted cluster in 1,054-1,188 s on two threads, and in
478 s on a machine whose AVX-512 VPOPCNTDQ FAISS uses for Hamming distances. A
job-local IVF (k-means lists, nprobe 64 of 4,003) proposing the candidates before found
0.918 of them in 1,526 s: on isotropic data many links lie outside the probed lists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import faiss
import numpy as np
import numpy.typing as npt

from dedup.core.vectors import Matrix
from dedup.gallery.base import Neighbours, widened
from dedup.gallery.embedded.index import BinarySignIndex
from dedup.gallery.embedded.store import Store


class SignCodeCandidates:
    """For each row, every registration with a higher key scoring >= min_score (and maybe
    some with lower keys): candidates by Hamming distance of 512-bit sign codes over the
    whole gallery, confirmed by exact cosine from the stored vectors.

    The codes are taken once, when the job starts; registrations enrolled later are not
    candidates (the walk over the gallery still searches them as rows).
    """

    K = 64  # candidates a row; widened while they all score >= min_score
    MAX_K = 16_384
    BLOCK = 20_000

    def __init__(self, store: Store, only_model: str | None, min_score: float,
                 threads: int = 0) -> None:
        self.store, self.min_score = store, min_score
        self.threads = threads or _usable_cores()
        self.encoder = BinarySignIndex(store.config.dimension, 512)
        keys: list[npt.NDArray[np.int64]] = []
        codes: list[npt.NDArray[np.uint8]] = []
        for block_keys, matrix in store.iter_vectors(self.BLOCK, only_model=only_model):
            keys.append(np.asarray(block_keys, np.int64))
            codes.append(self.encoder.encode(matrix))
        self.keys = np.concatenate(keys) if keys else np.empty(0, np.int64)
        self.codes = np.ascontiguousarray(np.vstack(codes)) if codes else np.empty(
            (0, 64), np.uint8)

    def neighbours(self, keys: Sequence[int], matrix: Matrix) -> list[Neighbours]:
        """Rows in key order, as the cluster walk passes them."""
        if not len(keys):
            return []
        queries = np.ascontiguousarray(matrix, np.float32)
        first = int(np.searchsorted(self.keys, min(keys), side="right"))
        codes = self._codes_of(np.asarray(keys, np.int64), queries)
        rows = self._confirmed(codes, queries, first, self.K)
        return widened(rows, lambda i, k: self._confirmed(codes[i:i + 1], queries[i:i + 1],
                                                          first, k)[0],
                       self.K, min(self.MAX_K, len(self.keys) - first))

    def _codes_of(self, keys: npt.NDArray[np.int64], queries: Matrix
                  ) -> npt.NDArray[np.uint8]:
        """The rows' codes: taken at the job's start, encoded here only for registrations
        enrolled since."""
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        if len(self.keys) and (self.keys[at] == keys).all():
            return self.codes[at]
        return self.encoder.encode(queries)

    def _knn(self, codes: npt.NDArray[np.uint8], tail: npt.NDArray[np.uint8], k: int
             ) -> npt.NDArray[np.int64]:
        # OpenMP's thread count belongs to the calling thread, a server worker that serves
        # other calls afterwards: set for the scan, then put back.
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.threads)
        try:
            _, positions = faiss.knn_hamming(codes, tail, k)
            return positions
        finally:
            faiss.omp_set_num_threads(previous)

    def _confirmed(self, codes: npt.NDArray[np.uint8], queries: Matrix, first: int, k: int
                   ) -> list[Neighbours]:
        """The top-k candidates among the codes from position `first` on, scored exactly;
        those at or above min_score, best first."""
        tail = self.codes[first:]
        if not len(tail):
            return [[] for _ in queries]
        positions = self._knn(codes, tail, min(k, len(tail)))
        found = positions >= 0
        keys = np.where(found, self.keys[first + np.where(found, positions, 0)], -1)
        scores = self._scores(keys, found, queries)
        rows: list[Neighbours] = []
        for row_keys, row_scores in zip(keys, scores, strict=True):
            passing = np.nonzero(row_scores >= self.min_score)[0]
            best_first = passing[np.argsort(-row_scores[passing], kind="stable")]
            rows.append([(int(row_keys[j]), float(row_scores[j])) for j in best_first])
        return rows

    def _scores(self, keys: npt.NDArray[np.int64], found: npt.NDArray[np.bool_],
                queries: Matrix) -> npt.NDArray[np.float32]:
        """Exact scores of each query's candidates, -inf where a candidate is gone: one
        gather from the vector file for the whole block, in the candidates' own layout."""
        vectors, stored = self.store.vectors_in_place(np.where(found, keys, -1))
        exact = np.einsum("nkd,nd->nk", vectors, queries)
        return np.where(stored, exact, -np.inf).astype(np.float32, copy=False)


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1
