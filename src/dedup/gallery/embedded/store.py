"""The LMDB store: the durable source of truth.

Named databases in one environment (`<data_dir>/store/`), listed in lmdb_env.Databases.
Every change is one transaction committed with sync on, so an acknowledged write is on
disk. Keys are int64, assigned in increasing order and never reused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb

from dedup.core.audit_chain import AuditMaker, RecordMaker
from dedup.core.errors import StoreError
from dedup.core.records import DeleteKey, Registration, StoredFace
from dedup.core.settings import StoreConfig
from dedup.core.vectors import Vector
from dedup.gallery.embedded import compaction
from dedup.gallery.embedded.lmdb_env import StoreUsage
from dedup.gallery.embedded.store_format import OP_ADD, OP_REMOVE
from dedup.gallery.embedded.store_reads import ReadableStore, Snapshot
from dedup.gallery.embedded.store_tables import Change, TableWriter

__all__ = ["OP_ADD", "OP_REMOVE", "Change", "Snapshot", "Store", "StoreUsage"]

_T = TypeVar("_T")


class Store(ReadableStore):
    """Registrations and their embeddings in LMDB, with secondary lookups and a change log."""

    def __init__(self, config: StoreConfig, readonly: bool = False) -> None:
        super().__init__(config, readonly)
        if not readonly:
            try:
                self._write(TableWriter.initialise_meta)
                self._write(lambda tables: tables.records().key_settlements())
            except lmdb.Error as error:
                raise StoreError(f"{self.path}: the store is damaged ({error})") from error

    @classmethod
    def reader(cls, data_dir: Path) -> Store:
        """Read-only, beside a running server if need be (the tools: doctor, backup, audit)."""
        return cls(StoreConfig(data_dir=data_dir, check_on_open=False), readonly=True)

    def _write(self, work: Callable[[TableWriter], _T]) -> _T:
        """Runs `work` in one write transaction, committed durably."""
        return self._lmdb.write(lambda txn: work(self._tables(txn, TableWriter)))

    def compact(self) -> tuple[int, int]:
        """Rewrites the store so that no byte of an erased registration is left in it
        (see compaction.compact); returns the file's size before and after."""
        return compaction.compact(self._lmdb)

    # -- registrations ---------------------------------------------------------------

    def insert(self, registration: Registration, vector: Vector) -> StoredFace:
        """Stores a registration; AlreadyExists if its registration_id or msisdn is taken."""
        return self._write(lambda tables: tables.insert(registration, vector))

    def insert_many(self, batch: list[tuple[Registration, Vector]]) -> list[StoredFace]:
        """Stores a batch in one transaction: all of it, or (on any conflict) none of it."""
        return self._write(lambda tables: [tables.insert(r, v) for r, v in batch])

    def ensure_unique(self, registration: Registration) -> None:
        """AlreadyExists if the registration_id or msisdn is taken (checked again on insert)."""
        self._read(lambda tables: tables.ensure_unique(registration))

    def delete(self, by: DeleteKey, value: str, audit: AuditMaker | None = None
               ) -> tuple[list[StoredFace], bytes | None]:
        """Deletes every registration under one key, and appends the audit record `audit`
        makes for them in the same transaction: both commit, or neither does.

        Every settlement naming a deleted registration goes with it. Returns what was
        deleted and the audit record's hash (None without `audit`, or when nothing was
        deleted).
        """
        def delete(tables: TableWriter) -> tuple[list[StoredFace], bytes | None]:
            deleted = tables.delete(by, value)
            tables.records().forget([party for face in deleted for party in (
                face.key, face.registration.registration_id)])
            if audit is None or not deleted:
                return deleted, None
            ids = [face.registration.registration_id for face in deleted]
            return deleted, tables.records().append_audit(
                lambda seq, prev: audit(seq, prev, ids))

        return self._write(delete)

    def truncate_changes(self, through: int) -> int:
        """Drops change-log entries up to and including `through` (a checkpoint covers them)."""
        return self._write(lambda tables: tables.truncate_changes(through))

    # -- the audit trail and adjudications -------------------------------------------

    def append_audit(self, make: RecordMaker) -> bytes:
        """Appends `make(sequence, previous_hash) -> (record, hash)` durably; returns the hash.

        The head (last sequence and hash) is kept in meta too, so that a record cut off the
        end of the chain is noticed.
        """
        return self._write(lambda tables: tables.records().append_audit(make))

    def settle(self, checked: int | str, matched: int, record: bytes, audit: RecordMaker
               ) -> bytes:
        """Stores an adjudicated pair under both orders, with its audit record, in one
        transaction; returns the audit record's hash."""
        def settle(tables: TableWriter) -> bytes:
            records = tables.records()
            records.settle(checked, matched, record)
            return records.append_audit(audit)

        return self._write(settle)
