"""FindClusters' candidates on an approximate index: a job-local IVF over the whole gallery."""

from __future__ import annotations

import math

import faiss
import numpy as np

from dedup.core.vectors import Matrix
from dedup.gallery.embedded.store import Store


class IVFCandidates:
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

    def __init__(self, store: Store, model_id: str, only_model: str | None, min_score: float
                 ) -> None:
        self.store, self.model_id, self.only_model = store, model_id, only_model
        self.min_score = min_score
        total = max(1, store.model_counts().get(model_id, 0))
        nlist = max(1, min(4096, int(4 * math.sqrt(total))))
        dimension = store.config.dimension
        self.quantizer = faiss.IndexFlatIP(dimension)  # the IVF index does not own it
        self.index = faiss.IndexIVFScalarQuantizer(
            self.quantizer, dimension, nlist, faiss.ScalarQuantizer.QT_8bit,
            faiss.METRIC_INNER_PRODUCT)
        self.index.cp.niter = 10  # k-means iterations: 10 place the lists well enough here
        self.index.train(self._sample(nlist * self.TRAIN_PER_LIST))
        for keys, matrix in store.iter_vectors(20_000, only_model=only_model):
            self.index.add_with_ids(np.ascontiguousarray(matrix, np.float32),
                                    np.asarray(keys, np.int64))
        self.params = faiss.SearchParametersIVF()
        self.params.nprobe = min(self.NPROBE, nlist)

    def _sample(self, size: int) -> Matrix:
        with self.store.snapshot() as snapshot:
            return snapshot.sample(size, self.model_id, self.only_model)

    def neighbours(self, matrix: Matrix) -> list[list[tuple[int, float]]]:
        queries = np.ascontiguousarray(matrix, np.float32)
        approximate, ids = self.index.search(queries, self.K, params=self.params)
        rows: list[list[tuple[int, float]]] = []
        for query, near, found in zip(queries, approximate, ids, strict=True):
            candidates = found[(found >= 0) & (near >= self.min_score - self.MARGIN)]
            if not len(candidates):
                rows.append([])
                continue
            kept, vectors = self.store.vectors(candidates)
            scores = vectors @ query
            rows.append([(key, float(score)) for key, score in zip(kept, scores, strict=True)
                         if score >= self.min_score])
        return rows
