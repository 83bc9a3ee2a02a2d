"""Opening a store: its metadata checked (or written, for a new one), a store of format 1
upgraded, and its vector file opened and brought in line with LMDB after a crash.

After a kill the vector file may hold slots LMDB never committed (an enrolment between its
fdatasync and its commit): they are cut off. A Delete zeroes its slots right after its commit;
a kill between the two leaves an OP_REMOVE in the change log (the log is not truncated while
a Delete is zeroing, store.py), so every removed key's slot still in the log is zeroed again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lmdb

from dedup.core.errors import StoreError
from dedup.core.settings import StoreConfig
from dedup.gallery.embedded.lmdb_env import Databases, LmdbEnv
from dedup.gallery.embedded.store_format import FORMAT, LEGACY_FORMAT, OP_REMOVE, from_u64, u64
from dedup.gallery.embedded.store_upgrade import Upgrade, UpgradeProgress, upgrade
from dedup.gallery.embedded.vector_file import VectorFile

log = logging.getLogger("dedup.store")


def initialise_meta(txn: lmdb.Transaction, dbs: Databases, where: Path, dimension: int
                    ) -> int:
    """Writes a new store's metadata, or checks an existing store's; its format."""
    meta = dbs.meta
    stored_format = txn.get(b"format", db=meta)
    if stored_format is None:
        txn.put(b"format", u64(FORMAT), db=meta)
        txn.put(b"dimension", u64(dimension), db=meta)
        txn.put(b"next_key", u64(1), db=meta)
        txn.put(b"sequence", u64(0), db=meta)
        txn.put(b"distinct_id_numbers", u64(0), db=meta)
        return FORMAT
    found = from_u64(stored_format)
    if found not in (FORMAT, LEGACY_FORMAT):
        raise StoreError(f"{where}: store format {found}, this dedup reads {FORMAT} (and "
                         f"upgrades {LEGACY_FORMAT})")
    stored_dimension = from_u64(txn.get(b"dimension", db=meta))
    if stored_dimension != dimension:
        raise StoreError(f"{where}: holds {stored_dimension}-d embeddings, server configured "
                         f"for {dimension}")
    return found


def open_for_writing(store: LmdbEnv, path: Path, config: StoreConfig,
                     progress: UpgradeProgress) -> tuple[VectorFile, Upgrade | None]:
    """The vector file at `path`, open for writing and in line with LMDB (a store of format
    1 upgraded first); and the upgrade, if one was made."""
    stored_format = store.write(
        lambda txn: initialise_meta(txn, store.dbs, store.path, config.dimension))
    upgrading = stored_format == LEGACY_FORMAT
    assigned = _assigned(store)
    slots = VectorFile.open(path, config.dimension, 0 if upgrading else assigned, writable=True)
    try:
        made = upgrade(store, slots, assigned, progress) if upgrading else None
        slots.check_length(assigned)
        _recover(store, slots, assigned)
    except BaseException:
        slots.close()
        raise
    return slots, made


def open_for_reading(store: LmdbEnv, path: Path, dimension: int) -> VectorFile:
    """The vector file at `path`, read-only; of a store of format 1 a stand-in that refuses
    reads (the embeddings are still in LMDB until the store is upgraded)."""
    stored_format = store.read(lambda txn: txn.get(b"format", db=store.dbs.meta))
    if stored_format is not None and from_u64(stored_format) == LEGACY_FORMAT:
        return VectorFile.unavailable(path, dimension, (
            f"{store.path}: store format {LEGACY_FORMAT} keeps its embeddings in LMDB; start "
            f"the server on it or run `dedup upgrade {store.path.parent}` first"))
    return VectorFile.open(path, dimension, _assigned(store), writable=False)


def _assigned(store: LmdbEnv) -> int:
    """How many keys the store has assigned (its next key - 1)."""
    raw = store.read(lambda txn: txn.get(b"next_key", db=store.dbs.meta))
    return 0 if raw is None else from_u64(raw) - 1


def _recover(store: LmdbEnv, slots: VectorFile, assigned: int) -> None:
    slots.cut_after(assigned)
    removed = store.read(lambda txn: [from_u64(value[1:]) for _, value in
                                      txn.cursor(db=store.dbs.changes) if value[:1] == OP_REMOVE])
    zeroed = slots.zero(removed)
    if zeroed:
        slots.sync()
        log.warning("zeroed the slots of %d erased registration(s) left unzeroed by a crash",
                    zeroed)
