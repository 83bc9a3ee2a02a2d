"""The inverted list of each vector a SignIVF or FastScanIVF build adds: chosen in two
steps where that is as good as the exact choice.

Assigning each of a build's vectors its nearest of 4,096 float centroids is one 4,096 x 512
product a vector: at 10,000,000 registrations the largest share of a live rebuild on its one
core (38 s a million here, so ~380 s). A build instead projects the vectors and centroids to
their first PROJECTED principal directions (a PCA of the training sample), takes the
centroids scoring highest there, and of those keeps the one nearest in full
(faiss.fvec_inner_products_by_idx): about a third of the work.

How many candidates it takes to hold the nearest centroid depends on the gallery: a few
strong directions (as face embeddings have) put it among the first 8 nearly always, an
isotropic gallery has nothing for a projection to keep. So the assignment is fitted: on
CHECKED training vectors it takes the fewest candidates whose choice is the exact one for at
least MIN_AGREEMENT of them, and where no count does, the build assigns exactly. A vector
whose nearest centroid is missed goes to a list nearly as near, which the nprobe lists a
search scans hold as well; the build's calibration measures recall on the lists as filled.

Vectors added one by one while serving always go to their exact nearest centroid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from dedup.core.vectors import Matrix

log = logging.getLogger("dedup.gallery")

PROJECTED = 128
CANDIDATE_COUNTS = (8, 16, 32, 64)
MIN_AGREEMENT = 0.99
CHECKED = 10_000
PCA_SAMPLE = 50_000


@dataclass(frozen=True)
class ProjectedAssignment:
    """Nearest-centroid lists by a projected pre-selection and an exact choice among it."""

    centroids: npt.NDArray[np.float32]
    pca: faiss.PCAMatrix
    projected: faiss.IndexFlatIP
    candidates: int
    agreement: float  # the share of CHECKED training vectors given their exact nearest

    def lists_of(self, vectors: Matrix) -> npt.NDArray[np.int64]:
        """A column: each vector's list."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        candidates = self.shortlist(vectors, self.candidates)
        return best_of(self.centroids, vectors, candidates).reshape(-1, 1)

    def as_quantizer(self) -> Any:
        """The same two steps as a FAISS index whose assign() gives each vector its list,
        for an IVF that chooses lists itself (FastScanIVF)."""
        exact = faiss.IndexFlatIP(self.centroids.shape[1])
        exact.add(self.centroids)
        # faiss's constructors keep their arguments alive (add_ref_in_constructor).
        refined = faiss.IndexRefine(faiss.IndexPreTransform(self.pca, self.projected), exact)
        refined.k_factor = self.candidates
        return refined

    def shortlist(self, vectors: Matrix, count: int) -> npt.NDArray[np.int64]:
        """The `count` centroids scoring highest in projection, best first."""
        found: npt.NDArray[np.int64] = self.projected.search(self.pca.apply(vectors), count)[1]
        return found


def fitted(centroids: Matrix, sample: Matrix) -> ProjectedAssignment | None:
    """The cheapest projected assignment as good as the exact one on `sample`, or None."""
    centroids = np.ascontiguousarray(centroids, np.float32)
    dimension, nlist = centroids.shape[1], len(centroids)
    pca = faiss.PCAMatrix(dimension, min(PROJECTED, dimension))
    pca.train(np.ascontiguousarray(sample[:PCA_SAMPLE], np.float32))
    projected = faiss.IndexFlatIP(pca.d_out)
    projected.add(pca.apply(centroids))
    counts = [count for count in CANDIDATE_COUNTS if count < nlist // 4]
    checked = np.ascontiguousarray(sample[-CHECKED:], np.float32)
    if not counts or len(checked) == 0:
        return None
    trial = ProjectedAssignment(centroids, pca, projected, counts[-1], 0.0)
    exact = exact_nearest(centroids, checked)
    widest = trial.shortlist(checked, counts[-1])
    for count in counts:
        agreement = float(np.mean(best_of(centroids, checked, widest[:, :count]) == exact))
        if agreement >= MIN_AGREEMENT:
            log.info("a build's %d lists: the best of %d projected candidates (the nearest "
                     "for %.4f of %d training vectors)", nlist, count, agreement, len(checked))
            return ProjectedAssignment(centroids, pca, projected, count, agreement)
    log.info("a build's %d lists: exact (%d projected candidates held the nearest for only "
             "%.4f of %d training vectors)", nlist, counts[-1], agreement, len(checked))
    return None


def best_of(centroids: npt.NDArray[np.float32], vectors: npt.NDArray[np.float32],
            candidates: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """For each vector, the one of its candidate centroids with the highest inner product."""
    candidates = np.ascontiguousarray(candidates, np.int64)
    scores = np.empty(candidates.shape, np.float32)
    faiss.fvec_inner_products_by_idx(  # type: ignore[attr-defined]  # not in faiss's stubs
        faiss.swig_ptr(scores), faiss.swig_ptr(vectors), faiss.swig_ptr(centroids),
        faiss.swig_ptr(candidates), vectors.shape[1], len(vectors), candidates.shape[1])
    return np.ascontiguousarray(candidates[np.arange(len(vectors)), scores.argmax(axis=1)])


def exact_nearest(centroids: npt.NDArray[np.float32], vectors: npt.NDArray[np.float32]
                  ) -> npt.NDArray[np.int64]:
    flat = faiss.IndexFlatIP(centroids.shape[1])
    flat.add(centroids)
    nearest: npt.NDArray[np.int64] = flat.search(vectors, 1)[1][:, 0]
    return nearest
