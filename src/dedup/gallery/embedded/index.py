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
Only Flat scores are exact; every other type's candidates are re-ranked against the stored
float32 embeddings before a verdict. Searches run in parallel; changes take the index
exclusively. HNSW is not offered: FAISS cannot delete from it.

What "auto" serves (index_plan.kind_for): Flat below IndexConfig.auto_threshold (200,000),
BinarySign512 from there on, at every size. benchmarks/ann_binary.py at 1,000,000 registrations
of each synthetic variant (iso / uneven / clustered), duplicate recall (probes whose exact
matches >= 0.40 all come back after the re-rank), q/s on one thread, batch 1, shared machine:
    BinarySign512, re-rank 16, 64 or 256: recall 1.000 on all three, 240-460 q/s
    BinaryIVF1024, nprobe 512 (half the codes): 0.83 / 0.98 / 0.92, 220-420 q/s
    BinaryIVF2048, nprobe 1024 (half the codes): 0.88 / 0.98 / 0.95, 190-280 q/s
    multi-index hashing (32x16 or 64x8 bits): recall 0.02-0.04, or 0.95 at 5-12 q/s
Same-person captures score 0.4-0.8, far from near-duplicates: no partition of the codes finds
them without searching most of it, so binary IVF never reaches 0.995 faster than the flat scan
and "auto" never chooses it. At 10,000,000 codes the flat scan did 33 q/s (60 in batches).
Float IVF fares no better (benchmarks/ivf_at_scale.py): IVF4096,PQ64 with an exact re-rank
found 0.64 of the other-ID matches (0.60 of the own-ID ones) at nprobe 64 of 10,000,000
isotropic registrations, and on the uneven and clustered variants at 1,000,000 it stays
under 0.995 (0.994) even at nprobe 256, a sixteenth of the gallery.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
import numpy.typing as npt

from dedup.core.errors import CheckpointError, FailedPrecondition, InvalidArgument
from dedup.core.rwlock import ReadWriteLock
from dedup.core.vectors import Matrix
from dedup.gallery.embedded.checkpoint import Checkpoint, read_checkpoint

Ids = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float32]
FLAT = "Flat"
AUTO = "auto"
BINARY_DEFAULT = "BinarySign512"
_IVF = re.compile(r"^(OPQ(\d+)(_\d+)?,)?IVF(\d+),(Flat|SQ8|SQ4|SQfp16|PQ(\d+)(x\d+)?)$")
_BINARY = re.compile(r"^BinarySign(256|512)$")
_BINARY_IVF = re.compile(r"^BinaryIVF([1-9]\d{0,6})$")
ROTATION_SEED = 20191201  # fixed: the codes of a checkpoint depend on it
SIGN_BITS = 512  # the code length of the binary IVF
MAX_NLIST = 1 << 20


@dataclass(frozen=True)
class SearchOptions:
    """Per-call search parameters; passed to FAISS per call, never set on the shared index.

    `nprobe`: inverted lists searched (IVF and BinaryIVF types); `rerank_candidates`: how many
    candidates of an approximate index are re-scored exactly from the stored vectors.
    """

    nprobe: int = 64
    rerank_candidates: int = 64


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

    def snapshot(self, sequence: int, model_id: str) -> Checkpoint:
        """The serialised index, labelled as covering the store's changes up to `sequence`.

        Callers write it with `write_checkpoint` (temp file, fsync, rename) outside any lock.
        """
        ...


def validate_kind(kind: str, field: str = "index_factory") -> str:
    """The canonical name of an index type, or InvalidArgument naming what is supported."""
    if kind in (FLAT, AUTO) or _IVF.match(kind) or _BINARY.match(kind):
        return kind
    if (binary_ivf := _BINARY_IVF.match(kind)) is not None:
        if int(binary_ivf.group(1)) > MAX_NLIST:
            raise InvalidArgument(field, f"{kind!r}: at most {MAX_NLIST:,} lists")
        return kind
    if "HNSW" in kind:
        raise InvalidArgument(field, f"{kind!r}: HNSW is not supported, FAISS cannot delete "
                                     "from it and erasure must work on every index")
    raise InvalidArgument(field, f"{kind!r} is not a supported index type: use Flat, "
                                 "BinarySign512, BinarySign256, BinaryIVF<n>, "
                                 "IVF<n>,Flat|SQ8|PQ<m> or OPQ<m>,IVF<n>,PQ<m>")


def nlist_of(kind: str) -> int:
    """The inverted lists of an IVF or BinaryIVF type; 0 for the others."""
    if (match := _IVF.match(kind)) is not None:
        return int(match.group(4))
    if (binary_ivf := _BINARY_IVF.match(kind)) is not None:
        return int(binary_ivf.group(1))
    return 0


def training_size(kind: str) -> int:
    """Vectors needed to train `kind` (0 for types without training)."""
    return 39 * nlist_of(kind)  # FAISS's k-means wants ~39 points per centroid


def new_index(kind: str, dimension: int) -> VectorIndex:
    if kind == FLAT:
        return FlatIndex(dimension)
    if (binary := _BINARY.match(kind)) is not None:
        return BinarySignIndex(dimension, int(binary.group(1)))
    if (binary_ivf := _BINARY_IVF.match(kind)) is not None:
        return BinaryIVFIndex(dimension, int(binary_ivf.group(1)))
    if _IVF.match(kind):
        return IVFIndex(kind, dimension)
    raise InvalidArgument("index_factory", f"{kind!r} is not a concrete index type")


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

    def _serialize(self) -> npt.NDArray[np.uint8]:
        return faiss.serialize_index(self._index)

    def snapshot(self, sequence: int, model_id: str) -> Checkpoint:
        # Under the read lock: searches go on, changes wait for the copy.
        with self._lock.reading():
            payload = self._serialize()
            vectors = int(self._index.ntotal)
        return Checkpoint(sequence, vectors, model_id, payload.data, kind=self.kind)

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
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                     np.ascontiguousarray(ids, dtype=np.int64))

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        with self._lock.reading():
            if self._index.ntotal == 0:
                return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in queries]
            scores, ids = self._index.search(np.ascontiguousarray(queries, np.float32), k)
        return self._split(scores, ids)


class IVFIndex(_Locked):
    """A trained FAISS IVF index (Flat, SQ or PQ codes, optionally after OPQ)."""

    exact = False

    def __init__(self, kind: str, dimension: int, index: Any = None) -> None:
        self.kind = kind
        super().__init__(index if index is not None else faiss.index_factory(
            dimension, kind, faiss.METRIC_INNER_PRODUCT), dimension)

    @property
    def bytes_per_vector(self) -> float:
        ivf = faiss.extract_index_ivf(self._index)
        return float(ivf.code_size) + 8  # the code and its id in the inverted list

    def train(self, sample: Matrix) -> None:
        needed = training_size(self.kind)
        if len(sample) < needed:
            raise FailedPrecondition(
                f"index_factory: {self.kind} needs at least {needed:,} training vectors, "
                f"the store holds {len(sample):,}")
        with self._lock.writing():
            self._index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, ids: Ids, vectors: Matrix) -> None:
        if len(ids) == 0:
            return
        with self._lock.writing():
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                     np.ascontiguousarray(ids, dtype=np.int64))

    def _params(self, options: SearchOptions) -> Any:
        ivf_params = faiss.SearchParametersIVF()
        ivf_params.nprobe = options.nprobe
        if isinstance(self._index, faiss.IndexPreTransform):
            params = faiss.SearchParametersPreTransform()
            params.index_params = ivf_params
            return params, ivf_params  # keep the inner object alive during the call
        return ivf_params, None

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        params, _keep = self._params(options)
        with self._lock.reading():
            if self._index.ntotal == 0:
                return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in queries]
            scores, ids = self._index.search(np.ascontiguousarray(queries, np.float32), k,
                                             params=params)
        return self._split(scores, ids)


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
                return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in queries]
            distances, ids = self._index.search(codes, k, params=params)
        return self._split(-distances.astype(np.float32), ids)

    def _serialize(self) -> npt.NDArray[np.uint8]:
        return faiss.serialize_index_binary(self._index)


class BinarySignIndex(_SignCoded):
    """Every code scanned (IndexBinaryFlat): no training, no cluster assumption."""

    def __init__(self, dimension: int, bits: int, index: Any = None) -> None:
        self.kind = f"BinarySign{bits}"
        super().__init__(dimension, bits, index if index is not None
                         else faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(bits)))

    @property
    def bytes_per_vector(self) -> float:
        return self.bits / 8 + 16

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        return self._search_codes(queries, k, None)


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
        needed = training_size(self.kind)
        if len(sample) < needed:
            raise FailedPrecondition(
                f"index_factory: {self.kind} needs at least {needed:,} training vectors, "
                f"the store holds {len(sample):,}")
        codes = self.encode(sample)
        with self._lock.writing():
            self._index.train(codes)

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        params = faiss.SearchParametersIVF()
        params.nprobe = max(1, min(options.nprobe, self.nlist))
        return self._search_codes(queries, k, params)


TRAINED = (IVFIndex, BinaryIVFIndex)


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
    binary, binary_ivf = _BINARY.match(kind), _BINARY_IVF.match(kind)
    try:
        raw = (faiss.deserialize_index_binary(payload) if binary or binary_ivf
               else faiss.deserialize_index(payload))
    except RuntimeError as error:
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
