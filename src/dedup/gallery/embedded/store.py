"""The store: the durable source of truth.

Named databases in one LMDB environment (`<data_dir>/store/`), listed in lmdb_env.Databases,
and beside them the vector file with every embedding in a slot of its own (vector_file.py).
Every change is one transaction committed with sync on, so an acknowledged write is on
disk; a new registration's embedding is written and fdatasync'd before the transaction
that references its slot commits. Keys are int64, assigned in increasing order and never
reused. An erased registration's slot is zeroed (and fdatasync'd) right after its Delete
commits, before the call returns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np

from dedup.core.audit_chain import AuditMaker, RecordMaker
from dedup.core.errors import AlreadyExists, StoreError
from dedup.core.records import DeleteKey, Registration, StoredFace
from dedup.core.settings import StoreConfig
from dedup.core.vectors import Vector
from dedup.gallery.embedded import compaction
from dedup.gallery.embedded.lmdb_env import StoreUsage
from dedup.gallery.embedded.store_format import OP_ADD, OP_REMOVE
from dedup.gallery.embedded.store_open import open_for_writing
from dedup.gallery.embedded.store_reads import ReadableStore, Snapshot
from dedup.gallery.embedded.store_tables import TableReader, TableWriter
from dedup.gallery.embedded.store_upgrade import Upgrade, UpgradeProgress, logged_progress
from dedup.gallery.embedded.vector_file import VectorFile

__all__ = ["OP_ADD", "OP_REMOVE", "Snapshot", "Store", "StoreUsage", "Upgrade"]

log = logging.getLogger("dedup.store")

_T = TypeVar("_T")

# The change log is kept for a read replica this many changes behind at most; one further
# behind loads the index checkpoint again.
REPLICA_LAG_KEPT = 1_000_000
# Change-log entries dropped in one write transaction: ~25 ms of held writes (0.46 s a
# million measured here); the 10,000,000 an import logs held them ~4.6 s in one.
TRUNCATED_A_TRANSACTION = 50_000


class Store(ReadableStore):
    """Registrations in LMDB, with secondary lookups and a change log, and their embeddings
    in the vector file."""

    def __init__(self, config: StoreConfig, readonly: bool = False,
                 upgrade_progress: UpgradeProgress | None = None) -> None:
        """Opening a store of format 1 for writing upgrades it (store_upgrade.py), reporting
        to `upgrade_progress` (default: the log); `upgraded` says what it did."""
        self.upgraded: Upgrade | None = None
        self._upgrade_progress = upgrade_progress or logged_progress()
        # Held from a Delete's commit until its slots are zeroed, and while the change log is
        # truncated: an OP_REMOVE leaves the log only once its slot is zeros.
        self._erasing = threading.Lock()
        # The oldest change a read replica has yet to replay (see truncate_changes).
        self.replica_floor: Callable[[], int | None] = lambda: None
        super().__init__(config, readonly)
        if not readonly:
            try:
                self._write(lambda tables: tables.records().key_settlements())
            except lmdb.Error as error:
                self.close()
                raise StoreError(f"{self.path}: the store is damaged ({error})") from error

    def _open_slots(self) -> VectorFile:
        if self.readonly:
            return super()._open_slots()
        try:
            slots, self.upgraded = open_for_writing(self._lmdb, self.vector_path, self.config,
                                                    self._upgrade_progress)
        except lmdb.Error as error:
            raise StoreError(f"{self.path}: the store is damaged ({error})") from error
        return slots

    @classmethod
    def reader(cls, data_dir: Path) -> Store:
        """Read-only, beside a running server if need be (the tools: doctor, backup, audit)."""
        return cls(StoreConfig(data_dir=data_dir, check_on_open=False), readonly=True)

    def _write(self, work: Callable[[TableWriter], _T]) -> _T:
        """Runs `work` in one write transaction, committed durably: the embeddings it adds
        are written into their slots and fdatasync'd first."""
        def in_transaction(txn: lmdb.Transaction) -> _T:
            tables = self._tables(txn, TableWriter)
            done = work(tables)
            if tables.new_vectors:
                self._slots.write([key for key, _ in tables.new_vectors],
                                  np.vstack([vector for _, vector in tables.new_vectors]))
                self._slots.sync()
            return done

        return self._lmdb.write(in_transaction)

    def compact(self) -> tuple[int, int]:
        """Rewrites LMDB so that no byte of an erased registration is left in it (see
        compaction.compact), and zeroes any erased registration's slot that is not zeros
        yet (none should be: a Delete zeroes them); returns data.mdb's size before and after."""
        sizes = compaction.compact(self._lmdb)
        erased = self._read(TableReader.erased_keys)
        zeroed = self._erase_slots(erased.tolist())
        if zeroed:
            log.warning("compaction zeroed %d erased registration(s)' slots that held bytes",
                        zeroed)
        return sizes

    def file_bytes(self) -> int:
        """data.mdb's size, what a compaction rewrites."""
        return self._lmdb.file_bytes()

    def share_with_replicas(self, released: Callable[[], AbstractContextManager[object]],
                            floor: Callable[[], int | None]) -> None:
        """Read replicas in other processes have this store open: `released` closes theirs
        around a compaction's swap; `floor` is the oldest change one has yet to replay."""
        self._lmdb.others_released = released
        self.replica_floor = floor

    def clear_stale_readers(self) -> int:
        return self._lmdb.clear_stale_readers()

    def _erase_slots(self, keys: list[int]) -> int:
        zeroed = self._slots.zero(keys)
        if zeroed:
            self._slots.sync()
        return zeroed

    # -- registrations ---------------------------------------------------------------

    def insert(self, registration: Registration, vector: Vector) -> StoredFace:
        """Stores a registration; AlreadyExists if its registration_id or msisdn is taken."""
        return self._write(lambda tables: tables.insert(registration, vector))

    def insert_many(self, batch: list[tuple[Registration, Vector]]) -> list[StoredFace]:
        """Stores a batch in one transaction: all of it, or (on any conflict) none of it."""
        return self._write(lambda tables: [tables.insert(r, v) for r, v in batch])

    def insert_each(self, batch: list[tuple[Registration, Vector]]
                    ) -> list[StoredFace | AlreadyExists]:
        """Stores a batch in one transaction, each registration unless its registration_id
        or msisdn is taken (by a stored one or one earlier in the batch): one outcome each."""
        def insert(tables: TableWriter) -> list[StoredFace | AlreadyExists]:
            outcomes: list[StoredFace | AlreadyExists] = []
            for registration, vector in batch:
                try:
                    outcomes.append(tables.insert(registration, vector))
                except AlreadyExists as taken:  # raised before it wrote anything
                    outcomes.append(taken)
            return outcomes

        return self._write(insert)

    def ensure_unique(self, registration: Registration) -> None:
        """AlreadyExists if the registration_id or msisdn is taken (checked again on insert)."""
        self._read(lambda tables: tables.ensure_unique(registration))

    def delete(self, by: DeleteKey, value: str, audit: AuditMaker | None = None,
               committed: Callable[[list[StoredFace]], object] = lambda _: None
               ) -> tuple[list[StoredFace], bytes | None]:
        """Deletes every registration under one key, and appends the audit record `audit`
        makes for them in the same transaction: both commit, or neither does.

        Every settlement naming a deleted registration goes with it. `committed` is called
        with the deleted right after the commit, before their slots are zeroed (which may
        fail, on a disk error: then the truncation of their removal from the change log, a
        start, or a compaction zeroes them). Returns what was deleted and the audit record's
        hash (None without `audit`, or when nothing was deleted).
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

        with self._erasing:
            deleted, digest = self._write(delete)
            try:
                committed(deleted)
            finally:
                self._erase_slots([face.key for face in deleted])
        return deleted, digest

    def truncate_changes(self, through: int) -> int:
        """Drops change-log entries up to and including `through` (a checkpoint covers them),
        TRUNCATED_A_TRANSACTION at a time; returns how many it dropped."""
        removed = 0
        while True:
            kept_after = self._truncatable(through)  # again each time: a compaction may start
            with self._erasing:
                # A removal leaves the log only once its slot is zeros (a Delete whose
                # zeroing failed, on a disk error, left that to the log), zeroed before
                # the write, not inside it.
                self._erase_slots(self._read(partial(
                    TableReader.oldest_removals, through=kept_after,
                    most=TRUNCATED_A_TRANSACTION)))
                chunk = self._write(partial(TableWriter.truncate_changes, through=kept_after,
                                            most=TRUNCATED_A_TRANSACTION))
            removed += chunk
            if chunk < TRUNCATED_A_TRANSACTION:
                return removed

    def _truncatable(self, through: int) -> int:
        """`through`, or less where a compaction or a replica still needs the log."""
        floor = self._lmdb.compacting_from
        if floor is not None:  # a compaction catches its copy up from the log after `floor`
            through = min(through, floor)
        replicas = self.replica_floor()
        if replicas is not None and through - replicas <= REPLICA_LAG_KEPT:
            through = min(through, replicas)  # replicas catch up from the log after it
        return through

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
