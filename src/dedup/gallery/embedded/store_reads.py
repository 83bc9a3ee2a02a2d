"""The read side of the store: lookups, vectors, the change log, the audit trail and
adjudications, consistent snapshots, verification and copies (Store adds the writes)."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np
import numpy.typing as npt

from dedup.core.records import DeleteKey, Registration, StoredFace
from dedup.core.settings import StoreConfig
from dedup.core.vectors import Matrix, Vector
from dedup.gallery.embedded.layout import store_dir, vector_file
from dedup.gallery.embedded.lmdb_env import LmdbEnv, StoreUsage
from dedup.gallery.embedded.store_copy import StoreCopy, copy_store
from dedup.gallery.embedded.store_open import open_for_reading
from dedup.gallery.embedded.store_tables import (
    TableReader,
    TableWriter,
    present,
    vector_batches,
)
from dedup.gallery.embedded.store_verify import VectorCheck, check_vectors, verify
from dedup.gallery.embedded.stored_vectors import rows_in_place, stored_rows
from dedup.gallery.embedded.vector_file import Keys, VectorFile

_T = TypeVar("_T")
_Tables = TypeVar("_Tables", TableReader, TableWriter)


class ReadableStore:
    """Reads the store in `<data_dir>/store/`, each call in its own read transaction; the
    embeddings from the vector file beside LMDB."""

    def __init__(self, config: StoreConfig, readonly: bool) -> None:
        self.config = config
        self.readonly = readonly
        self.path = store_dir(config.data_dir)
        self.vector_path = vector_file(config.data_dir)
        self._lmdb = LmdbEnv(self.path, config, readonly)
        try:
            self._slots = self._open_slots()
        except BaseException:
            self._lmdb.close()
            raise

    def _open_slots(self) -> VectorFile:
        return open_for_reading(self._lmdb, self.vector_path, self.config.dimension)

    def _tables(self, txn: lmdb.Transaction, kind: type[_Tables]) -> _Tables:
        return kind(txn, self._lmdb.dbs, self.path, self._slots, self._lmdb.peek)

    def _read(self, work: Callable[[TableReader], _T]) -> _T:
        return self._lmdb.read(lambda txn: work(self._tables(txn, TableReader)))

    # -- the store as a whole --------------------------------------------------------

    def verify(self, progress: Callable[[int], object] = lambda done: None) -> list[str]:
        """Reads every record and its lookups in one snapshot; returns what is inconsistent."""
        return self._read(lambda tables: verify(tables, progress))

    def check_vectors(self, progress: Callable[[int], object] = lambda done: None
                      ) -> VectorCheck:
        """Reads every slot of the vector file up to the last key assigned: each stored
        registration's a unit vector, each erased one's zeros (see store_verify)."""
        return self._read(lambda tables: check_vectors(tables, progress))

    @property
    def legacy_format(self) -> bool:
        """True for a store of format 1 opened read-only: its embeddings are still in LMDB,
        and cannot be read until it is upgraded."""
        return not self._slots.available

    def record_keys(self) -> Keys:
        """Every stored registration's key, ascending."""
        return self._read(TableReader.record_keys)

    def erased_since(self) -> float | None:
        """When the first erasure not yet compacted away was made (Unix time), if any."""
        return self._read(TableReader.erased_since)

    def copy_to(self, directory: Path) -> StoreCopy:
        """LMDB's compacting copy and the vector file's slots, consistent as of one read
        transaction, into `directory`; fsynced (see store_copy)."""
        return copy_store(self._lmdb, self._slots, directory)

    def usage(self) -> StoreUsage:
        return self._lmdb.usage()

    def vector_file_bytes(self) -> tuple[int, int]:
        """The vector file's size, and the bytes it takes on disk (it is sparse)."""
        return self._slots.disk_bytes()

    def close(self) -> None:
        self._slots.close()
        self._lmdb.close()

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """One read transaction: a consistent view of the whole store, for as long as needed.

        While it is open LMDB cannot reuse pages freed by later writes, so the file grows
        with the changes made meanwhile; it is meant for rebuilds, not for the hot path.
        """
        with self._lmdb.read_txn() as txn:
            yield Snapshot(self._tables(txn, TableReader))

    # -- registrations ---------------------------------------------------------------

    def get(self, registration_id: str) -> Registration | None:
        def get(tables: TableReader) -> Registration | None:
            keys = tables.keys_for(DeleteKey.REGISTRATION_ID, registration_id)
            face = tables.load(keys[0]) if keys else None
            return face.registration if face else None

        return self._read(get)

    def keys_of(self, registration_id: str) -> list[int]:
        return self._read(
            lambda tables: tables.keys_for(DeleteKey.REGISTRATION_ID, registration_id))

    def exists(self, registration_id: str) -> bool:
        return bool(self.keys_of(registration_id))

    def msisdn_taken(self, msisdn: str) -> bool:
        return bool(self._read(lambda tables: tables.keys_for(DeleteKey.MSISDN, msisdn)))

    def faces(self, keys: Iterable[int], with_vectors: bool) -> list[StoredFace]:
        """The stored faces for `keys`, in order; keys deleted meanwhile are left out."""
        return self._read(lambda tables: tables.faces(keys, with_vectors))

    def faces_of_id_number(self, id_number: str) -> list[StoredFace]:
        """Every registration under an ID number, with vectors, for 1:1 comparison."""
        return self._read(lambda tables: tables.faces(
            tables.keys_for(DeleteKey.ID_NUMBER, id_number), with_vectors=True))

    def count(self) -> int:
        return self._read(lambda tables: int(tables.txn.stat(tables.dbs.records)["entries"]))

    def distinct_id_numbers(self) -> int:
        return self._read(lambda tables: tables.meta(b"distinct_id_numbers"))

    def model_counts(self) -> dict[str, int]:
        """Registrations per embedding model."""
        return self._read(TableReader.model_counts)

    # -- vectors and the change log --------------------------------------------------

    def vectors(self, keys: Iterable[int] | npt.NDArray[np.int64]) -> tuple[list[int], Matrix]:
        """The stored vectors of those `keys` that still exist (the re-ranking hot path: an
        index into the vector file's map; LMDB is read only for a slot that is not a unit
        vector)."""
        return stored_rows(self._slots, np.fromiter(keys, dtype=np.int64), self._still_stored)

    def vectors_in_place(self, keys: npt.NDArray[np.int64]
                         ) -> tuple[Matrix, npt.NDArray[np.bool_]]:
        """A row for each of `keys` in their shape, and which hold a stored embedding (see
        stored_vectors.rows_in_place): many candidates scored at once, with no regrouping."""
        return rows_in_place(self._slots, keys, self._still_stored)

    def _still_stored(self, keys: list[int]) -> set[int]:
        return self._lmdb.read(lambda txn: present(txn, self._lmdb.dbs, keys))

    def iter_vectors(self, batch: int = 10_000, only_model: str | None = None, after: int = 0
                     ) -> Iterator[tuple[list[int], Matrix]]:
        """Stored vectors in key order from key `after` + 1, in batches, each batch from its
        own snapshot. With `only_model`, just the vectors that model made (slower: reads
        each record).
        """
        def read_batch(after: int) -> tuple[int, list[int], Matrix]:
            return self._read(functools.partial(
                TableReader.vector_batch, after=after, batch=batch, only_model=only_model))

        return vector_batches(read_batch, after)

    def assigned(self) -> int:
        """The last key assigned (erased registrations' included)."""
        return self._read(lambda tables: tables.meta(b"next_key")) - 1

    def sequence(self) -> int:
        return self._read(lambda tables: tables.meta(b"sequence"))

    def change_log(self, sequence: int) -> tuple[npt.NDArray[np.uint8], Keys, int]:
        """The ops and keys of the logged changes after `sequence` (TableReader.change_log),
        and the store's current sequence, read in one transaction.

        The log is truncated behind each checkpoint, so a caller holding an older
        checkpoint sees fewer changes than the sequences span and must rebuild instead.
        """
        def read(tables: TableReader) -> tuple[npt.NDArray[np.uint8], Keys, int]:
            return (*tables.change_log(sequence), tables.meta(b"sequence"))

        return self._read(read)

    # -- the audit trail and adjudications -------------------------------------------

    def audit_head(self) -> tuple[int, bytes]:
        return self._read(lambda tables: tables.records().audit_head())

    def audit_records(self) -> Iterator[tuple[int, bytes]]:
        """(sequence, record) in key order, read in one snapshot."""
        return iter(self._read(lambda tables: tables.records().audit_records()))

    def audit_trail(self) -> tuple[list[tuple[int, bytes]], tuple[int, bytes]]:
        """The records and the head kept beside them, read in one snapshot."""
        return self._read(lambda tables: (tables.records().audit_records(),
                                          tables.records().audit_head()))

    def settled(self, party: int | str) -> dict[int, bytes]:
        """The key of every enrolled registration settled with `party` (a registration's
        key, or an application's registration_id) -> the record."""
        return self._read(lambda tables: tables.records().settled(party))

    def settlements(self) -> list[tuple[int | str, int, bytes]]:
        """Every settled pair once: (a party, an enrolled registration's key, the record)."""
        return self._read(lambda tables: tables.records().settlements())

    def adjudications(self) -> list[bytes]:
        """Every settled pair's record, once."""
        return self._read(lambda tables: tables.records().adjudications())


class Snapshot:
    """A consistent read-only view of the store (see ReadableStore.snapshot)."""

    OVERSAMPLE = 4

    def __init__(self, tables: TableReader) -> None:
        self._tables = tables
        self.sequence = tables.meta(b"sequence")

    def count(self, model_id: str) -> int:
        return self._tables.model_count(model_id)

    def vectors(self, batch: int, only_model: str | None) -> Iterator[tuple[list[int], Matrix]]:
        return vector_batches(
            lambda after: self._tables.vector_batch(after, batch, only_model))

    def same_id_pairs(self, limit: int, only_model: str | None, seed: int, min_score: float
                      ) -> tuple[Matrix, list[int]]:
        """Up to `limit` pairs of registrations under one ID number that score at least
        `min_score` with each other (with `only_model`, among that model's embeddings
        only): the first registrations' vectors, and their partners' keys. The ID numbers
        are drawn evenly from all that have several registrations (reservoir sampling
        over one pass, OVERSAMPLE times `limit` of them: not every one holds such a pair)."""
        rng = random.Random(seed)
        groups: list[list[int]] = []
        wanted = self.OVERSAMPLE * limit
        for seen, keys in enumerate(self._tables.id_number_groups(), start=1):
            if len(groups) < wanted:
                groups.append(keys)
            elif (slot := rng.randrange(seen)) < wanted:
                groups[slot] = keys
        rng.shuffle(groups)  # a reservoir that never filled up is in ID-number order
        chosen: list[tuple[Vector, int]] = []
        for keys in groups:
            if only_model is not None:
                keys = [key for key in keys if self._embedded_by(key, only_model)]
            if len(chosen) < limit and (pair := self._matching_pair(keys, min_score)):
                chosen.append(pair)
        vectors = np.array([vector for vector, _ in chosen], np.float32)
        return vectors.reshape(-1, self._tables.dimension), [key for _, key in chosen]

    def _matching_pair(self, keys: list[int], min_score: float) -> tuple[Vector, int] | None:
        """The first of `keys` (among the first 8 still stored) scoring at least `min_score`
        with a later one: its vector and the later one's key."""
        found, matrix = self._tables.stored_vectors(keys[:8])  # erased since: left out
        for i in range(len(found)):
            for j in range(i + 1, len(found)):
                if float(matrix[i] @ matrix[j]) >= min_score:
                    return matrix[i], found[j]
        return None

    def _embedded_by(self, key: int, model_id: str) -> bool:
        face = self._tables.load(key)
        return face is not None and face.registration.embedding_model == model_id

    def sample(self, size: int, model_id: str, only_model: str | None) -> Matrix:
        """About `size` vectors spread evenly over the store (every n-th), for training.

        Only the sampled vectors are read (a full pass over the vector file of 10,000,000
        registrations, 20 GB, took minutes here), unless other models' embeddings have to
        be told apart.
        """
        if only_model is None:
            keys = self._tables.record_keys()
            chosen = keys[::max(1, len(keys) // max(1, size))][:size]
            return self._tables.stored_vectors(chosen.tolist())[1]
        stride = max(1, self.count(model_id) // max(1, size))
        rows = []
        for _, matrix in self.vectors(20_000, only_model):
            rows.append(matrix[::stride].copy())  # a view would keep the whole batch
        if not rows:
            return np.empty((0, self._tables.dimension), np.float32)
        return np.vstack(rows)[:size]
