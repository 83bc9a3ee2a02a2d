"""The audit trail and the adjudications in the store's databases, inside one transaction.

The records themselves are made (and hashed) in dedup.core; here they are only kept. A settled
pair is kept under both orders of its parties (store_format.party_key): the registrations'
own int64 keys, so that a settlement follows the stored registration, not whoever reuses its
registration_id, and is erased with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import lmdb

from dedup.core.adjudication import Adjudication
from dedup.core.audit_chain import GENESIS, RecordMaker
from dedup.core.errors import NotFound, StoreError
from dedup.gallery.embedded.lmdb_env import Databases, entries_with_prefix
from dedup.gallery.embedded.store_format import from_u64, party_key, split_party, u64

Party = int | str
# meta: set once the adjudications are keyed by party (stores before were keyed by
# registration_id strings, and are converted when first opened for writing).
SETTLEMENTS_BY_KEY = b"settlements_by_key"


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

    # -- settled pairs ---------------------------------------------------------------

    def settle(self, checked: Party, matched: int, record: bytes) -> None:
        """Stores a settled pair under both orders; NotFound if a registration it names by
        key was erased meanwhile."""
        for party, field in ((checked, "registration_id"), (matched, "matched_registration_id")):
            if isinstance(party, int) and self.txn.get(u64(party), db=self.dbs.records) is None:
                raise NotFound(f"{field}: the registration was erased meanwhile")
        first, second = party_key(checked), party_key(matched)
        self.txn.put(first + second, record, db=self.dbs.adjudications)
        self.txn.put(second + first, record, db=self.dbs.adjudications)

    def settled(self, party: Party) -> dict[int, bytes]:
        """The key of every enrolled registration settled with `party` -> the record."""
        if not self._keyed():
            return {}
        found = {}
        for rest, value in entries_with_prefix(self.txn, self.dbs.adjudications,
                                               party_key(party)):
            other, _ = split_party(rest)
            if isinstance(other, int):
                found[other] = value
        return found

    def forget(self, parties: Sequence[Party]) -> int:
        """Deletes every settlement naming one of `parties` (erased registrations: their
        keys and registration_ids); how many pairs."""
        forgotten = 0
        for party in parties:
            own = party_key(party)
            for rest, _ in list(entries_with_prefix(self.txn, self.dbs.adjudications, own)):
                self.txn.delete(own + rest, db=self.dbs.adjudications)
                self.txn.delete(rest + own, db=self.dbs.adjudications)
                forgotten += 1
        return forgotten

    def settlements(self) -> list[tuple[Party, int, bytes]]:
        """Every settled pair once: (a party, an enrolled registration's key, the record)."""
        if not self._keyed():
            return []
        pairs = []
        for key, value in self.txn.cursor(db=self.dbs.adjudications):
            first, rest = split_party(bytes(key))
            second, _ = split_party(rest)
            if isinstance(second, int) and (isinstance(first, str) or first < second):
                pairs.append((first, second, bytes(value)))  # the matched side is enrolled
        return pairs

    def adjudications(self) -> list[bytes]:
        """Every settled pair's record, once (also of a store not yet converted)."""
        if self.dbs.adjudications is not None and not self._keyed():
            return [bytes(value) for key, value in self.txn.cursor(db=self.dbs.adjudications)
                    if _legacy_first_in_order(bytes(key))]
        return [record for _, _, record in self.settlements()]

    def _keyed(self) -> bool:
        return self.dbs.adjudications is not None and \
            self.txn.get(SETTLEMENTS_BY_KEY, db=self.dbs.meta) is not None

    def key_settlements(self) -> None:
        """Converts adjudications keyed by registration_id strings (stores written before
        settlements were keyed by registration) once: a pair whose matched registration is no
        longer enrolled is dropped, an unenrolled checked one is kept as an application."""
        if self._keyed():
            return
        legacy = [bytes(value) for _, value in self.txn.cursor(db=self.dbs.adjudications)]
        self.txn.drop(self.dbs.adjudications, delete=False)
        for raw in legacy:
            pair = Adjudication.decode(raw)
            matched = self._key_of(pair.matched_registration_id)
            if isinstance(matched, int):
                self.settle(self._key_of(pair.registration_id), matched, raw)
        self.txn.put(SETTLEMENTS_BY_KEY, u64(1), db=self.dbs.meta)

    def _key_of(self, registration_id: str) -> Party:
        packed = self.txn.get(registration_id.encode(), db=self.dbs.by_registration_id)
        return registration_id if packed is None else from_u64(packed)


def _legacy_first_in_order(key: bytes) -> bool:
    first, second = key.split(b"\x00", 1)
    return first <= second
