"""The audit trail and the adjudications in the store's databases, inside one transaction.

The records themselves are made (and hashed) in dedup.core; here they are only kept.
"""

from __future__ import annotations

import lmdb

from dedup.core.audit_chain import GENESIS, RecordMaker
from dedup.core.errors import StoreError
from dedup.gallery.embedded.lmdb_env import Databases, entries_with_prefix
from dedup.gallery.embedded.store_format import from_u64, pair_key, u64


class RecordTables:
    """Audit records and adjudicated pairs, in one transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: Databases) -> None:
        self.txn = txn
        self.dbs = dbs

    def append_audit(self, make: RecordMaker) -> bytes:
        """Appends `make(sequence, previous_hash) -> (record, hash)`; returns the hash.

        The head (last sequence and hash) is kept in meta too, so that a record cut off the
        end of the chain is noticed.
        """
        sequence, previous = self.audit_head()
        record, digest = make(sequence + 1, previous)
        if not self.txn.put(u64(sequence + 1), record, db=self.dbs.audit, append=True,
                            overwrite=False):
            raise StoreError("audit: the record sequence is already taken")
        self.txn.put(b"audit_head", u64(sequence + 1) + digest, db=self.dbs.meta)
        return digest

    def audit_head(self) -> tuple[int, bytes]:
        head = self.txn.get(b"audit_head", db=self.dbs.meta)
        return (0, GENESIS) if head is None else (from_u64(head[:8]), bytes(head[8:]))

    def audit_records(self) -> list[tuple[int, bytes]]:
        """(sequence, record) in key order."""
        if self.dbs.audit is None:
            return []
        return [(from_u64(key), bytes(value)) for key, value in self.txn.cursor(db=self.dbs.audit)]

    def settle(self, first: str, second: str, record: bytes) -> None:
        """Stores an adjudicated pair's record under both orders of the pair."""
        self.txn.put(pair_key(first, second), record, db=self.dbs.adjudications)
        self.txn.put(pair_key(second, first), record, db=self.dbs.adjudications)

    def settled(self, registration_id: str) -> dict[str, bytes]:
        """The other registration_id -> record of every pair settled with this one."""
        if self.dbs.adjudications is None:
            return {}
        prefix = pair_key(registration_id, "")
        return {key.decode(): value
                for key, value in entries_with_prefix(self.txn, self.dbs.adjudications, prefix)}

    def adjudications(self) -> list[bytes]:
        """Every settled pair's record, once."""
        if self.dbs.adjudications is None:
            return []
        return [bytes(value) for key, value in self.txn.cursor(db=self.dbs.adjudications)
                if _first_in_order(bytes(key))]


def _first_in_order(key: bytes) -> bool:
    first, second = key.split(b"\x00", 1)
    return first <= second
