"""The vector index: derived from the store, rebuilt from it whenever in doubt.

`VectorIndex` is the interface the service uses. The types, named by the string an operator
configures:
    Flat                 exact inner product (FAISS IndexIDMap2 over IndexFlatIP)
    IVF<n>,Flat / ,SQ8 / ,PQ<m> and OPQ<m>,IVF<n>,PQ<m>
                         FAISS index_factory strings of the IVF family; need training;
                         searched with a per-call nprobe (SearchParametersIVF)
    BinarySign512 / 256  sign bits of a fixed random rotation (IndexBinaryFlat, Hamming);
                         needs no training and keeps no cluster assumption
    BinaryIVF<n>         the same 512-bit codes in n inverted lists (IndexBinaryIVF, binary
                         k-means on 39-64 codes a list); ids kept in the lists; per-call nprobe
    SignIVF<n>           the same 512-bit codes in the n lists of a float (spherical) k-means
                         partition: the centroids nearest the probe (by int8 products)
                         name the lists searched (IndexBinaryIVF.search_preassigned);
                         per-call nprobe
    FastScanIVF<n>       4-bit PQ codes (32 bytes a vector of 512) in SignIVF's partition,
                         scanned by FAISS's fast-scan kernel (IndexIVFPQFastScan), a batch's
                         queries a list at a time; per-call nprobe
Only Flat scores are exact; every other type's candidates are re-ranked against the stored
float32 embeddings before a verdict. Searches run in parallel; changes take the index
exclusively. HNSW is not offered: FAISS cannot delete from it.

What "auto" serves (index_plan.kind_for): Flat below IndexConfig.auto_threshold (200,000),
BinarySign512 from there on, FastScanIVF4096 from IndexConfig.auto_lists_threshold
(1,000,000); SignIVF4096 there before FastScanIVF (why both, and why the change: below).
benchmarks/ann_binary.py at 1,000,000 registrations of each synthetic variant (iso / uneven /
clustered), duplicate recall (probes whose exact matches >= 0.40 all come back after the
re-rank), q/s on one thread, batch 1, shared machine:
    BinarySign512, re-rank 16, 64 or 256: recall 1.000 on all three, 240-460 q/s
    BinaryIVF1024, nprobe 512 (half the codes): 0.83 / 0.98 / 0.92, 220-420 q/s
    BinaryIVF2048, nprobe 1024 (half the codes): 0.88 / 0.98 / 0.95, 190-280 q/s
    multi-index hashing (32x16 or 64x8 bits): recall 0.02-0.04, or 0.95 at 5-12 q/s
Same-person captures score 0.4-0.8, far from near-duplicates: binary k-means on the codes
partitions them too poorly to find them without searching most of it. A float k-means
partition does better where the gallery has structure (benchmarks/ivf_at_scale.py, 1,000,000,
matches >= 0.40 found after a re-rank of 64; recall at nprobe 256 / 512 / 1024 of 4,096):
    IVF4096,Flat   uneven 0.994 / 0.999 / -      clustered 0.994 / 0.997 / -
    SignIVF4096    uneven 0.996 / 0.999 / 1.000  clustered 0.995 / 0.997 / 0.998
                   iso    0.883 / 0.947 / 0.986, at 705 / 563 / 373 q/s (uneven) against
                   293 q/s for the flat scan of the same codes in the same script
The partition, not the codes, is what misses (IVF4096,Flat misses as many), and how much it
misses depends on the gallery: isotropic data has no structure to partition by. So a
SignIVF build measures it on the gallery's own duplicates and keeps the smallest nprobe that
finds them (calibration.py); where none does, it searches every list and finds what the flat
scan finds. At 10,000,000 codes the flat scan did 33 q/s (60 in batches).
At 10,000,000 a SignIVF check reads the 64-byte codes of a third of the lists or more, one
query at a time: FAISS's binary IVF scans a code at 2.6-6 ns, and memory bounds it. The same
partition holding 4-bit PQ codes (FastScanIVF: 32 bytes, FAISS's SIMD fast-scan kernel,
which scans a list once for all of a batch's queries that probe it) finds the same
candidates after the exact re-rank. benchmarks/ivf_at_scale.py --kind SignIVF4096
FastScanIVF4096 --batches 4 8 at 1,000,000 clustered, recall of matches >= 0.40 under the
probe's own ID number at nprobe 256 / 512 / 1024: 0.9924 / 0.9972 / 0.9992 for both, q/s
one query at a time 1,607 / 979 / 570 (SignIVF) against 1,729 / 1,192 / 716, batches of 8
on two threads 3,247 / 2,035 / 1,075 against 4,237 / 2,751 / 1,786. At 10,000,000 clustered
(a throwaway script, one run, nprobe 1,448: recall 0.999 for both) batches of 8 on two
threads did 155 against 472 q/s, one query at a time 105 against 143.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
import numpy.typing as npt

from dedup.core.errors import CheckpointError, FailedPrecondition, InvalidArgument
from dedup.core.rwlock import ReadWriteLock
from dedup.core.settings import IndexConfig
from dedup.core.vectors import Matrix
from dedup.gallery.embedded.checkpoint import Checkpoint, read_checkpoint
from dedup.gallery.embedded.list_assignment import (
    PAYING_SAMPLE,
    Int8Assignment,
    int8_assignment,
    paying_rescores,
    require_assignable,
)

Ids = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float32]
log = logging.getLogger("dedup.gallery")

FLAT = "Flat"
AUTO = "auto"
BINARY_DEFAULT = "BinarySign512"
# ASCII digits only (Python's \d also takes other scripts' digits), and at least one list:
# an "IVF0,Flat" needs no training, so it was built, and every search then failed in FAISS.
_IVF = re.compile(r"^(OPQ(?P<opq_m>\d+)(?:_(?P<opq_out>\d+))?,)?IVF(?P<nlist>[1-9]\d*),"
                  r"(Flat|SQ8|SQ4|SQfp16|PQ(?P<pq_m>\d+)(?:x(?P<pq_bits>\d+))?)\Z", re.ASCII)
_BINARY = re.compile(r"^BinarySign(256|512)\Z")
_BINARY_IVF = re.compile(r"^BinaryIVF([1-9]\d{0,6})\Z", re.ASCII)
SIGN_IVF = re.compile(r"^SignIVF([1-9]\d{0,6})\Z", re.ASCII)
FAST_SCAN_IVF = re.compile(r"^FastScanIVF([1-9]\d{0,6})\Z", re.ASCII)
# FastScanIVF's PQ: a 4-bit sub-quantizer (16 centroids) for every 8 dimensions, the only
# code width FAISS's fast-scan kernel takes: 32 bytes a vector of 512.
FAST_SCAN_SUBVECTOR = 8
ROTATION_SEED = 20191201  # fixed: the codes of a checkpoint depend on it
SIGN_BITS = 512  # the code length of the binary IVF
MAX_NLIST = 1 << 20
# A PQ sub-quantizer's centroids are 2**bits. FAISS refuses more than 24 bits and divides by
# zero at 0 (SIGFPE: the process died); 16 bits are already 65,536 centroids each.
MAX_PQ_BITS = 16
OPQ_CENTROIDS = 256  # OPQ trains a PQ of 8 bits to find its rotation
CALIBRATION_TARGET = 0.998  # of the same-person pairs found (calibration.py)
DEFAULT_NPROBE = 64  # lists searched by the IVF and BinaryIVF types unless configured
# BinarySign removes the codes of this many removed ids at once (see BinarySignIndex);
# SignIVF and FastScanIVF those of this many: their searches pay more for each
# (PartitionedIndex, FastScanIVFIndex).
MARKED_REMOVALS_MOST = 1024
MARKED_LIST_REMOVALS_MOST = 64


@dataclass(frozen=True)
class SearchOptions:
    """Per-call search parameters; passed to FAISS per call, never set on the shared index.

    `nprobe`: inverted lists searched (IVF, BinaryIVF, SignIVF and FastScanIVF types); 0
    leaves it to the index: SignIVF's and FastScanIVF's nprobe calibrated at their build,
    DEFAULT_NPROBE for the others.
    `rerank_candidates`: how many candidates of an approximate index are re-scored exactly
    from the stored vectors.
    `calibration_target`: with nprobe 0, SignIVF and FastScanIVF search the fewest lists
    their build's calibration found holding this share of the same-person pairs (0: the
    nprobe the build chose, for CALIBRATION_TARGET).
    """

    nprobe: int = 0
    rerank_candidates: int = 64
    calibration_target: float = 0.0

    @classmethod
    def configured(cls, config: IndexConfig) -> SearchOptions:
        """A server's searches, as its settings ask (re-ranking depth is the service's)."""
        return cls(nprobe=config.nprobe, calibration_target=config.calibration_target)


@dataclass(frozen=True)
class Calibration:
    """The nprobe a SignIVF or FastScanIVF index searches by default, and the measurement
    that chose it: `recall` maps each nprobe tried to the share of `pairs` (registrations of
    one person under one ID number) whose partner came back (calibration.py)."""

    nprobe: int
    pairs: int
    recall: dict[int, float]
    vectors: int = 0  # the index's size when calibrated

    def to_json(self) -> str:
        return json.dumps({"nprobe": self.nprobe, "pairs": self.pairs, "vectors": self.vectors,
                           "recall": {str(n): r for n, r in self.recall.items()}})

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """ValueError when `text` is not a calibration this version wrote."""
        try:
            fields = json.loads(text)
            return cls(int(fields["nprobe"]), int(fields["pairs"]),
                       {int(n): float(r) for n, r in fields["recall"].items()},
                       int(fields["vectors"]))
        except (KeyError, TypeError, AttributeError, OverflowError) as error:
            raise ValueError(f"not a calibration: {error!r}") from error

    def nprobe_reaching(self, target: float, nlist: int) -> int:
        """The fewest lists the measurement found holding `target` of the pairs (every
        list where none did; the build's own nprobe for target 0). Only the nprobes the
        build tried are known: a doubling apart, a quarter of one near its own target."""
        if not target:
            return self.nprobe
        if not self.recall:
            return nlist  # too few pairs were measured: every list, as the build chose
        return min((n for n, found in self.recall.items() if found >= target), default=nlist)

    def describe(self, nprobe: int | None = None, target: float = 0.0) -> str:
        """How `nprobe` (the build's own by default) was chosen, for the index status."""
        if not self.recall:
            return (f"every list: {self.pairs:,} same-person pairs, too few to calibrate "
                    "on")
        nprobe = self.nprobe if nprobe is None else nprobe
        target = target or CALIBRATION_TARGET
        if nprobe not in self.recall:  # a target above every nprobe the build measured
            most = max(self.recall, key=lambda n: (self.recall[n], -n))
            return (f"every list: no nprobe measured held the {target} target, at most "
                    f"{self.recall[most]:.4f} of {self.pairs:,} same-person pairs at "
                    f"{most}")
        found = (f"{self.recall[nprobe]:.4f} of {self.pairs:,} same-person pairs found")
        if self.recall[nprobe] < target:
            return f"every list, under the {target} target: {found}"
        if target != CALIBRATION_TARGET:
            return f"calibrated for a {target} target: {found}"
        return f"calibrated: {found}"


class VectorIndex(Protocol):
    """What the service needs of an index over unit vectors with int64 ids."""

    @property
    def kind(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    @property
    def exact(self) -> bool:
        """True when search scores are exact inner products (no re-ranking needed)."""
        ...

    @property
    def bytes_per_vector(self) -> float: ...

    def __len__(self) -> int: ...

    def add(self, ids: Ids, vectors: Matrix) -> None: ...

    def remove(self, ids: Ids) -> int: ...

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        """Per query: ids and scores of up to k neighbours, best first."""
        ...

    def snapshot(self, sequence: int, model_id: str,
                 buffer: SnapshotBuffer | None = None) -> Checkpoint:
        """The serialised index, labelled as covering the store's changes up to `sequence`;
        in `buffer` where given (its parts are then valid until its next use).

        Callers write it with `write_checkpoint` (temp file, fsync, rename) outside any lock.
        """
        ...


def validate_kind(kind: str, field: str = "index_factory", dimension: int | None = None) -> str:
    """The canonical name of an index type, or InvalidArgument naming what is supported.
    With `dimension`, an IVF type's PQ and OPQ must also fit vectors of that dimension."""
    if kind in (FLAT, AUTO) or _BINARY.match(kind):
        return kind
    if (ivf := _IVF.match(kind)) is not None:
        if (problem := _ivf_problem(ivf, dimension)) is not None:
            raise InvalidArgument(field, f"{kind!r}: {problem}")
        return kind
    if (lists := _lists_match(kind)) is not None:
        if int(lists.group(1)) > MAX_NLIST:
            raise InvalidArgument(field, f"{kind!r}: at most {MAX_NLIST:,} lists")
        if FAST_SCAN_IVF.match(kind) and dimension is not None \
                and dimension % FAST_SCAN_SUBVECTOR:
            raise InvalidArgument(field, f"{kind!r}: needs a dimension divisible by "
                                         f"{FAST_SCAN_SUBVECTOR}, not {dimension}")
        return kind
    if "HNSW" in kind:
        raise InvalidArgument(field, f"{kind!r}: HNSW is not supported, FAISS cannot delete "
                                     "from it and erasure must work on every index")
    raise InvalidArgument(field, f"{kind!r} is not a supported index type: use Flat, "
                                 "BinarySign512, BinarySign256, BinaryIVF<n>, SignIVF<n>, "
                                 "FastScanIVF<n>, IVF<n>,Flat|SQ8|PQ<m> or OPQ<m>,IVF<n>,PQ<m>")


def _ivf_problem(ivf: re.Match[str], dimension: int | None) -> str | None:
    """Why FAISS would refuse to build or train this IVF type, or kill the process; None
    when it would not (as far as `dimension`, if not None, tells)."""
    if int(ivf["nlist"]) > MAX_NLIST:
        return f"at most {MAX_NLIST:,} lists"
    # The dimension of the vectors the lists and the PQ see: OPQ's output if it sets one.
    width = int(ivf["opq_out"]) if ivf["opq_out"] is not None else dimension
    if ivf["opq_m"] is not None and (problem := _opq_problem(ivf, width, dimension)):
        return problem
    if ivf["pq_m"] is None:
        return None
    if not 1 <= (bits := int(ivf["pq_bits"] or 8)) <= MAX_PQ_BITS:
        return f"PQ codes of 1 to {MAX_PQ_BITS} bits a sub-quantizer, not {bits}"
    return _subquantizer_problem("PQ", int(ivf["pq_m"]), width)


def _opq_problem(ivf: re.Match[str], width: int | None, dimension: int | None) -> str | None:
    if width is not None and width < 1:
        return "OPQ's output needs at least one dimension"
    if width is not None and dimension is not None and width > dimension:
        return f"OPQ's output of {width} dimensions is wider than the vectors' {dimension}"
    return _subquantizer_problem("OPQ", int(ivf["opq_m"]), width)


def _subquantizer_problem(name: str, count: int, width: int | None) -> str | None:
    if count < 1:
        return f"{name} needs at least one sub-quantizer"
    if width is not None and width % count:
        return f"{name}'s {count} sub-quantizers do not divide the {width} dimensions"
    return None


def nlist_of(kind: str) -> int:
    """The inverted lists of an IVF or BinaryIVF type; 0 for the others."""
    if (match := _IVF.match(kind)) is not None:
        return int(match["nlist"])
    if (lists := _lists_match(kind)) is not None:
        return int(lists.group(1))
    return 0


def _lists_match(kind: str) -> re.Match[str] | None:
    return _BINARY_IVF.match(kind) or SIGN_IVF.match(kind) or FAST_SCAN_IVF.match(kind)


def training_size(kind: str, dimension: int) -> int:
    """Vectors of `dimension` needed to train `kind` (0 for types without training): 39 a
    list, as FAISS's k-means wants (ClusteringParameters.min_points_per_centroid), and for a
    PQ or OPQ what its own training needs (_quantizer_training_size)."""
    return max(39 * nlist_of(kind), _quantizer_training_size(kind, dimension))


def _quantizer_training_size(kind: str, dimension: int) -> int:
    """One vector a centroid of each PQ or OPQ sub-quantizer, below which FAISS refuses to
    train; and for an OPQ, one a dimension of its output: with fewer, FAISS corrupted its
    heap and the process aborted."""
    if (ivf := _IVF.match(kind)) is None:
        return 0
    pq = 2 ** int(ivf["pq_bits"] or 8) if ivf["pq_m"] is not None else 0
    if ivf["opq_m"] is None:
        return pq
    return max(pq, OPQ_CENTROIDS, int(ivf["opq_out"] or dimension))


def _require_training_sample(kind: str, dimension: int, sample: Matrix) -> None:
    needed = training_size(kind, dimension)
    if len(sample) < needed:
        raise FailedPrecondition(
            f"index_factory: {kind} needs at least {needed:,} training vectors, "
            f"the store holds {len(sample):,}")


def new_index(kind: str, dimension: int) -> VectorIndex:
    if kind == FLAT:
        return FlatIndex(dimension)
    if (binary := _BINARY.match(kind)) is not None:
        return BinarySignIndex(dimension, int(binary.group(1)))
    if (binary_ivf := _BINARY_IVF.match(kind)) is not None:
        return BinaryIVFIndex(dimension, int(binary_ivf.group(1)))
    if (sign_ivf := SIGN_IVF.match(kind)) is not None:
        return SignIVFIndex(dimension, int(sign_ivf.group(1)))
    if (fast_scan := FAST_SCAN_IVF.match(kind)) is not None:
        validate_kind(kind, dimension=dimension)
        return FastScanIVFIndex(dimension, int(fast_scan.group(1)))
    if _IVF.match(kind):
        return IVFIndex(validate_kind(kind, dimension=dimension), dimension)
    raise InvalidArgument("index_factory", f"{kind!r} is not a concrete index type")


def _no_results(queries: int) -> list[tuple[Ids, Scores]]:
    return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(queries)]


class _Locked:
    """Shared plumbing: a FAISS index behind a readers-writer lock."""

    kind: str

    def __init__(self, index: Any, dimension: int) -> None:
        self._index = index
        self._dimension = dimension
        self._lock = ReadWriteLock()

    @property
    def dimension(self) -> int:
        return self._dimension

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def remove(self, ids: Ids) -> int:
        if len(ids) == 0:
            return 0
        with self._lock.writing():
            # faiss's Python wrapper turns an id array into an IDSelectorBatch.
            return int(self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def _add_floats(self, ids: Ids, vectors: Matrix) -> None:
        """FAISS's add of float vectors with their ids; the caller holds the write lock."""
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                 np.ascontiguousarray(ids, dtype=np.int64))

    def _serialize(self, buffer: SnapshotBuffer | None) -> tuple[memoryview, ...]:
        return serialized(self._index, binary=False, buffer=buffer)

    def snapshot(self, sequence: int, model_id: str,
                 buffer: SnapshotBuffer | None = None) -> Checkpoint:
        # Under the read lock: searches go on, changes wait for the copy.
        with self._lock.reading():
            parts = self._serialize(buffer)
            vectors = int(self._index.ntotal)
        return Checkpoint(sequence, vectors, model_id, parts, kind=self.kind)

    @staticmethod
    def _split(scores: npt.NDArray[Any], ids: npt.NDArray[np.int64]
               ) -> list[tuple[Ids, Scores]]:
        found = ids >= 0
        return [(ids[row][found[row]], scores[row][found[row]].astype(np.float32))
                for row in range(len(ids))]


class FlatIndex(_Locked):
    """Exact inner-product search over every stored vector."""

    kind = FLAT
    exact = True

    def __init__(self, dimension: int, index: Any = None) -> None:
        super().__init__(index if index is not None
                         else faiss.IndexIDMap2(faiss.IndexFlatIP(dimension)), dimension)

    @property
    def bytes_per_vector(self) -> float:
        return 4.0 * self._dimension + 16  # the vector, its id and the id map entry

    def add(self, ids: Ids, vectors: Matrix) -> None:
        if len(ids) == 0:
            return
        with self._lock.writing():
            self._add_floats(ids, vectors)

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        with self._lock.reading():
            if self._index.ntotal == 0:
                return _no_results(len(queries))
            scores, ids = self._index.search(np.ascontiguousarray(queries, np.float32), k)
        return self._split(scores, ids)


class IVFIndex(_Locked):
    """A trained FAISS IVF index (Flat, SQ or PQ codes, optionally after OPQ)."""

    exact = False

    def __init__(self, kind: str, dimension: int, index: Any = None) -> None:
        self.kind = kind
        super().__init__(index if index is not None else _from_factory(kind, dimension),
                         dimension)

    @property
    def bytes_per_vector(self) -> float:
        ivf = faiss.extract_index_ivf(self._index)
        return float(ivf.code_size) + 8  # the code and its id in the inverted list

    def train(self, sample: Matrix) -> None:
        _require_training_sample(self.kind, self.dimension, sample)
        with self._lock.writing():
            self._index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, ids: Ids, vectors: Matrix) -> None:
        if len(ids) == 0:
            return
        with self._lock.writing():
            self._add_floats(ids, vectors)

    def _params(self, options: SearchOptions) -> Any:
        ivf_params = faiss.SearchParametersIVF()
        ivf_params.nprobe = options.nprobe or DEFAULT_NPROBE
        if isinstance(self._index, faiss.IndexPreTransform):
            params = faiss.SearchParametersPreTransform()
            params.index_params = ivf_params
            return params, ivf_params  # keep the inner object alive during the call
        return ivf_params, None

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        params, _keep = self._params(options)
        with self._lock.reading():
            if self._index.ntotal == 0:
                return _no_results(len(queries))
            scores, ids = self._index.search(np.ascontiguousarray(queries, np.float32), k,
                                             params=params)
        return self._split(scores, ids)


def _from_factory(kind: str, dimension: int) -> Any:
    index = faiss.index_factory(dimension, kind, faiss.METRIC_INNER_PRODUCT)
    if kind.rsplit(",", 1)[-1].startswith("PQ"):
        # Polysemous training orders a PQ's centroids for a Hamming pre-filter no search here
        # uses; it took minutes at 12 bits, and at 14 its allocation aborted the process.
        lists: Any = faiss.downcast_index(faiss.extract_index_ivf(index))  # IndexIVFPQ
        lists.do_polysemous_training = False
    return index


@functools.lru_cache(maxsize=4)
def _projection(dimension: int, bits: int) -> npt.NDArray[np.float32]:
    """The first `bits` columns of a fixed random rotation (the same in every process)."""
    rng = np.random.default_rng(ROTATION_SEED)
    rotation, _ = np.linalg.qr(rng.standard_normal((dimension, dimension)))
    projection = np.ascontiguousarray(rotation[:, :bits], dtype=np.float32)
    projection.flags.writeable = False
    return projection


class _SignCoded(_Locked):
    """A binary FAISS index over sign bits after a fixed random rotation (Hamming distance).

    For unit vectors at cosine c the expected Hamming distance is bits * acos(c) / pi, so
    the codes keep the order that matters for duplicates without assuming any cluster
    structure; scores here are only -distance and are always re-ranked exactly.
    """

    exact = False

    def __init__(self, dimension: int, bits: int, index: Any) -> None:
        self.bits = bits
        self._projection = _projection(dimension, bits)
        super().__init__(index, dimension)

    def encode(self, vectors: Matrix) -> npt.NDArray[np.uint8]:
        return np.packbits(np.asarray(vectors, np.float32) @ self._projection > 0, axis=1)

    def add(self, ids: Ids, vectors: Matrix) -> None:
        if len(ids) == 0:
            return
        codes = self.encode(vectors)
        with self._lock.writing():
            self._index.add_with_ids(codes, np.ascontiguousarray(ids, dtype=np.int64))

    def _search_codes(self, queries: Matrix, k: int, params: Any) -> list[tuple[Ids, Scores]]:
        codes = self.encode(queries)
        with self._lock.reading():
            if self._index.ntotal == 0:
                return _no_results(len(queries))
            distances, ids = self._index.search(codes, k, params=params)
        return self._split(-distances.astype(np.float32), ids)

    def _serialize(self, buffer: SnapshotBuffer | None) -> tuple[memoryview, ...]:
        return serialized(self._index, binary=True, buffer=buffer)


class BinarySignIndex(_SignCoded):
    """Every code scanned (IndexBinaryFlat): no training, no cluster assumption.

    FAISS removes a code from a flat index by moving every code after it and rebuilding the
    id map: 31-44 ms at 1,000,000 and ~0.45 s at 10,000,000 with every check waiting. So a
    removal only marks its ids: searches ask for as many more neighbours and drop the marked
    (a scan's cost hardly moves with k: 7.5, 4.5 and 6.3 ms at 1,000,000 for k 64, 1,088 and
    4,160, one run), and the codes go in one removal once MARKED_REMOVALS_MOST are marked, or
    before a snapshot, so no checkpoint holds a removed code."""

    def __init__(self, dimension: int, bits: int, index: Any = None) -> None:
        self.kind = f"BinarySign{bits}"
        index = index if index is not None else faiss.IndexBinaryIDMap2(
            faiss.IndexBinaryFlat(bits))
        if not isinstance(index, faiss.IndexBinaryIDMap2):  # _holds looks ids up in its map
            raise TypeError(f"a {self.kind} index must map its ids both ways, not "
                            f"{type(index).__name__}")
        super().__init__(dimension, bits, index)
        self._marked: Ids = np.empty(0, np.int64)  # removed, their codes still in _index

    @property
    def bytes_per_vector(self) -> float:
        return self.bits / 8 + 16

    def __len__(self) -> int:
        return int(self._index.ntotal) - len(self._marked)

    def add(self, ids: Ids, vectors: Matrix) -> None:
        if len(ids) == 0:
            return
        codes = self.encode(vectors)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock.writing():
            if len(self._marked) and np.isin(ids, self._marked).any():
                self._remove_marked()  # an id back: its old code goes first
            self._index.add_with_ids(codes, ids)

    def remove(self, ids: Ids) -> int:
        if len(ids) == 0:
            return 0
        with self._lock.writing():
            wanted = np.setdiff1d(np.asarray(ids, np.int64), self._marked)  # unique
            if len(wanted) < MARKED_REMOVALS_MOST:  # ids not held do not count to the limit
                wanted = np.asarray([key for key in wanted.tolist() if self._holds(key)],
                                    np.int64)
            if len(self._marked) + len(wanted) >= MARKED_REMOVALS_MOST:  # all at once
                marked = len(self._marked)
                removed = int(self._index.remove_ids(np.union1d(self._marked, wanted)))
                self._marked = np.empty(0, np.int64)
                return removed - marked
            self._marked = np.union1d(self._marked, wanted)
            return len(wanted)

    def _holds(self, key: int) -> bool:
        """Whether the index holds a code under `key` (the id map's lookup)."""
        try:
            self._index.reconstruct(key)
        except RuntimeError as error:
            if "not found" in str(error):
                return False
            raise
        return True

    def _remove_marked(self) -> None:
        if len(self._marked):
            self._index.remove_ids(self._marked)
            self._marked = np.empty(0, np.int64)

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        codes = self.encode(queries)
        with self._lock.reading():
            if self._index.ntotal == 0:
                return _no_results(len(queries))
            marked = self._marked
            distances, ids = self._index.search(codes, k + len(marked))
        return _without_marked(self._split(-distances.astype(np.float32), ids), marked, k)

    def snapshot(self, sequence: int, model_id: str,
                 buffer: SnapshotBuffer | None = None) -> Checkpoint:
        while True:  # again should a removal come between the two locks
            if len(self._marked):
                with self._lock.writing():
                    self._remove_marked()
            with self._lock.reading():
                if not len(self._marked):
                    parts = self._serialize(buffer)
                    return Checkpoint(sequence, int(self._index.ntotal), model_id, parts,
                                      kind=self.kind)


class BinaryIVFIndex(_SignCoded):
    """512-bit sign codes in `nlist` inverted lists (IndexBinaryIVF, binary k-means): a
    search scans the codes of the `nprobe` lists nearest the probe's code."""

    def __init__(self, dimension: int, nlist: int, index: Any = None) -> None:
        self.kind = f"BinaryIVF{nlist}"
        self.nlist = nlist
        super().__init__(dimension, SIGN_BITS, index if index is not None
                         else faiss.index_binary_factory(SIGN_BITS, f"BIVF{nlist}"))

    @property
    def bytes_per_vector(self) -> float:
        return self.bits / 8 + 8  # the code and its id in the inverted list

    def train(self, sample: Matrix) -> None:
        _require_training_sample(self.kind, self.dimension, sample)
        codes = self.encode(sample)
        with self._lock.writing():
            self._index.train(codes)

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        params = faiss.SearchParametersIVF()
        params.nprobe = max(1, min(options.nprobe or DEFAULT_NPROBE, self.nlist))
        return self._search_codes(queries, k, params)


class PartitionedIndex(_Locked):
    """Codes in the `nlist` lists of a float partition: spherical k-means on the float32
    embeddings, whose centroids (an exact IndexFlatIP) assign each vector its list. A build's
    `fill` chooses the same lists by list_assignment.py's int8 products, for a fraction of
    the cost (or by the float product, where those do not pay: _fill_assignment_for). A
    search scans the `nprobe` lists of the highest int8 scores (_probed_lists); how many is
    measured at the build on the gallery's own duplicates (calibration.py).

    Float k-means follows the gallery's structure where binary k-means on the codes does
    not (BinaryIVF above). Subclasses hold the codes: SignIVF 512 sign bits, FastScanIVF
    4-bit PQ codes. Removals are marked and skipped, their codes removed together (below).
    """

    # 10 iterations rather than 20: half of k-means, a rebuild's largest fixed cost (~200 s
    # on one core at 262,144 samples), for a 0.2% lower objective and the same duplicate
    # recall within 0.001 at every nprobe measured (1,000,000 uneven).
    KMEANS_ITERATIONS = 10
    exact = False
    nlist: int
    calibration: Calibration
    _centroids: Any
    _fill_assignment: Int8Assignment | None  # made by train

    def _partition(self, nlist: int, calibration: Calibration | None) -> None:
        self.nlist = nlist
        self._fill_decided = False  # a build's first fill batch chose int8 or float lists
        # Every list until calibrated: then it finds what a scan of every code finds.
        self.calibration = calibration or Calibration(nprobe=nlist, pairs=0, recall={})
        self._search_choice: Int8Assignment | None = None  # made by train or a load
        self._search_choice_made = False
        self._making_search_choice = threading.Lock()

    def _train_centroids(self, sample: Matrix) -> npt.NDArray[np.float32]:
        _require_training_sample(self.kind, self.dimension, sample)
        kmeans = faiss.Kmeans(self._dimension, self.nlist, niter=self.KMEANS_ITERATIONS,
                              spherical=True, seed=ROTATION_SEED)
        kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
        return np.asarray(kmeans.centroids, np.float32)

    def _lists_of(self, vectors: Matrix, nprobe: int) -> npt.NDArray[np.int64]:
        _, lists = self._centroids.search(np.ascontiguousarray(vectors, np.float32), nprobe)
        return np.ascontiguousarray(lists, dtype=np.int64)

    def _probed_lists(self, queries: Matrix, nprobe: int) -> npt.NDArray[np.int64]:
        """The `nprobe` lists each query scans, nearest first, by list_assignment.py's int8
        products: the float product reads all 8 MB of the centroids (4,096 lists) a query,
        0.39 ms of a 1.10 ms search on 1,000,000 clustered here, the int8 choice 0.07-0.13 ms
        (2 MB). By the float product where this CPU's int8 products are not exact."""
        choice = self._search_choice_of()
        if choice is None:
            return self._lists_of(queries, nprobe)
        return choice.probed_lists(queries, nprobe)

    def _search_choice_of(self) -> Int8Assignment | None:
        """The int8 choice of a search's lists: made once the centroids are trained (they
        never change after), by train and by a checkpoint's load (0.1 s and 10 MB at 4,096
        lists), else by the first search. None where it cannot be made, and before the
        centroids are trained (then made when asked after)."""
        if not self._search_choice_made and self._centroids.ntotal == self.nlist:
            with self._making_search_choice:
                if not self._search_choice_made:
                    self._search_choice = self._made_search_choice()
                    self._search_choice_made = True
        return self._search_choice

    def _made_search_choice(self) -> Int8Assignment | None:
        centroids = self._centroids.reconstruct_n(0, self._centroids.ntotal)
        try:
            return int8_assignment(centroids, threads=1,
                                   fallback="a search chooses its lists by the float product")
        except Exception:  # onnxruntime's session: searches go on by the float product
            log.exception("%s: a search chooses its lists by the float product", self.kind)
            return None

    def fill(self, ids: Ids, vectors: Matrix) -> None:
        """A build's vectors, after train (add chooses each list exactly)."""
        raise NotImplementedError

    def finish_fill(self) -> None:
        """After a build's last fill: the index as add would have left it, without the
        fill's assignment (its session and a copy of the centroids, ~10 MB at 4,096 lists)."""
        self._fill_assignment = None

    def _assignment_of(self, centroids: npt.NDArray[np.float32]) -> Int8Assignment | None:
        self._fill_decided = False
        return int8_assignment(centroids, threads=faiss.omp_get_max_threads())

    def _fill_assignment_for(self, vectors: Matrix) -> Int8Assignment | None:
        """The int8 assignment a fill takes, or None where FAISS's float product is the
        cheaper choice. Decided on rows spread over the build's first batch, not on the
        training sample: the centroids fit their sample, whose rows leave a fraction of the
        centroids close that the rest of a gallery does (0.6-1.3 against 2.4-18 a row). (A
        gallery under twice its sample starts with sample rows: it keeps the int8 choice.)"""
        assignment = self._fill_assignment
        if assignment is None or self._fill_decided or not len(vectors):
            return assignment
        spread = vectors[::max(1, len(vectors) // PAYING_SAMPLE)][:PAYING_SAMPLE]
        rescored = assignment.rescored_a_row(spread)
        self._fill_decided = True
        if rescored > paying_rescores(self.nlist):
            log.info("%s: a build assigns lists by the float product: the int8 products leave "
                     "%.1f centroids a row to score again in float32", self.kind, rescored)
            self._fill_assignment = None
        return self._fill_assignment

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        raise NotImplementedError

    def _search_lists(self, queries: Matrix, encoded: npt.NDArray[Any], k: int,
                      options: SearchOptions, distance: type[np.generic]
                      ) -> tuple[npt.NDArray[Any], Ids] | None:
        """The codes' index searched for `encoded` (the queries as it takes them) in the
        nprobe lists whose centroids are nearest `queries` (_probed_lists): distances and ids,
        or None when the index is empty."""
        params = faiss.SearchParametersIVF()
        params.nprobe = self.nprobe_for(options)
        distances = np.empty((len(queries), k), distance)
        ids = np.empty((len(queries), k), np.int64)
        with self._lock.reading():
            if self._index.ntotal == 0:
                return None
            lists = self._probed_lists(queries, params.nprobe)
            list_distances = np.zeros(lists.shape, distance)  # kept alive through the call
            # The C++ call: faiss's Python wrapper of search_preassigned reads the index's
            # shared nprobe, which concurrent callers with other nprobes would race on.
            self._index.search_preassigned_c(
                len(queries), faiss.swig_ptr(encoded), k, faiss.swig_ptr(lists),
                faiss.swig_ptr(list_distances), faiss.swig_ptr(distances),
                faiss.swig_ptr(ids), False, params)
        return distances, ids

    def nprobe_for(self, options: SearchOptions) -> int:
        nprobe = options.nprobe or self.calibration.nprobe_reaching(options.calibration_target,
                                                                    self.nlist)
        return max(1, min(nprobe, self.nlist))

    def calibrated(self, calibration: Calibration) -> None:
        self.calibration = dataclasses.replace(calibration, vectors=len(self))

    def outgrown(self, vectors: int) -> bool:
        """True once the index holds twice what it was trained and calibrated on: its lists
        and its nprobe are then due to be made again (a rebuild)."""
        return self.calibration.vectors > 0 and vectors >= 2 * self.calibration.vectors

    # -- removals, marked ------------------------------------------------------------
    # FAISS finds a removed id in an IVF by reading every list's ids, with every check
    # waiting: 6.3-6.5 ms at 1,000,000, 37-38 at 10,000,000 (FastScanIVF, one thread). So a
    # removal only marks the ids the index holds (`_held`, a flag a key): searches ask for as
    # many more neighbours and drop the marked, and the codes go together once
    # MARKED_LIST_REMOVALS_MOST are marked, or before a snapshot.

    _held: npt.NDArray[np.bool_]
    _marked: Ids

    def _track_removals(self, codes: Any) -> None:
        self._held = _ids_in_lists(codes)  # by key: the index holds a code under it
        self._marked = np.empty(0, np.int64)  # removed, their codes still in lists

    def _hold(self, ids: Ids, add: Callable[[], object]) -> None:
        """`add` puts the codes of `ids` into the lists (the index's codes, or a build's
        pending fill); the caller holds the write lock. An id back drops its old code first.
        `_held` grows to flag them all before the add, so that a failure to grow leaves no
        code unflagged; an add that fails partway (no memory) may have put some in, so all
        of `ids` are flagged then too (no memory needed), and a removal still finds them.
        (One that is not in the lists counts as removed, and FAISS's removal skips it.)"""
        if len(self._marked) and np.isin(ids, self._marked).any():
            self._remove_marked()
        if len(ids) and (most := int(ids.max())) >= len(self._held):
            grown = np.zeros(max(most + 1, 2 * len(self._held)), bool)
            grown[:len(self._held)] = self._held
            self._held = grown
        try:
            add()
        finally:
            self._held[ids] = True

    def __len__(self) -> int:
        index, marked = self._index, self._marked  # each read once
        return int(index.ntotal) - len(marked)

    def remove(self, ids: Ids) -> int:
        self.finish_fill()
        if len(ids) == 0:
            return 0
        with self._lock.writing():
            wanted = np.setdiff1d(np.asarray(ids, np.int64), self._marked)  # unique
            wanted = wanted[(wanted >= 0) & (wanted < len(self._held))]
            held = wanted[self._held[wanted]]
            marked = np.union1d(self._marked, held)
            self._held[held] = False
            self._marked = marked
            if len(self._marked) >= MARKED_LIST_REMOVALS_MOST:
                self._remove_marked()
            return len(held)

    def _remove_marked(self) -> None:
        """The marked codes out of their lists; the caller holds the write lock."""
        if len(self._marked):
            self._remove_codes(self._marked)
            self._marked = np.empty(0, np.int64)

    def _remove_codes(self, ids: Ids) -> None:
        self._index.remove_ids(ids)

    def _snapshot_without_marked(self, sequence: int, model_id: str, parts: list[memoryview],
                                 buffer: SnapshotBuffer | None) -> Checkpoint:
        """_framed_snapshot, the marked codes removed first."""
        while True:  # again should a removal be marked between the two locks
            if len(self._marked):
                with self._lock.writing():
                    self._remove_marked()
            snapshot = self._framed_snapshot(sequence, model_id, parts, buffer,
                                             lambda: len(self._marked))
            if snapshot is not None:
                return snapshot

    def _framed_snapshot(self, sequence: int, model_id: str, parts: list[memoryview],
                         buffer: SnapshotBuffer | None,
                         marked: Callable[[], int] = lambda: 0) -> Checkpoint | None:
        """[8 bytes: n][n bytes: calibration, JSON], then each of `parts` framed the same
        way, then the codes as FAISS writes them; None when `marked()` counts removals whose
        codes are still in the lists (read under the copy's lock)."""
        with self._lock.reading():  # searches go on, changes wait for the copy
            if marked():
                return None
            codes = self._serialize(buffer)
            vectors = int(self._index.ntotal)
        parts = [memoryview(self.calibration.to_json().encode()), *parts]
        framed = [piece for part in parts for piece in (
            memoryview(len(part).to_bytes(8, "little")), part)]
        return Checkpoint(sequence, vectors, model_id, (*framed, *codes), kind=self.kind)


class SignIVFIndex(PartitionedIndex, _SignCoded):
    """512-bit sign codes in the lists of a float partition (PartitionedIndex), searched
    with IndexBinaryIVF.search_preassigned. The codes' IndexBinaryIVF is only a container
    of lists: its own binary quantizer holds the centroids' codes and is never searched.
    """

    def __init__(self, dimension: int, nlist: int, centroids: Any = None,
                 codes: Any = None, calibration: Calibration | None = None) -> None:
        self.kind = f"SignIVF{nlist}"
        self._partition(nlist, calibration)
        self._centroids = centroids if centroids is not None else faiss.IndexFlatIP(dimension)
        self._fill_assignment = None
        if codes is None:
            self._code_quantizer = faiss.IndexBinaryFlat(SIGN_BITS)  # the IVF does not own it
            codes = faiss.IndexBinaryIVF(self._code_quantizer, SIGN_BITS, nlist)
        _SignCoded.__init__(self, dimension, SIGN_BITS, codes)
        self._track_removals(codes)

    @property
    def bytes_per_vector(self) -> float:
        return self.bits / 8 + 8  # the code and its id in the inverted list

    def train(self, sample: Matrix) -> None:
        centroids = self._train_centroids(sample)
        self._fill_assignment = self._assignment_of(centroids)
        with self._lock.writing():
            self._centroids.add(centroids)
            self._index.quantizer.add(self.encode(centroids))
            self._index.is_trained = True
        self._search_choice_of()

    def add(self, ids: Ids, vectors: Matrix) -> None:
        """Each vector in the list of its nearest centroid."""
        self._add_to_lists(ids, vectors, lambda: self._lists_of(vectors, 1))

    def fill(self, ids: Ids, vectors: Matrix) -> None:
        """A build's vectors, after train: each list chosen by list_assignment's int8
        products (or the float product where those do not pay)."""
        if not self._index.is_trained:
            raise FailedPrecondition(f"{self.kind}: fill follows train")
        assignment = self._fill_assignment_for(vectors)
        if assignment is None:
            require_assignable(vectors)
            self.add(ids, vectors)
        else:
            self._add_to_lists(ids, vectors, lambda: assignment.lists_of(vectors))

    def _add_to_lists(self, ids: Ids, vectors: Matrix,
                      lists_of: Callable[[], npt.NDArray[np.int64]]) -> None:
        if len(ids) == 0:
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        # The centroids change only in train, before the index holds or serves anything.
        lists, codes = lists_of(), self.encode(vectors)
        with self._lock.writing():
            self._hold(ids, lambda: self._index.add_core(
                len(ids), faiss.swig_ptr(codes), faiss.swig_ptr(ids), faiss.swig_ptr(lists)))

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        marked = self._marked  # removed ones marked later: the store no longer has them
        found = self._search_lists(queries, self.encode(queries), k + len(marked), options,
                                   np.int32)
        if found is None:
            return _no_results(len(queries))
        distances, ids = found
        return _without_marked(self._split(-distances.astype(np.float32), ids), marked, k)

    def snapshot(self, sequence: int, model_id: str,
                 buffer: SnapshotBuffer | None = None) -> Checkpoint:
        # [calibration][centroids][codes]
        return self._snapshot_without_marked(
            sequence, model_id, [faiss.serialize_index(self._centroids).data], buffer)

    @classmethod
    def deserialize(cls, payload: npt.NDArray[np.uint8], dimension: int, nlist: int
                    ) -> SignIVFIndex:
        """Raises RuntimeError or ValueError when the payload is not one of this type's."""
        calibration_json, rest = _framed(payload)
        centroid_bytes, code_bytes = _framed(rest)
        calibration = Calibration.from_json(calibration_json.tobytes().decode())
        centroids = faiss.deserialize_index(centroid_bytes)
        codes = faiss.deserialize_index_binary(code_bytes)
        if not (isinstance(centroids, faiss.IndexFlatIP) and centroids.d == dimension
                and centroids.ntotal == nlist and isinstance(codes, faiss.IndexBinaryIVF)
                and codes.d == SIGN_BITS and codes.nlist == nlist and codes.is_trained
                and 1 <= calibration.nprobe <= nlist):
            raise ValueError(f"not the centroids, codes and calibration of {nlist} lists of "
                             f"dimension {dimension}")
        index = cls(dimension, nlist, centroids, codes, calibration)
        index._search_choice_of()  # not on the first check's time
        return index


class FastScanIVFIndex(PartitionedIndex):
    """4-bit PQ codes (a sub-quantizer every FAST_SCAN_SUBVECTOR dimensions, 32 bytes a
    vector of 512) in the lists of a float partition (PartitionedIndex), searched by FAISS's
    fast-scan kernel (IndexIVFPQFastScan.search_preassigned): SIMD over blocks of 32 codes,
    and a batch's queries that probe a list scan it in one pass.

    Why: at 10,000,000 registrations a SignIVF check reads the 64-byte codes of a third of
    the lists or more, one query at a time, and memory bounds it; these codes are half as
    long and read once for a batch. The same candidates, faster at 1,000,000 and 10,000,000
    (the measurements: the module's docstring).

    The PQ's scores are rough (a true 1.0 comes out near 0.4): they only choose candidates,
    which are always re-ranked exactly. Its IndexFlatIP quantizer is the partition's
    centroids; an erased vector's code is zeroed in its list's last block, which FAISS
    leaves as it was when a list shrinks (and writes to the checkpoint).

    Removals are marked (PartitionedIndex): every 64th removal pays FAISS's removal of them
    all, the freed slots zeroed (_remove_codes). With 63 marked a search costs 1.23 ms
    against 1.13 at 1,000,000 and 15.15 against 14.99 at 10,000,000; with 255 marked (the
    limit tried first), 1.53 against 1.26 at 1,000,000 (benchmarks/list_removal.py).
    """

    def __init__(self, dimension: int, nlist: int, codes: Any = None,
                 calibration: Calibration | None = None) -> None:
        self.kind = f"FastScanIVF{nlist}"
        self._partition(nlist, calibration)
        self._fill_assignment = None
        # A build's codes until finish_fill: FAISS's fast-scan lists take no lists chosen
        # outside them, an IndexIVFPQ does (add_core), and converts to them code for code.
        self._filling: Any = None
        if codes is None:
            self._centroids = faiss.IndexFlatIP(dimension)  # the IVF does not own it
            codes = faiss.IndexIVFPQFastScan(self._centroids, dimension, nlist,
                                             dimension // FAST_SCAN_SUBVECTOR, 4,
                                             faiss.METRIC_INNER_PRODUCT)
            codes.by_residual = False  # one table a query, not one a list
        else:
            self._centroids = faiss.downcast_index(codes.quantizer)  # owned by `codes`
        super().__init__(codes, dimension)
        self._track_removals(codes)

    @property
    def bytes_per_vector(self) -> float:
        return float(self._index.code_size) + 8  # the code and its id in the inverted list

    def train(self, sample: Matrix) -> None:
        centroids = self._train_centroids(sample)
        with self._lock.writing():
            self._centroids.add(centroids)
            # The quantizer holds nlist centroids: FAISS trains only the PQ.
            self._index.train(np.ascontiguousarray(sample, dtype=np.float32))
        self._fill_assignment = self._assignment_of(centroids)
        self._search_choice_of()

    def add(self, ids: Ids, vectors: Matrix) -> None:
        """Each vector in the list of its nearest centroid."""
        self.finish_fill()
        if len(ids) == 0:
            return
        with self._lock.writing():
            self._add_held(ids, vectors)

    def _add_held(self, ids: Ids, vectors: Matrix) -> None:
        """FAISS's add, noting the ids held; the caller holds the write lock."""
        ids = np.ascontiguousarray(ids, np.int64)
        self._hold(ids, lambda: self._add_floats(ids, vectors))

    def fill(self, ids: Ids, vectors: Matrix) -> None:
        """A build's vectors, after train: each list chosen by list_assignment's int8
        products (or the float product where those do not pay); the index holds them after
        finish_fill."""
        if not self._index.is_trained:
            raise FailedPrecondition(f"{self.kind}: fill follows train")
        if len(ids) == 0:  # nothing to hold back, and a pending fill stays pending
            return
        added = self._filling is None and len(self) > 0  # vectors were added: add these too
        assignment = None if added else self._fill_assignment_for(vectors)
        if assignment is None:
            require_assignable(vectors)
            self.add(ids, vectors)
            return
        vectors = np.ascontiguousarray(vectors, np.float32)
        ids = np.ascontiguousarray(ids, np.int64)
        lists = assignment.lists_of(vectors)
        with self._lock.writing():  # a fill excludes finish_fill, add and remove
            if self._filling is None and self._index.ntotal:  # finished meanwhile
                self._add_held(ids, vectors)
                return
            if self._filling is None:
                self._filling = self._empty_filling()
            filling = self._filling
            self._hold(ids, lambda: filling.add_core(
                len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists)))

    def _empty_filling(self) -> Any:
        """An IndexIVFPQ over the index's centroids and PQ: it takes the lists a fill chose
        (add_core), and finish_fill converts it to fast-scan lists code for code."""
        filling = faiss.IndexIVFPQ(self._centroids, self._dimension, self.nlist,
                                   self._index.pq.M, 4, faiss.METRIC_INNER_PRODUCT)
        filling.by_residual = False
        filling.pq = self._index.pq
        filling.is_trained = True
        return filling

    def finish_fill(self) -> None:
        if self._filling is None:
            self._fill_assignment = None
            return
        with self._lock.writing():
            if self._filling is None:  # another caller finished it meanwhile
                return
            converted = faiss.IndexIVFPQFastScan(self._filling, self._index.bbs)
            # FAISS's wrapper keeps the source alive through the converted index: drop it,
            # or the build's IndexIVFPQ codes (~0.4 GB at 10,000,000) stay for good
            converted.referenced_objects = [self._centroids]  # type: ignore[attr-defined]
            self._index, self._filling, self._fill_assignment = converted, None, None

    def __len__(self) -> int:
        # each read once: finish_fill may swap them meanwhile (a count then can miss the fill)
        index, filling, marked = self._index, self._filling, self._marked
        return int(index.ntotal) + (0 if filling is None else int(filling.ntotal)) - len(marked)

    def _remove_codes(self, ids: Ids) -> None:
        before = self._list_sizes()
        self._index.remove_ids(ids)
        self._zero_freed_slots(before, self._list_sizes())

    def _list_sizes(self) -> npt.NDArray[np.int64]:
        lists = self._index.invlists
        return np.fromiter((lists.list_size(i) for i in range(self.nlist)), np.int64,
                           self.nlist)

    def _zero_freed_slots(self, before: npt.NDArray[np.int64],
                          after: npt.NDArray[np.int64]) -> None:
        """Zeroes the codes past each shrunk list's end that are still in its blocks. (A
        removal moves the list's last code into the removed one's place and shortens the
        list, keeping its blocks: the removed code, when it was last, stays there.)"""
        lists = faiss.downcast_InvertedLists(self._index.invlists)
        packer = lists.packer  # type: ignore[attr-defined]  # BlockInvertedLists's
        zero = np.zeros(packer.code_size, np.uint8)
        for list_no in np.flatnonzero(after < before).tolist():
            # Only the blocks FAISS kept: a list that lost a block may have been moved to a
            # smaller buffer (the rest freed), an emptied one has none.
            blocks = -(-int(after[list_no]) // packer.nvec)
            if blocks == 0:
                continue
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), blocks * packer.block_size)
            codes = codes.reshape(blocks, packer.block_size)
            for slot in range(int(after[list_no]), min(int(before[list_no]),
                                                       blocks * packer.nvec)):
                packer.pack_1(zero, slot, codes)

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        self.finish_fill()
        queries = np.ascontiguousarray(queries, np.float32)
        marked = self._marked  # removed ones marked later: the store no longer has them
        found = self._search_lists(queries, queries, k + len(marked), options, np.float32)
        if found is None:
            return _no_results(len(queries))
        return _without_marked(self._split(*found), marked, k)

    def snapshot(self, sequence: int, model_id: str,
                 buffer: SnapshotBuffer | None = None) -> Checkpoint:
        # [calibration][codes, their IVF holding the centroids]
        self.finish_fill()
        return self._snapshot_without_marked(sequence, model_id, [], buffer)

    @classmethod
    def deserialize(cls, payload: npt.NDArray[np.uint8], dimension: int, nlist: int
                    ) -> FastScanIVFIndex:
        """Raises RuntimeError or ValueError when the payload is not one of this type's."""
        calibration_json, code_bytes = _framed(payload)
        calibration = Calibration.from_json(calibration_json.tobytes().decode())
        codes = faiss.deserialize_index(code_bytes)
        if not (_is_fast_scan_of(codes, dimension, nlist) and 1 <= calibration.nprobe <= nlist):
            raise ValueError(f"not the codes and calibration of {nlist} lists of "
                             f"dimension {dimension}")
        index = cls(dimension, nlist, codes, calibration)
        index._search_choice_of()  # not on the first check's time
        return index


def _ids_in_lists(codes: Any) -> npt.NDArray[np.bool_]:
    """A flag a key, set for every id in the lists of the IVF `codes`."""
    lists = codes.invlists
    ids = [faiss.rev_swig_ptr(lists.get_ids(list_no), size)  # views: `codes` outlives them
           for list_no in range(codes.nlist) if (size := lists.list_size(list_no))]
    every = np.concatenate(ids) if ids else np.empty(0, np.int64)
    held = np.zeros(int(every.max()) + 1 if len(every) else 0, bool)
    held[every] = True
    return held


def _without_marked(found: list[tuple[Ids, Scores]], marked: Ids, k: int
                    ) -> list[tuple[Ids, Scores]]:
    """Each row's first k neighbours not among `marked` (a sorted array)."""
    if not len(marked):
        return found
    rows = []
    for ids, scores in found:
        kept = ~np.isin(ids, marked)
        rows.append((ids[kept][:k], scores[kept][:k]))
    return rows


def _is_fast_scan_of(found: Any, dimension: int, nlist: int) -> bool:
    """The codes a FastScanIVFIndex of `nlist` lists makes, searchable and erasable: FAISS
    reads a checkpoint whose search settings, id map or block layout differ, and then every
    search or every removal failed, or a search returned wrong ids."""
    if not isinstance(found, faiss.IndexIVFPQFastScan):
        return False
    codes: Any = found  # faiss's type stubs lack most of what is checked
    module: Any = faiss
    if not (codes.d == dimension and codes.nlist == nlist and codes.is_trained
            and not codes.by_residual and codes.metric_type == faiss.METRIC_INNER_PRODUCT
            and dimension // FAST_SCAN_SUBVECTOR == codes.M and codes.nbits == 4
            and codes.bbs == 32 and codes.implem == 0 and codes.qbs == 0 and codes.qbs2 == 0
            and codes.direct_map.type == module.DirectMap.NoMap):
        return False
    centroids = faiss.downcast_index(codes.quantizer)
    lists = faiss.downcast_InvertedLists(codes.invlists)
    return (isinstance(centroids, faiss.IndexFlatIP) and centroids.d == dimension
            and centroids.ntotal == nlist and isinstance(lists, module.BlockInvertedLists)
            and lists.n_per_block == codes.bbs and lists.block_size == codes.bbs * codes.M2 // 2
            and lists.packer is not None and lists.packer.nvec == codes.bbs
            and sum(lists.list_size(i) for i in range(nlist)) == codes.ntotal)


class SnapshotBuffer:
    """Memory an owner's snapshots are serialised into, kept from one to the next.

    A checkpoint copies the index with writes held. Into fresh memory the copy paid for
    every page it touched (and, on a node whose page cache is full, for reclaiming it) and,
    with checks running, the GIL for each of the ~16,000 pieces FAISS writes through a
    Python callback: writes were held 0.4-1.5 s a checkpoint at 10,000,000 on FastScanIVF
    (benchmarks/load.py), and one copy into this memory took 0.08-0.10 s beside 8 searching
    threads (0.29-0.44 s in pieces). Its owner fits it to each snapshot's size after
    writing it (`fit`): it then holds about an eighth more than the index's serialised size.
    A snapshot's parts are views of it: the owner writes them before the next snapshot or
    fit.
    """

    def __init__(self) -> None:
        self._writer = faiss.VectorIOWriter()
        self._capacity = 0  # known after fit; FAISS's writes grow it by doubling
        self._grown = False

    def fit(self, nbytes: int) -> None:
        """Room for a snapshot of `nbytes` and an eighth more, taken now (its pages touched),
        so that the next snapshot, with writes held, neither grows it (1-1.6 s at 10,000,000
        on FastScanIVF) nor keeps twice what it needs. Writes are not held here."""
        wanted = nbytes + nbytes // 8
        if nbytes <= 0 or (not self._grown and nbytes <= self._capacity <= 2 * wanted):
            return
        writer = faiss.VectorIOWriter()
        writer.data.resize(wanted)  # to exactly this capacity, zeroed
        writer.data.clear()
        self._writer, self._capacity, self._grown = writer, wanted, False

    def serialized(self, index: Any, binary: bool) -> tuple[memoryview, ...]:
        data = self._writer.data
        data.clear()  # the memory stays allocated, and its pages touched
        before = self.address
        (faiss.write_index_binary if binary else faiss.write_index)(index, self._writer)
        self._grown = self._grown or self.address != before
        view: npt.NDArray[np.uint8] = faiss.rev_swig_ptr(data.data(), data.size())
        return (view.data,)

    @property
    def address(self) -> int:
        """Where the memory is (0 before any); for tests: kept, not allocated again."""
        pointer = self._writer.data.data()  # None while the vector has no memory
        return 0 if pointer is None else int(pointer)


def serialized(index: Any, binary: bool, buffer: SnapshotBuffer | None = None
               ) -> tuple[memoryview, ...]:
    """The index as FAISS writes it: into `buffer`, or in the pieces FAISS writes, one copy.
    (A snapshot is taken with writes held. At 10,000,000 on SignIVF,
    faiss.serialize_index_binary, which grows one buffer and copies it out, took 1.1-1.5 s,
    joining it with the centroids another 2 s; the pieces take 0.4 s.)"""
    if buffer is not None:
        return buffer.serialized(index, binary)
    pieces: list[bytes] = []
    writer = faiss.PyCallbackIOWriter(pieces.append)  # type: ignore[attr-defined]  # not in the stubs
    (faiss.write_index_binary if binary else faiss.write_index)(index, writer)
    return tuple(memoryview(piece) for piece in pieces)


def _framed(payload: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8],
                                                     npt.NDArray[np.uint8]]:
    """The part after an 8-byte length, and the rest."""
    length = int.from_bytes(payload[:8].tobytes(), "little")
    if not 0 < length <= len(payload) - 8:
        raise ValueError(f"a part of {length} bytes in {len(payload)}")
    return payload[8:8 + length], payload[8 + length:]


TRAINED = (IVFIndex, BinaryIVFIndex, PartitionedIndex)


def search_parameters(index: VectorIndex, options: SearchOptions) -> str:
    """What a search of `index` with `options` uses, for the index status ("" if nothing)."""
    if isinstance(index, PartitionedIndex):
        nprobe = index.nprobe_for(options)
        if options.nprobe:
            return (f"nprobe={nprobe} (set; the build calibrated nprobe="
                    f"{index.calibration.nprobe}: {index.calibration.describe()})")
        return (f"nprobe={nprobe} "
                f"({index.calibration.describe(nprobe, options.calibration_target)})")
    if isinstance(index, BinaryIVFIndex):
        return f"nprobe={max(1, min(options.nprobe or DEFAULT_NPROBE, index.nlist))}"
    if isinstance(index, IVFIndex):
        return f"nprobe={options.nprobe or DEFAULT_NPROBE}"
    return ""


def load_index(path: Path, dimension: int, model_id: str) -> tuple[VectorIndex, int]:
    """Loads a checkpoint; returns the index and the change sequence it covers."""
    checkpoint = read_checkpoint(path)
    if checkpoint.model_id != model_id:
        raise CheckpointError(
            f"{path}: holds embeddings of model {checkpoint.model_id!r}, the server uses "
            f"{model_id!r}")
    index = _deserialize(path, checkpoint, dimension)
    if len(index) != checkpoint.vectors:
        raise CheckpointError(f"{path}: holds {len(index)} vectors, its header says "
                              f"{checkpoint.vectors}")
    return index, checkpoint.sequence


def _deserialize(path: Path, checkpoint: Checkpoint, dimension: int) -> VectorIndex:
    kind = checkpoint.kind
    payload = np.frombuffer(checkpoint.payload, dtype=np.uint8)
    for pattern, partitioned in ((SIGN_IVF, SignIVFIndex), (FAST_SCAN_IVF, FastScanIVFIndex)):
        if (lists := pattern.match(kind)) is None:
            continue
        try:
            return partitioned.deserialize(payload, dimension, int(lists.group(1)))
        except (RuntimeError, ValueError, MemoryError) as error:
            raise CheckpointError(f"{path}: holds no {kind} index FAISS can read "
                                  f"({error})") from error
    binary, binary_ivf = _BINARY.match(kind), _BINARY_IVF.match(kind)
    try:
        raw = (faiss.deserialize_index_binary(payload) if binary or binary_ivf
               else faiss.deserialize_index(payload))
    except (RuntimeError, MemoryError) as error:  # MemoryError: a damaged length
        raise CheckpointError(f"{path}: FAISS cannot read the index ({error})") from error
    expected_dimension = (int(binary.group(1)) if binary else SIGN_BITS if binary_ivf
                          else dimension)
    if raw.d != expected_dimension:
        raise CheckpointError(f"{path}: holds vectors of dimension {raw.d}, expected "
                              f"{expected_dimension}")
    if kind == FLAT and isinstance(raw, faiss.IndexIDMap2):
        return FlatIndex(dimension, raw)
    if binary and isinstance(raw, faiss.IndexBinaryIDMap2):
        return BinarySignIndex(dimension, int(binary.group(1)), raw)
    if binary_ivf and isinstance(raw, faiss.IndexBinaryIVF) and raw.is_trained \
            and raw.nlist == nlist_of(kind):
        return BinaryIVFIndex(dimension, raw.nlist, raw)
    if _IVF.match(kind) and not isinstance(raw, faiss.IndexIDMap2 | faiss.IndexBinaryIDMap2):
        return IVFIndex(kind, dimension, raw)
    raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a {kind} index")
