"""The vector index: derived from the store, rebuilt from it whenever in doubt.

`VectorIndex` is the interface the service uses. The types, named by the string an operator
configures:
    Flat                 exact inner product (FAISS IndexIDMap2 over IndexFlatIP)
    IVF<n>,Flat / ,SQ8 / ,PQ<m> and OPQ<m>,IVF<n>,PQ<m>
                         FAISS index_factory strings of the IVF family; need training;
                         searched with a per-call nprobe (SearchParametersIVF)
    BinarySign512 / 256  sign bits of a fixed random rotation (IndexBinaryFlat, Hamming);
                         needs no training and keeps no cluster assumption
Only Flat scores are exact; every other type's candidates are re-ranked against the stored
float32 embeddings before a verdict. Searches run in parallel; changes take the index
exclusively. HNSW is not offered: FAISS cannot delete from it.
"""

from __future__ import annotations

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
ROTATION_SEED = 20191201  # fixed: the codes of a checkpoint depend on it


@dataclass(frozen=True)
class SearchOptions:
    """Per-call search parameters; passed to FAISS per call, never set on the shared index."""

    nprobe: int = 64


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
    if "HNSW" in kind:
        raise InvalidArgument(field, f"{kind!r}: HNSW is not supported, FAISS cannot delete "
                                     "from it and erasure must work on every index")
    raise InvalidArgument(field, f"{kind!r} is not a supported index type: use Flat, "
                                 "BinarySign512, BinarySign256, IVF<n>,Flat|SQ8|PQ<m> or "
                                 "OPQ<m>,IVF<n>,PQ<m>")


def training_size(kind: str) -> int:
    """Vectors needed to train `kind` (0 for types without training)."""
    match = _IVF.match(kind)
    if not match:
        return 0
    return 39 * int(match.group(4))  # FAISS's k-means wants ~39 points per centroid


def new_index(kind: str, dimension: int) -> VectorIndex:
    if kind == FLAT:
        return FlatIndex(dimension)
    if (binary := _BINARY.match(kind)) is not None:
        return BinarySignIndex(dimension, int(binary.group(1)))
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


class BinarySignIndex(_Locked):
    """Sign bits after a fixed random rotation, searched by Hamming distance.

    For unit vectors at cosine c the expected Hamming distance is bits * acos(c) / pi, so
    the codes keep the order that matters for duplicates without assuming any cluster
    structure; scores here are only -distance and are always re-ranked exactly.
    """

    exact = False

    def __init__(self, dimension: int, bits: int, index: Any = None) -> None:
        self.kind = f"BinarySign{bits}"
        self.bits = bits
        rng = np.random.default_rng(ROTATION_SEED)
        rotation, _ = np.linalg.qr(rng.standard_normal((dimension, dimension)))
        self._projection = np.ascontiguousarray(rotation[:, :bits], dtype=np.float32)
        super().__init__(index if index is not None
                         else faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(bits)), dimension)

    @property
    def bytes_per_vector(self) -> float:
        return self.bits / 8 + 16

    def encode(self, vectors: Matrix) -> npt.NDArray[np.uint8]:
        return np.packbits(np.asarray(vectors, np.float32) @ self._projection > 0, axis=1)

    def add(self, ids: Ids, vectors: Matrix) -> None:
        if len(ids) == 0:
            return
        codes = self.encode(vectors)
        with self._lock.writing():
            self._index.add_with_ids(codes, np.ascontiguousarray(ids, dtype=np.int64))

    def search(self, queries: Matrix, k: int, options: SearchOptions) -> list[tuple[Ids, Scores]]:
        codes = self.encode(queries)
        with self._lock.reading():
            if self._index.ntotal == 0:
                return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in queries]
            distances, ids = self._index.search(codes, k)
        return self._split(-distances.astype(np.float32), ids)

    def _serialize(self) -> npt.NDArray[np.uint8]:
        return faiss.serialize_index_binary(self._index)


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
    binary = _BINARY.match(kind)
    try:
        raw = (faiss.deserialize_index_binary(payload) if binary
               else faiss.deserialize_index(payload))
    except RuntimeError as error:
        raise CheckpointError(f"{path}: FAISS cannot read the index ({error})") from error
    expected_dimension = int(binary.group(1)) if binary else dimension
    if raw.d != expected_dimension:
        raise CheckpointError(f"{path}: holds vectors of dimension {raw.d}, expected "
                              f"{expected_dimension}")
    if kind == FLAT and isinstance(raw, faiss.IndexIDMap2):
        return FlatIndex(dimension, raw)
    if binary and isinstance(raw, faiss.IndexBinaryIDMap2):
        return BinarySignIndex(dimension, int(binary.group(1)), raw)
    if _IVF.match(kind) and not isinstance(raw, faiss.IndexIDMap2 | faiss.IndexBinaryIDMap2):
        return IVFIndex(kind, dimension, raw)
    raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a {kind} index")
