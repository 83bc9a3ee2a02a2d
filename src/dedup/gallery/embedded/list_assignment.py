"""The inverted list of each vector a SignIVF or FastScanIVF build adds (its exact nearest
centroid, for a fraction of the float product's cost), and the lists a search scans.

Assigning each of a build's vectors its nearest of 4,096 float centroids is one 4,096 x 512
product a vector: at 10,000,000 registrations the largest share of a live rebuild on its one
core (26-38 s a million here). A build instead takes the products in 8-bit integers
(onnxruntime's MatMulInteger, whose kernels use the int8 matrix units of CPUs that have them:
7x the float product's throughput on this machine's AMX), bounds how far each integer score
can be from the float one, and scores again in float32 only the centroids within twice that
bound of the best. The nearest centroid is always among them, so the choice is the exact one
(two centroids within float32 rounding of each other aside), on any gallery.

Before an assignment is used, its integer products are compared with numpy's exact ones on
extreme inputs: a CPU kernel that saturates (onnxruntime warns of some without VNNI) makes the
build assign by the float product instead. So does a gallery whose rows leave so many
centroids close in integers that the float re-score costs more than the float product saves
(`paying_rescores`, measured on the build's first batch).

Vectors added one by one while serving always go to their exact nearest centroid (the index's
own IndexFlatIP).

A search's nprobe lists are chosen from the same integer scores (`probed_lists`), unchecked:
there the lists near the nprobe-th may differ from the float choice's, which matters little.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from onnx import TensorProto, helper

from dedup.core.vectors import Matrix

log = logging.getLogger("dedup.gallery")

# Integer scores a product makes (4 MB, up to 65,536 lists): they stay in cache through the
# passes over them.
# At 4,096 lists that is 256 rows, 13.3 s a million against 21.8 with 2,048 rows (100,000
# rows of the 10,000,000 clustered gallery and its own centroids).
_BLOCK_SCORES = 1 << 20
# The fewest and the most rows a product. Over 1,024 rows the float temporaries of a row's
# codes leave the cache: at 256 lists 13.3 s a million with 4,096 rows, 10.1 with 1,024.
_BLOCK_ROWS = (16, 1024)
_LEVELS = 127  # |an int8 code| at most
_ZERO = 128  # a vector's codes are sent as uint8 with this zero point
# (row, centroid) pairs scored in float32 at a time: the gathered vectors and centroids (4 MB)
# stay in cache, however many centroids the integer scores leave close (a zero row: all;
# the pairs' row and column numbers, 16 bytes a pair, are not chunked).
# 61.4 s a million against 120.9 with 16,384 pairs where every row has ~89 (20,000 uneven
# rows, 4,096 centroids drawn from the same data); the same within 3% where rows have few.
_CANDIDATES = 1024


@dataclass(frozen=True)
class Int8Assignment:
    """Nearest-centroid lists by int8 products, checked in float32 where they are close."""

    centroids: npt.NDArray[np.float32]  # (nlist, dimension)
    scale: float  # a centroid's int8 codes are its values times this
    error: float  # the largest |centroid - its dequantised codes|
    norm: float  # the largest |centroid|
    session: Any  # onnxruntime: uint8 vectors x int8 centroids -> int32

    def lists_of(self, vectors: Matrix) -> npt.NDArray[np.int64]:
        """Each vector's nearest centroid (a row of `vectors` each)."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        lists = np.empty(len(vectors), np.int64)
        block = rows_per_product(len(self.centroids))
        for start in range(0, len(vectors), block):
            lists[start:start + block] = self._nearest(vectors[start:start + block], start)
        return lists

    def probed_lists(self, vectors: Matrix, nprobe: int) -> npt.NDArray[np.int64]:
        """For each row of `vectors`, the `nprobe` lists (every list, if fewer) whose
        centroids have its highest integer scores, the highest first (as FAISS's float
        choice orders them: a scan keeps the candidate it met first among equal distances):
        the lists a search scans.

        Not checked in float32, unlike lists_of: the bound that makes a nearest centroid
        sure leaves most centroids unsure at a search's nprobe, and which lists near the
        nprobe-th a search scans matters little (at 609 of 4,096 lists, 0.991 of the float
        choice's lists, at worst 0.982, for 500 probes of 1,000,000 clustered). A search's
        nprobe is calibrated with this choice (calibration.py searches the index)."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        nlist = len(self.centroids)
        wanted = min(nprobe, nlist)
        lists = np.empty((len(vectors), wanted), np.int64)
        block = rows_per_product(nlist)
        for start in range(0, len(vectors), block):
            codes, _ = self._codes(vectors[start:start + block], start)
            scores = self.session.run(None, {"vectors": codes})[0]
            top = np.argpartition(scores, nlist - wanted, axis=1)[:, nlist - wanted:]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
            lists[start:start + block] = np.take_along_axis(top, order, axis=1)
        return lists

    def rescored_a_row(self, vectors: Matrix) -> float:
        """How many centroids a row of `vectors` leaves to score again in float32, on
        average (a row whose integer scores are sure: none)."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        if not len(vectors):
            return 0.0
        rescored, block = 0, rows_per_product(len(self.centroids))
        for start in range(0, len(vectors), block):
            scores, slack = self._integer_scores(vectors[start:start + block], start)
            close = (scores >= (scores.max(axis=1) - slack)[:, None]).sum(axis=1)
            rescored += int(close[close > 1].sum())
        return rescored / len(vectors)

    def _nearest(self, vectors: npt.NDArray[np.float32], first_row: int
                 ) -> npt.NDArray[np.int64]:
        scores, slack = self._integer_scores(vectors, first_row)
        rows = np.arange(len(vectors))
        best: npt.NDArray[np.int64] = scores.argmax(axis=1)
        top = scores[rows, best].copy()
        scores[rows, best] = np.iinfo(np.int32).min
        unsure = np.flatnonzero(scores.max(axis=1) >= top - slack)
        if len(unsure):
            scores[unsure, best[unsure]] = top[unsure]
            best[unsure] = self._best_in_float(vectors[unsure], scores[unsure],
                                               (top - slack)[unsure])
        return best.astype(np.int64)

    def _integer_scores(self, vectors: npt.NDArray[np.float32], first_row: int
                        ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
        """Each row's integer score against every centroid, and its slack (_codes)."""
        codes, slack = self._codes(vectors, first_row)
        return self.session.run(None, {"vectors": codes})[0], slack

    def _codes(self, vectors: npt.NDArray[np.float32], first_row: int = 0
               ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """The vectors' uint8 codes, and how far below a row's best integer
        score its nearest centroid's may be (twice the row's error bound, in score units).
        `first_row`: the first's row number in the caller's batch, for an error."""
        largest = np.abs(vectors).max(axis=1)  # NaN or inf where the row holds one
        _require_scalable(largest, first_row)
        # a zero row keeps scale 1: its codes are all zero and every centroid ties
        row_scale = (_LEVELS / np.where(largest > 0, largest, _LEVELS)).astype(np.float32)
        scaled = vectors * row_scale[:, None]
        rounded = np.rint(scaled)
        residue = scaled - rounded
        vector_error = np.sqrt(np.einsum("ij,ij->i", residue, residue)) / row_scale
        vector_norm = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
        # |<x, c> - <x', c'>| <= |x - x'| |c| + |x'| |c - c'|, and |x'| <= |x| + |x - x'|
        bound = vector_error * self.norm + (vector_norm + vector_error) * self.error
        slack = np.ceil(2 * bound * row_scale * self.scale * (1 + 1e-4)).astype(np.int64) + 1
        return (rounded + _ZERO).astype(np.uint8), slack

    def _best_in_float(self, vectors: npt.NDArray[np.float32], scores: npt.NDArray[np.int32],
                       floor: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """For each row, the best in float32 of the centroids whose integer score is at
        least the row's `floor`, scored _CANDIDATES (row, centroid) pairs at a time."""
        rows, columns = np.nonzero(scores >= floor[:, None])
        exact = np.empty(len(rows), np.float32)
        for start in range(0, len(rows), _CANDIDATES):
            pairs = slice(start, start + _CANDIDATES)
            exact[pairs] = np.einsum("ij,ij->i", vectors[rows[pairs]],
                                     self.centroids[columns[pairs]])
        order = np.lexsort((-exact, rows))  # each row's best first
        first = np.flatnonzero(np.r_[True, rows[order][1:] != rows[order][:-1]])
        return columns[order[first]].astype(np.int64)


# Where a row leaves more centroids than this to score again in float32, the int8 choice
# costs more than FAISS's float product (at 4,096 lists, one core, k-means centroids and
# 50,000 rows of benchmarks/gallery_data.py's variants: clustered 2.4 a row, 12.2 s a
# million against FAISS's 22.3; uneven 8.1, 19.1-19.5 against 23.4-23.6; iso 18.1,
# 24.0-24.2 against 22.9-23.1). Both products scale with the lists, the re-score does not:
# the limit scales too. Only 4,096 lists were measured; below 1,024 both choices are cheap
# and a build keeps the int8 one.
_PAYING_RESCORES_AT_4096 = 16.0
_FEWEST_LISTS_MEASURED = 1024
PAYING_SAMPLE = 2048  # rows of its first batch a build measures that on


def paying_rescores(nlist: int) -> float:
    """The most float re-scores a row at which the int8 choice pays at `nlist` lists."""
    if nlist < _FEWEST_LISTS_MEASURED:
        return float("inf")
    return _PAYING_RESCORES_AT_4096 * nlist / 4096


def rows_per_product(nlist: int) -> int:
    """Rows whose integer scores against `nlist` centroids stay within _BLOCK_SCORES."""
    fewest, most = _BLOCK_ROWS
    return min(most, max(fewest, _BLOCK_SCORES // max(nlist, 1)))


# A row's scale (127 / its largest value) and norm stay finite in float32 within these.
_SMALLEST, _LARGEST = 1e-30, 1e30


def require_assignable(vectors: Matrix) -> None:
    """Refuses the rows an int8 assignment refuses, so that a build refuses the same rows
    whether or not this CPU's int8 products are exact."""
    if len(vectors):
        _require_scalable(np.abs(np.asarray(vectors, np.float32)).max(axis=1))


def _require_scalable(largest: npt.NDArray[np.float32], first_row: int = 0) -> None:
    """Refuses rows holding NaN or infinity, or whose largest value (zero aside) is outside
    _SMALLEST.._LARGEST: their integer codes and error bound would overflow."""
    fine = (largest == 0) | ((largest >= _SMALLEST) & (largest <= _LARGEST))
    if not fine.all():
        row = first_row + int(np.flatnonzero(~fine)[0])
        raise ValueError(f"vectors: row {row} holds NaN, infinity "
                         f"or values outside {_SMALLEST:g}..{_LARGEST:g} in magnitude")


def int8_assignment(centroids: Matrix, threads: int = 1,
                    fallback: str = "a build assigns lists by the float product"
                    ) -> Int8Assignment | None:
    """The int8 assignment to `centroids`, or None when this CPU's integer products are not
    exact (`fallback` says what is done instead, in the warning)."""
    centroids = np.ascontiguousarray(centroids, np.float32)
    scale = _LEVELS / max(float(np.abs(centroids).max()), float(np.finfo(np.float32).tiny))
    codes = np.rint(centroids * scale).astype(np.int8)
    error = float(np.linalg.norm(centroids - codes.astype(np.float32) / scale, axis=1).max())
    assignment = Int8Assignment(centroids, scale, error,
                                float(np.linalg.norm(centroids, axis=1).max()),
                                _product_session(codes, threads))
    if not _products_exact(assignment.session, codes):
        log.warning("onnxruntime's int8 products are not exact on this CPU: %s", fallback)
        return None
    return assignment


def _product_session(codes: npt.NDArray[np.int8], threads: int) -> Any:
    nlist, dimension = codes.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["vectors", "centroids", "zero"], ["scores"])],
        "nearest_centroid",
        [helper.make_tensor_value_info("vectors", TensorProto.UINT8, [None, dimension])],
        [helper.make_tensor_value_info("scores", TensorProto.INT32, [None, nlist])],
        initializer=[
            helper.make_tensor("zero", TensorProto.UINT8, [], [_ZERO]),
            helper.make_tensor("centroids", TensorProto.INT8, [dimension, nlist],
                               np.ascontiguousarray(codes.T).tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              ir_version=8)  # what onnxruntime 1.23 reads
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _products_exact(session: Any, codes: npt.NDArray[np.int8]) -> bool:
    """The session's products against numpy's exact ones, on rows at the codes' extremes
    (all 1s, all 255s, alternating) and random ones."""
    dimension = codes.shape[1]
    rng = np.random.default_rng(0)
    rows = np.vstack([np.full((1, dimension), 1), np.full((1, dimension), 255),
                      np.tile([1, 255], dimension // 2 + 1)[None, :dimension],
                      rng.integers(1, 256, (61, dimension))]).astype(np.uint8)
    got = session.run(None, {"vectors": rows})[0]
    expected = (rows.astype(np.int64) - _ZERO) @ codes.T.astype(np.int64)
    return bool(np.array_equal(got, expected))
