"""Registrations in the store's databases, inside one transaction: a registration's entries,
its lookups, the counters in meta and the change log."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from dedup.core.errors import StoreDamaged, StoreError, msisdn_taken, registration_id_taken
from dedup.core.records import DeleteKey, Registration, StoredFace
from dedup.core.vectors import Matrix, Vector
from dedup.gallery.embedded.lmdb_env import Databases, entries_with_prefix
from dedup.gallery.embedded.store_format import (
    ERASED_SINCE,
    FORMAT,
    MODEL_PREFIX,
    OP_ADD,
    OP_REMOVE,
    checked_vectors,
    decode_registration,
    encode_registration,
    from_u64,
    model_key,
    u64,
)
from dedup.gallery.embedded.store_records import RecordTables

VectorBatch = tuple[int, list[int], Matrix]  # (last key read, keys, their vectors)


@dataclass(frozen=True)
class Change:
    sequence: int
    op: bytes
    key: int


def vector_batches(read_batch: Callable[[int], VectorBatch], after: int = 0
                   ) -> Iterator[tuple[list[int], Matrix]]:
    """The batches `read_batch(after)` reads, each from the last key of the one before."""
    while True:
        last, keys, matrix = read_batch(after)
        if last == after:
            return
        if keys:
            yield keys, matrix
        after = last


class TableReader:
    """Reads registrations in one transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: Databases, where: Path, dimension: int
                 ) -> None:
        self.txn = txn
        self.dbs = dbs
        self.where = where  # the store's directory, for messages
        self.dimension = dimension

    def records(self) -> RecordTables:
        """The audit trail and adjudications, in the same transaction."""
        return RecordTables(self.txn, self.dbs)

    def meta(self, name: bytes) -> int:
        return from_u64(self.txn.get(name, db=self.dbs.meta))

    def model_counts(self) -> dict[str, int]:
        return {key.decode(): from_u64(value)
                for key, value in entries_with_prefix(self.txn, self.dbs.meta, MODEL_PREFIX)}

    def model_count(self, model_id: str) -> int:
        return from_u64(self.txn.get(model_key(model_id), db=self.dbs.meta, default=u64(0)))

    def erased_since(self) -> float | None:
        raw = self.txn.get(ERASED_SINCE, db=self.dbs.meta)
        return None if raw is None else float(struct.unpack(">d", raw)[0])

    def ensure_unique(self, registration: Registration) -> None:
        if self.txn.get(registration.registration_id.encode(), db=self.dbs.by_registration_id):
            raise registration_id_taken(registration.registration_id)
        if registration.msisdn and self.txn.get(registration.msisdn.encode(),
                                                db=self.dbs.by_msisdn):
            raise msisdn_taken(registration.msisdn)

    def keys_for(self, by: DeleteKey, value: str) -> list[int]:
        raw = value.encode()
        if by is DeleteKey.ID_NUMBER:
            cursor = self.txn.cursor(db=self.dbs.by_id_number)
            if not cursor.set_key(raw):
                return []
            return [from_u64(packed) for packed in cursor.iternext_dup()]
        db = self.dbs.by_registration_id if by is DeleteKey.REGISTRATION_ID else self.dbs.by_msisdn
        packed = self.txn.get(raw, db=db)
        return [] if packed is None else [from_u64(packed)]

    def load(self, key: int, with_vector: bool) -> StoredFace | None:
        packed = u64(key)
        raw = self.txn.get(packed, db=self.dbs.records)
        if raw is None:
            return None
        vector = None
        if with_vector:
            raw_vector = self.txn.get(packed, db=self.dbs.vectors)
            if raw_vector is None:
                raise StoreDamaged(f"{self.where}: the store is damaged: registration key {key} "
                                   "has no vector")
            vector = np.frombuffer(raw_vector, dtype=np.float32)
        return StoredFace(key, decode_registration(bytes(raw)), vector)

    def faces(self, keys: Iterable[int], with_vectors: bool) -> list[StoredFace]:
        """The stored faces for `keys`, in order; keys not stored are left out."""
        loaded = (self.load(int(key), with_vectors) for key in keys)
        return [face for face in loaded if face is not None]

    def changes_after(self, sequence: int) -> list[Change]:
        cursor = self.txn.cursor(db=self.dbs.changes)
        found = []
        if cursor.set_range(u64(sequence + 1)):
            for raw_sequence, value in cursor:
                found.append(
                    Change(from_u64(raw_sequence), bytes(value[:1]), from_u64(value[1:])))
        return found

    def vectors(self, packed_keys: list[bytes]) -> tuple[list[int], Matrix]:
        # One C-level multi-get and one buffer: a third of the time of a get per key.
        pairs = self.txn.cursor(db=self.dbs.vectors).getmulti(packed_keys)
        if not pairs:
            return [], np.empty((0, self.dimension), np.float32)
        found = np.frombuffer(b"".join(k for k, _ in pairs), dtype=">u8").astype(np.int64)
        matrix = np.frombuffer(b"".join(v for _, v in pairs), dtype=np.float32)
        keys = found.tolist()
        return keys, checked_vectors(keys, matrix.reshape(len(pairs), self.dimension), self.where)

    def vector_batch(self, after: int, batch: int, only_model: str | None) -> VectorBatch:
        """Up to `batch` vectors in key order from key `after` + 1 (of `only_model`'s, if
        given), with the last key read."""
        cursor = self.txn.cursor(db=self.dbs.vectors)
        keys, rows = [], []
        last = after
        if cursor.set_range(u64(after + 1)):
            for raw_key, raw_vector in cursor:
                last = from_u64(raw_key)
                if only_model is not None and self._model_of(last) != only_model:
                    continue
                keys.append(last)
                rows.append(np.frombuffer(raw_vector, dtype=np.float32))
                if len(keys) == batch:
                    break
        if not rows:
            return last, keys, np.empty((0, self.dimension), np.float32)
        return last, keys, checked_vectors(keys, np.vstack(rows), self.where)

    def _model_of(self, key: int) -> str:
        face = self.load(key, with_vector=False)
        return face.registration.embedding_model if face else ""


class TableWriter(TableReader):
    """Writes registrations in one write transaction; every change is logged."""

    def initialise_meta(self) -> None:
        """Writes a new store's metadata, or checks an existing store's format and dimension."""
        meta = self.dbs.meta
        stored_format = self.txn.get(b"format", db=meta)
        if stored_format is None:
            self.txn.put(b"format", u64(FORMAT), db=meta)
            self.txn.put(b"dimension", u64(self.dimension), db=meta)
            self.txn.put(b"next_key", u64(1), db=meta)
            self.txn.put(b"sequence", u64(0), db=meta)
            self.txn.put(b"distinct_id_numbers", u64(0), db=meta)
            return
        if from_u64(stored_format) != FORMAT:
            raise StoreError(
                f"{self.where}: store format {from_u64(stored_format)}, this dedup reads {FORMAT}")
        dimension = self.meta(b"dimension")
        if dimension != self.dimension:
            raise StoreError(f"{self.where}: holds {dimension}-d embeddings, server configured "
                             f"for {self.dimension}")

    def insert(self, registration: Registration, vector: Vector) -> StoredFace:
        self.ensure_unique(registration)
        key = self.meta(b"next_key")
        self.txn.put(b"next_key", u64(key + 1), db=self.dbs.meta)
        stored = Registration(
            registration_id=registration.registration_id,
            id_number=registration.id_number,
            msisdn=registration.msisdn,
            carrier=registration.carrier,
            region=registration.region,
            enrolled_at_us=time.time_ns() // 1000,
            embedding_model=registration.embedding_model,
            enrolled_by=registration.enrolled_by,
        )
        packed, dbs, txn = u64(key), self.dbs, self.txn
        id_number = stored.id_number.encode()
        if txn.get(id_number, db=dbs.by_id_number) is None:
            self._bump(b"distinct_id_numbers", +1)
        self._bump(model_key(stored.embedding_model), +1)
        txn.put(packed, encode_registration(stored), db=dbs.records)
        txn.put(packed, np.ascontiguousarray(vector, np.float32).tobytes(), db=dbs.vectors)
        txn.put(stored.registration_id.encode(), packed, db=dbs.by_registration_id)
        txn.put(id_number, packed, db=dbs.by_id_number)
        if stored.msisdn:
            txn.put(stored.msisdn.encode(), packed, db=dbs.by_msisdn)
        self._log_change(OP_ADD, key)
        return StoredFace(key, stored, vector)

    def delete(self, by: DeleteKey, value: str) -> list[StoredFace]:
        """Deletes every registration under one key; returns them."""
        deleted = []
        for key in self.keys_for(by, value):
            face = self.load(key, with_vector=False)
            if face is not None:
                self._delete_one(face)
                deleted.append(face)
        if deleted and self.txn.get(ERASED_SINCE, db=self.dbs.meta) is None:
            # Compaction will overwrite the freed pages; until then they hold old bytes.
            self.txn.put(ERASED_SINCE, struct.pack(">d", time.time()), db=self.dbs.meta)
        return deleted

    def _delete_one(self, face: StoredFace) -> None:
        packed, dbs, txn = u64(face.key), self.dbs, self.txn
        registration = face.registration
        id_number = registration.id_number.encode()
        txn.delete(packed, db=dbs.records)
        txn.delete(packed, db=dbs.vectors)
        txn.delete(registration.registration_id.encode(), db=dbs.by_registration_id)
        txn.delete(id_number, packed, db=dbs.by_id_number)
        if txn.get(id_number, db=dbs.by_id_number) is None:
            self._bump(b"distinct_id_numbers", -1)
        self._bump(model_key(registration.embedding_model), -1)
        if registration.msisdn:
            txn.delete(registration.msisdn.encode(), db=dbs.by_msisdn)
        self._log_change(OP_REMOVE, face.key)

    def truncate_changes(self, through: int) -> int:
        removed = 0
        cursor = self.txn.cursor(db=self.dbs.changes)
        while cursor.first() and from_u64(cursor.key()) <= through:
            cursor.delete()
            removed += 1
        return removed

    def _bump(self, name: bytes, delta: int) -> None:
        value = from_u64(self.txn.get(name, db=self.dbs.meta, default=u64(0))) + delta
        if value:
            self.txn.put(name, u64(value), db=self.dbs.meta)
        else:
            self.txn.delete(name, db=self.dbs.meta)

    def _log_change(self, op: bytes, key: int) -> None:
        sequence = self.meta(b"sequence") + 1
        self.txn.put(b"sequence", u64(sequence), db=self.dbs.meta)
        self.txn.put(u64(sequence), op + u64(key), db=self.dbs.changes)
