"""The vector index: derived from the store, rebuilt from it whenever in doubt.

`VectorIndex` is the interface the service uses; `FlatIndex` is exact inner-product
search (FAISS `IndexIDMap2` over `IndexFlatIP`) with int64 ids assigned by the store.
Searches run in parallel; changes take the index exclusively.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import numpy.typing as npt

from ._checkpoint import Checkpoint, read_checkpoint
from ._errors import CheckpointError
from ._rwlock import ReadWriteLock
from ._vectors import Matrix

Ids = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float32]


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

    def __len__(self) -> int: ...

    def add(self, ids: Ids, vectors: Matrix) -> None: ...

    def remove(self, ids: Ids) -> int: ...

    def search(self, queries: Matrix, k: int) -> list[tuple[Ids, Scores]]:
        """Per query: ids and scores of up to k neighbours, best first."""
        ...

    def snapshot(self, sequence: int, model_id: str) -> Checkpoint:
        """The serialised index, labelled as covering the store's changes up to `sequence`.

        Callers write it with `write_checkpoint` (temp file, fsync, rename) outside any lock.
        """
        ...


class FlatIndex:
    """Exact inner-product search over every stored vector."""

    kind = "Flat"
    exact = True

    def __init__(self, dimension: int, index: faiss.Index | None = None) -> None:
        self._index = index if index is not None else faiss.IndexIDMap2(
            faiss.IndexFlatIP(dimension)
        )
        self._lock = ReadWriteLock()

    @property
    def dimension(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: Ids, vectors: Matrix) -> None:
        if len(ids) == 0:
            return
        with self._lock.writing():
            self._index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32),
                np.ascontiguousarray(ids, dtype=np.int64),
            )

    def remove(self, ids: Ids) -> int:
        if len(ids) == 0:
            return 0
        with self._lock.writing():
            # faiss's Python wrapper turns an id array into an IDSelectorBatch.
            selection = np.ascontiguousarray(ids, dtype=np.int64)
            return int(self._index.remove_ids(selection))  # type: ignore[arg-type]

    def search(self, queries: Matrix, k: int) -> list[tuple[Ids, Scores]]:
        with self._lock.reading():
            if self._index.ntotal == 0:
                empty = (np.empty(0, np.int64), np.empty(0, np.float32))
                return [empty for _ in range(len(queries))]
            scores, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        found = ids >= 0
        return [(ids[row][found[row]], scores[row][found[row]]) for row in range(len(queries))]

    def snapshot(self, sequence: int, model_id: str) -> Checkpoint:
        # Under the read lock: searches go on, changes wait for the copy.
        with self._lock.reading():
            payload = faiss.serialize_index(self._index)
            vectors = int(self._index.ntotal)
        return Checkpoint(sequence, vectors, model_id, payload.data)

    @classmethod
    def load(cls, path: Path, dimension: int, model_id: str) -> tuple[FlatIndex, int]:
        """Loads a checkpoint; returns the index and the change sequence it covers."""
        checkpoint = read_checkpoint(path)
        if checkpoint.model_id != model_id:
            raise CheckpointError(
                f"{path}: holds embeddings of model {checkpoint.model_id!r}, the server uses "
                f"{model_id!r}")
        try:
            index = faiss.deserialize_index(np.frombuffer(checkpoint.payload, dtype=np.uint8))
        except RuntimeError as error:
            raise CheckpointError(f"{path}: FAISS cannot read the index ({error})") from error
        if index.d != dimension or index.ntotal != checkpoint.vectors:
            raise CheckpointError(
                f"{path}: holds {index.ntotal} vectors of dimension {index.d}, expected "
                f"{checkpoint.vectors} of dimension {dimension}"
            )
        if not isinstance(index, faiss.IndexIDMap2):
            raise CheckpointError(f"{path}: holds a {type(index).__name__}, not a Flat index")
        return cls(dimension, index), checkpoint.sequence
