"""Copies of the store: the entry-by-entry rewrite that compacts it, and LMDB's own copy.

A compaction never stops reads, and stops writes only for its last step:
  1. the copy: every entry as one read transaction sees it, rewritten into a new file, while
     reads and writes go on (the change log is kept from the copy's snapshot on);
  2. the catch-up, with writes paused: what changed since the snapshot is applied to the
     copy (registrations from the change log, the audit trail's new records, the small
     tables whole), the copy is made durable and renamed over the store's file.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from dedup.core.files import PRIVATE_FILE_MODE, open_private, private_dir
from dedup.gallery.embedded.layout import DATA_FILE, REPLACED_FILE, compaction_dir
from dedup.gallery.embedded.lmdb_env import DAMAGE, DUPSORT_DB, Databases, LmdbEnv, open_db
from dedup.gallery.embedded.store_format import (
    ERASED_SINCE,
    OP_ADD,
    decode_registration,
    from_u64,
    u64,
)

log = logging.getLogger("dedup.store")

_REWRITE_BATCH = 20_000
# Kept in step with the change log: a registration's entries in these databases.
_REGISTRATION_DBS = ("records", "by_registration_id", "by_id_number", "by_msisdn")
_APPEND_ONLY_DBS = ("audit", "changes")


@dataclass(frozen=True)
class _Snapshot:
    """Where the copy's read transaction left the tables that are caught up incrementally."""

    sequence: int  # the change log's last sequence
    last_keys: dict[str, bytes | None]  # per append-only database, its last key


def compact(store: LmdbEnv) -> tuple[int, int]:
    """Rewrites the store entry by entry into a new file (fsynced, renamed over the old).

    Not LMDB's compacting copy: that copies whole pages, and a page's free space still
    holds bytes of entries deleted from it (ID numbers, say). New pages start zeroed, so
    after this no byte of a registration erased before the copy began is left in data.mdb
    (one erased during the copy is deleted from the copy, which the next compaction then
    rewrites). Returns the file's size before and after.
    """
    before = store.file_bytes()
    staging = compaction_dir(store.path)
    shutil.rmtree(staging, ignore_errors=True)
    private_dir(staging)
    try:
        target = _open_target(store, staging)
        open_target: lmdb.Environment | None = target
        try:
            snapshot = _copy(store, target)
            # The copy made durable before writes pause: the pause then flushes only what the
            # catch-up adds (flushing the whole copy inside it paused writes for 1.1 s at 10M).
            target.sync(True)
            # Replicas close the store before writes pause (they forward reads meanwhile).
            with store.others_released(), store.writes_paused():
                started = time.monotonic()
                _catch_up(store, target, snapshot)
                target.sync(True)
                open_target = None
                target.close()  # once only: a second close frees LMDB's handles again
                caught_up = time.monotonic()
                _fsync(staging / DATA_FILE)
                flushed = time.monotonic()
                with store.exclusive():
                    drained = time.monotonic()
                    # The old file, which may hold erased bytes, goes with the staging
                    # directory below, once writes go on.
                    store.replace_data_file(staging / DATA_FILE,
                                            keep_replaced=staging / REPLACED_FILE)
                store.compacting_from = None
                ended = time.monotonic()
                log.info("compaction paused writes for %.3f s (catching up %.3f s, flushing "
                         "%.3f s, waiting for reads to finish %.3f s, swapping files %.3f s)",
                         ended - started, caught_up - started, flushed - caught_up,
                         drained - flushed, ended - drained)
        finally:
            store.compacting_from = None
            if open_target is not None:
                open_target.close()
    except DAMAGE as error:
        raise store.damaged(error) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    after = store.file_bytes()
    log.info("compacted the store from %d to %d bytes", before, after)
    return before, after


def copy_to(env: lmdb.Environment, txn: lmdb.Transaction, directory: Path) -> None:
    """LMDB's compacting copy of the store as `txn` sees it, into a new file of mode 0600
    (LMDB's own `copy` creates it 0666 less the umask); fsynced."""
    with open_private(directory / DATA_FILE, "wb", exclusive=True) as copied:
        env.copyfd(copied.fileno(), compact=True, txn=txn)
        os.fsync(copied.fileno())


def _open_target(store: LmdbEnv, staging: Path) -> lmdb.Environment:
    with store.shared() as env:
        map_size = 2 * int(env.info()["map_size"])  # room for what the catch-up adds
    return lmdb.open(str(staging), map_size=map_size, max_dbs=16, sync=False,
                     metasync=False, lock=False, mode=PRIVATE_FILE_MODE)


def _copy(store: LmdbEnv, target: lmdb.Environment) -> _Snapshot:
    """Phase 1: every entry as one read transaction sees it; reads and writes go on."""
    # The whole log is kept until the copy's sequence is known: a checkpoint truncating it
    # between the transaction's start and that would take changes the catch-up replays.
    store.compacting_from = 0
    with store.shared() as env, env.begin(write=False) as source:
        meta = store.dbs.meta
        sequence = from_u64(source.get(b"sequence", db=meta, default=u64(0)))
        store.compacting_from = sequence
        snapshot = _Snapshot(sequence, {name: _last_key(source, getattr(store.dbs, name))
                                        for name in _APPEND_ONLY_DBS})
        for name, db in store.dbs.named():
            if db is not None:
                _copy_entries(source, db, target, name)
    return snapshot


def _catch_up(store: LmdbEnv, target: lmdb.Environment, snapshot: _Snapshot) -> None:
    """Phase 2, writes paused: the copy made equal to the store as it is now."""
    dbs = store.dbs
    # Opened before the transaction: a handle opened inside it would be invalid in it.
    copy = {name: open_db(target, name) for name, db in dbs.named() if db is not None}
    with store.shared() as env, env.begin(write=False) as live, \
            target.begin(write=True) as txn:
        erased = _replay_registrations(live, dbs, txn, copy, snapshot.sequence)
        for name in _APPEND_ONLY_DBS:
            if name in copy:
                _append_after(live, getattr(dbs, name), txn, copy[name],
                              snapshot.last_keys[name])
        _drop_truncated_changes(live, dbs.changes, txn, copy["changes"])
        for name, db in dbs.named():
            if name in copy and name not in _REGISTRATION_DBS + _APPEND_ONLY_DBS:
                _recopy(live, db, txn, copy[name])  # meta and the settlements: small
        if erased:  # their entries were deleted from the copy: freed pages hold them
            txn.put(ERASED_SINCE, struct.pack(">d", time.time()), db=copy["meta"])
        else:
            txn.delete(ERASED_SINCE, db=copy["meta"])


def _replay_registrations(live: lmdb.Transaction, dbs: Databases, txn: lmdb.Transaction,
                          copy: dict[str, Any], after: int) -> int:
    """Registrations added and erased since the snapshot, from the change log; returns how
    many erased ones were deleted from the copy."""
    erased = 0
    cursor = live.cursor(db=dbs.changes)
    if not cursor.set_range(u64(after + 1)):
        return 0
    for _, change in cursor:
        packed = bytes(change[1:9])
        if bytes(change[:1]) == OP_ADD:
            raw = live.get(packed, db=dbs.records)
            if raw is not None:  # else it was erased again since
                _put_registration(txn, copy, packed, bytes(raw))
        else:
            raw = txn.get(packed, db=copy["records"])
            if raw is not None:
                _delete_registration(txn, copy, packed, bytes(raw))
                erased += 1
    return erased


def _put_registration(txn: lmdb.Transaction, copy: dict[str, Any], packed: bytes,
                      raw: bytes) -> None:
    registration = decode_registration(raw)
    txn.put(packed, raw, db=copy["records"])
    txn.put(registration.registration_id.encode(), packed, db=copy["by_registration_id"])
    txn.put(registration.id_number.encode(), packed, db=copy["by_id_number"])
    if registration.msisdn:
        txn.put(registration.msisdn.encode(), packed, db=copy["by_msisdn"])


def _delete_registration(txn: lmdb.Transaction, copy: dict[str, Any], packed: bytes,
                         raw: bytes) -> None:
    registration = decode_registration(raw)
    txn.delete(packed, db=copy["records"])
    txn.delete(registration.registration_id.encode(), db=copy["by_registration_id"])
    txn.delete(registration.id_number.encode(), packed, db=copy["by_id_number"])
    if registration.msisdn:
        txn.delete(registration.msisdn.encode(), db=copy["by_msisdn"])


def _last_key(txn: lmdb.Transaction, db: Any) -> bytes | None:
    if db is None:
        return None
    cursor = txn.cursor(db=db)
    return bytes(cursor.key()) if cursor.last() else None


def _append_after(live: lmdb.Transaction, db: Any, txn: lmdb.Transaction, target_db: Any,
                  last: bytes | None) -> None:
    """The entries of an append-only database after the copy's last key."""
    cursor = live.cursor(db=db)
    found = cursor.set_range(last) if last is not None else cursor.first()
    if not found:
        return
    for key, value in cursor:
        if last is None or bytes(key) > last:
            txn.put(bytes(key), bytes(value), db=target_db, append=True)


def _drop_truncated_changes(live: lmdb.Transaction, db: Any, txn: lmdb.Transaction,
                            target_db: Any) -> None:
    """Change-log entries a checkpoint truncated while the copy was made."""
    live_cursor = live.cursor(db=db)
    first = bytes(live_cursor.key()) if live_cursor.first() else None
    cursor = txn.cursor(db=target_db)
    while cursor.first() and (first is None or bytes(cursor.key()) < first):
        cursor.delete()


def _recopy(live: lmdb.Transaction, db: Any, txn: lmdb.Transaction, target_db: Any) -> None:
    txn.drop(target_db, delete=False)
    for key, value in live.cursor(db=db):
        txn.put(bytes(key), bytes(value), db=target_db)


def _fsync(path: Path) -> None:
    with open(path, "rb") as written:
        os.fsync(written.fileno())


def _copy_entries(source: lmdb.Transaction, db: Any, target: lmdb.Environment,
                  name: str) -> None:
    """Every entry of one database, in key order, in write transactions of a bounded size."""
    target_db = open_db(target, name)
    dupsort = name == DUPSORT_DB
    entries = source.cursor(db=db).iternext(keys=True, values=True)
    while batch := list(itertools.islice(entries, _REWRITE_BATCH)):
        with target.begin(write=True, db=target_db) as txn:
            txn.cursor().putmulti(batch, dupdata=dupsort, append=not dupsort)
