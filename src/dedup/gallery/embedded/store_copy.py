"""A consistent copy of the store (`dedup backup`): LMDB's compacting copy and the vector
file's slots, both as of one read transaction.

LMDB is copied from the transaction itself; the slots are read from the live file after it,
up to that transaction's last key assigned (later enrolments are not in the copy). The
transaction ends before the slots are read: LMDB reuses no page freed after a reader's
snapshot while it is open, and the slots of 10,000,000 registrations are 20 GB to read, so
the store would grow by every write meanwhile. What the copy's records hold is then read from
the copy itself, and compared with the records the store holds once the slots are read: a
registration erased meanwhile is returned in `erased_meanwhile`, for the caller to erase in
the copy too, whether its slot was read zeroed or still holding its embedding (its Delete's
zeroing failed on a disk error, or came after the read). Such a slot is zeroed in the copy
before the copy is synced. A slot that is not a unit vector while its record is still stored
is damage. A slot that is not a unit vector is never copied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import numpy.typing as npt

from dedup.core.errors import StoreError
from dedup.gallery.embedded import compaction
from dedup.gallery.embedded.layout import VECTOR_FILE
from dedup.gallery.embedded.lmdb_env import LmdbEnv, open_db
from dedup.gallery.embedded.store_format import (
    OP_REMOVE,
    decode_registration,
    from_u64,
    logged_changes,
    u64,
)
from dedup.gallery.embedded.store_tables import record_keys
from dedup.gallery.embedded.stored_vectors import not_a_unit_vector, unit_rows
from dedup.gallery.embedded.vector_file import Keys, VectorFile, damaged

_SLOTS_AT_ONCE = 16_384


@dataclass(frozen=True)
class StoreCopy:
    assigned: int  # the last key assigned in the copy
    erased_meanwhile: list[str]  # registration_ids: erased after the copy's transaction


def copy_store(store: LmdbEnv, slots: VectorFile, directory: Path) -> StoreCopy:
    """Copies the store into `directory` (LMDB's file, then the vector file); fsynced. The
    slots of the registrations erased meanwhile are zeros in the copy before it is synced."""
    with store.shared() as env, env.begin(write=False) as txn:
        compaction.copy_to(env, txn, directory)
        if not slots.available:  # format 1: the embeddings are in LMDB, copied with it
            return StoreCopy(0, [])
        assigned = from_u64(txn.get(b"next_key", db=store.dbs.meta)) - 1
        # A removal still in the log may have left its slot unzeroed (a Delete whose
        # zeroing failed, on a disk error): never copied.
        ops, keys = logged_changes(txn, store.dbs.changes, 0, store.path)
        removed = np.zeros(assigned + 1, bool)  # by key
        removed[keys[(ops == OP_REMOVE[0]) & (keys <= assigned)]] = True
    target = VectorFile.open(directory / VECTOR_FILE, slots.dimension, 0, writable=True)
    try:
        suspect = _copy_slots(slots, target, assigned, removed)
        erased, erased_ids, damaged_keys = _erased_meanwhile(store, directory, suspect,
                                                             assigned)
        target.zero(erased.tolist())
        target.reserve(assigned)
        target.sync()
    finally:
        target.close()
    if len(damaged_keys):
        raise not_a_unit_vector(slots.path, damaged_keys.tolist())
    return StoreCopy(assigned, erased_ids)


def _copy_slots(slots: VectorFile, target: VectorFile, assigned: int,
                removed: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Copies the unit vectors among the slots of keys 1..`assigned`, but for those flagged
    `removed`, into `target`; flags the others (by key)."""
    suspect = np.zeros(assigned + 1, bool)
    for first in range(1, assigned + 1, _SLOTS_AT_ONCE):
        count = min(_SLOTS_AT_ONCE, assigned + 1 - first)
        block = slots.block(first, count)  # a copy: a Delete may zero a slot meanwhile
        if len(block) < count:
            raise damaged(slots.path, f"holds no slot for key {first + len(block)}")
        keys = np.arange(first, first + count, dtype=np.int64)
        good = unit_rows(block) & ~removed[first:first + count]
        target.write(keys[good].tolist(), block[good])
        suspect[first:first + count] = ~good
    return suspect


def _erased_meanwhile(store: LmdbEnv, directory: Path, suspect: npt.NDArray[np.bool_],
                      assigned: int) -> tuple[Keys, list[str], Keys]:
    """The keys and registration_ids of the copy's records (in `directory`) the store no
    longer holds: erased since the copy's transaction, whether their slots were read zeroed
    (`suspect`) or not (a Delete whose zeroing failed on a disk error, or came after its slot
    was read); and the keys of its suspect slots whose record is still stored: damage."""
    stored = np.zeros(assigned + 1, bool)  # masks, not set operations: 10 MB at 10,000,000
    stored[_still_stored(store, assigned)] = True
    with _copy_of(directory) as (txn, records):
        in_copy = record_keys(txn, records)
        erased = in_copy[~stored[in_copy]]
        ids = [decode_registration(bytes(txn.get(u64(key), db=records, default=b"")))
               .registration_id for key in erased.tolist()]
    return erased, ids, in_copy[suspect[in_copy] & stored[in_copy]]


@contextlib.contextmanager
def _copy_of(directory: Path) -> Iterator[tuple[lmdb.Transaction, Any]]:
    """A read transaction on the copy just made, and its records table."""
    try:
        copied = lmdb.open(str(directory), readonly=True, lock=False, max_dbs=16)
    except lmdb.Error as error:
        raise StoreError(f"{directory}: cannot read the copy just made ({error})") from error
    try:
        records = open_db(copied, "records", create=False)
        with copied.begin() as txn:
            yield txn, records
    finally:
        copied.close()


def _still_stored(store: LmdbEnv, through: int) -> Keys:
    """The keys up to `through` the store holds records of now. A compaction meanwhile: an
    erasure after its swap is not in the data file this process read, so it reads the newest
    (again, should another compaction swap while it reads)."""
    for _ in range(3):
        store.reopen_if_replaced()
        still = store.read(lambda current: record_keys(current, store.dbs.records, through))
        if not store.reopen_if_replaced():
            return still
    raise StoreError(f"{store.path}: compacted three times while the copy read it: try again")
