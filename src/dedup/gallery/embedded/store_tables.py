"""Registrations in the store's databases, inside one transaction: a registration's entries,
its lookups, the counters in meta and the change log; its embedding in the vector file."""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import numpy.typing as npt

from dedup.core.errors import StoreError, msisdn_taken, registration_id_taken
from dedup.core.records import DeleteKey, Registration, StoredFace
from dedup.core.vectors import Matrix, Vector
from dedup.gallery.embedded.lmdb_env import Databases, entries_with_prefix
from dedup.gallery.embedded.store_format import (
    ERASED_SINCE,
    MODEL_PREFIX,
    OP_ADD,
    OP_REMOVE,
    decode_registration,
    encode_registration,
    from_u64,
    logged_changes,
    model_key,
    u64,
)
from dedup.gallery.embedded.store_records import RecordTables
from dedup.gallery.embedded.stored_vectors import stored_rows
from dedup.gallery.embedded.vector_file import Keys, VectorFile

VectorBatch = tuple[int, list[int], Matrix]  # (last key read, keys, their vectors)
# A read transaction of its own, seeing the latest commit, and its databases (LmdbEnv.peek).
Peek = Callable[[], AbstractContextManager[tuple[lmdb.Transaction, Databases]]]
_KEYS_AT_ONCE = 1 << 16


def present(txn: lmdb.Transaction, dbs: Databases, keys: list[int]) -> set[int]:
    """Those of `keys` that have a record in `txn`."""
    return {key for key in keys if txn.get(u64(key), db=dbs.records) is not None}


def record_keys(txn: lmdb.Transaction, records: Any, through: int | None = None) -> Keys:
    """The keys of the records in `txn`'s table `records` (up to `through`), in increasing
    order, read _KEYS_AT_ONCE at a time."""
    keys = txn.cursor(db=records).iternext(keys=True, values=False)
    chunks: list[Keys] = []
    for chunk in iter(lambda: list(itertools.islice(keys, _KEYS_AT_ONCE)), []):
        if any(len(key) != 8 for key in chunk):
            raise StoreError("the store is damaged: a record's key is not 8 bytes")
        chunks.append(np.frombuffer(b"".join(chunk), dtype=">u8").astype(np.int64))
        if through is not None and chunks[-1][-1] > through:
            break
    found = np.concatenate(chunks) if chunks else np.empty(0, np.int64)
    return found if through is None else found[:np.searchsorted(found, through, "right")]


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

    def __init__(self, txn: lmdb.Transaction, dbs: Databases, where: Path, slots: VectorFile,
                 peek: Peek) -> None:
        self.txn = txn
        self.dbs = dbs
        self.where = where  # the store's directory, for messages
        self.slots = slots
        self.dimension = slots.dimension
        self._peek = peek

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

    def id_number_groups(self) -> Iterator[list[int]]:
        """The keys of each ID number that has several registrations, in ID-number order."""
        cursor = self.txn.cursor(db=self.dbs.by_id_number)
        found = cursor.first()
        while found:
            if cursor.count() > 1:
                yield [from_u64(packed) for packed in cursor.iternext_dup()]
            found = cursor.next_nodup()

    def load(self, key: int) -> StoredFace | None:
        """The registration under `key`, without its embedding."""
        raw = self.txn.get(u64(key), db=self.dbs.records)
        return None if raw is None else StoredFace(key, decode_registration(bytes(raw)), None)

    def faces(self, keys: Iterable[int], with_vectors: bool) -> list[StoredFace]:
        """The stored faces for `keys`, in order; keys not stored are left out (with
        `with_vectors`, also those whose slot a Delete committed since has zeroed)."""
        loaded = [face for face in (self.load(int(key)) for key in keys) if face is not None]
        if not with_vectors or not loaded:
            return loaded
        found, matrix = self.stored_vectors([face.key for face in loaded])
        vectors = dict(zip(found, matrix, strict=True))
        return [StoredFace(face.key, face.registration, vectors[face.key]) for face in loaded
                if face.key in vectors]

    def stored_vectors(self, keys: list[int]) -> tuple[list[int], Matrix]:
        """The embeddings of those `keys` that are stored now (see stored_vectors.py)."""
        return stored_rows(self.slots, np.asarray(keys, np.int64), self.still_stored)

    def still_stored(self, keys: list[int]) -> set[int]:
        """Those of `keys` whose record is stored as of the latest commit, which this
        transaction may predate."""
        with self._peek() as (current, dbs):
            return present(current, dbs, keys)

    def record_keys(self) -> Keys:
        """Every stored registration's key, in increasing order."""
        return record_keys(self.txn, self.dbs.records)

    def erased_keys(self) -> Keys:
        """Every key assigned that has no record (its registration was erased)."""
        # A mask, not a set difference: at 10,000,000 keys one byte a key (10 MB) beside the
        # record keys, where np.setdiff1d sorted 160 MB of them together.
        assigned = self.meta(b"next_key") - 1
        erased = np.ones(assigned + 1, np.bool_)
        erased[0] = False
        keys = self.record_keys()
        erased[keys[keys <= assigned]] = False  # one past it is damage, for doctor to find
        return np.flatnonzero(erased).astype(np.int64)

    def change_log(self, sequence: int) -> tuple[npt.NDArray[np.uint8], Keys]:
        """The op and the key of each logged change after `sequence` (logged_changes)."""
        return logged_changes(self.txn, self.dbs.changes, sequence, self.where)

    def oldest_removals(self, through: int, most: int) -> list[int]:
        """The keys removed by the oldest `most` change-log entries up to `through` (those
        truncate_changes would drop)."""
        keys, seen = [], 0
        cursor = self.txn.cursor(db=self.dbs.changes)
        found = cursor.first()
        while found and seen < most and from_u64(cursor.key()) <= through:
            value = cursor.value()
            if value[:1] == OP_REMOVE:
                keys.append(from_u64(value[1:]))
            seen += 1
            found = cursor.next()
        return keys

    def vector_batch(self, after: int, batch: int, only_model: str | None) -> VectorBatch:
        """Up to `batch` vectors in key order from key `after` + 1 (of `only_model`'s, if
        given), with the last key read."""
        cursor = self.txn.cursor(db=self.dbs.records)
        keys = []
        last = after
        if cursor.set_range(u64(after + 1)):
            for raw_key, raw in cursor:
                last = from_u64(raw_key)
                if only_model is not None and \
                        decode_registration(bytes(raw)).embedding_model != only_model:
                    continue
                keys.append(last)
                if len(keys) == batch:
                    break
        return (last, *self.stored_vectors(keys))


class TableWriter(TableReader):
    """Writes registrations in one write transaction; every change is logged. The embeddings
    of new registrations wait in `new_vectors` for the store to write them into their slots
    before the transaction commits."""

    def __init__(self, txn: lmdb.Transaction, dbs: Databases, where: Path, slots: VectorFile,
                 peek: Peek) -> None:
        super().__init__(txn, dbs, where, slots, peek)
        self.new_vectors: list[tuple[int, Vector]] = []

    def still_stored(self, keys: list[int]) -> set[int]:
        return present(self.txn, self.dbs, keys)  # this transaction is the latest

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
            quality=registration.quality,
            client_quality=registration.client_quality,
        )
        packed, dbs, txn = u64(key), self.dbs, self.txn
        id_number = stored.id_number.encode()
        if txn.get(id_number, db=dbs.by_id_number) is None:
            self._bump(b"distinct_id_numbers", +1)
        self._bump(model_key(stored.embedding_model), +1)
        self._append(packed, encode_registration(stored), dbs.records)
        self.new_vectors.append((key, vector))
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
            face = self.load(key)
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
        txn.delete(packed, db=dbs.records)  # the store zeroes its slot after the commit
        txn.delete(registration.registration_id.encode(), db=dbs.by_registration_id)
        txn.delete(id_number, packed, db=dbs.by_id_number)
        if txn.get(id_number, db=dbs.by_id_number) is None:
            self._bump(b"distinct_id_numbers", -1)
        self._bump(model_key(registration.embedding_model), -1)
        if registration.msisdn:
            txn.delete(registration.msisdn.encode(), db=dbs.by_msisdn)
        self._log_change(OP_REMOVE, face.key)

    def truncate_changes(self, through: int, most: int) -> int:
        """Drops up to `most` of the oldest change-log entries up to `through`; returns how
        many it dropped."""
        removed = 0
        cursor = self.txn.cursor(db=self.dbs.changes)
        while removed < most and cursor.first() and from_u64(cursor.key()) <= through:
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
        self._append(u64(sequence), op + u64(key), self.dbs.changes)

    def _append(self, key: bytes, value: bytes, db: Any) -> None:
        """Puts an entry whose key is above every other in `db` (keys and sequences only
        grow): appended, pages fill up instead of splitting in half."""
        if not self.txn.put(key, value, db=db, append=True):
            raise StoreError(f"{self.where}: the store is damaged: entry {key.hex()} is not "
                             "above the last one")
