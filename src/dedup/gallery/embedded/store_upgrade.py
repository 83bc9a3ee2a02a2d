"""Upgrading a store of format 1, whose embeddings are in LMDB's `vectors` database (each on a
4 KB overflow page of its own), to format 2: embeddings in the vector file beside LMDB.

Batch by batch, in key order: a batch's embeddings are written into their slots and fsynced,
then the last key moved is committed in meta, so an interrupted upgrade resumes after the last
whole batch. Then a compaction rewrites LMDB without the `vectors` database (its pages, and
the copies of erased embeddings on freed ones, are not carried over), and a last transaction
sets format 2. Until then the store is format 1, and opening it upgrades it from where it
stopped.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from dedup.core.errors import StoreDamaged
from dedup.core.vectors import Matrix
from dedup.gallery.embedded import compaction
from dedup.gallery.embedded.lmdb_env import LmdbEnv
from dedup.gallery.embedded.store_format import FORMAT, LEGACY_VECTORS_DB, from_u64, u64
from dedup.gallery.embedded.vector_file import VectorFile

log = logging.getLogger("dedup.store")

BATCH = 8_192  # embeddings a write and an fdatasync (16 MB of 512-d ones)
MOVED = b"upgrade_moved"  # meta: the last key whose embedding is in the vector file

UpgradeProgress = Callable[[int, int], object]  # (embeddings in the vector file, total)


@dataclass(frozen=True)
class Upgrade:
    moved: int  # embeddings this run moved (an interrupted run's are not counted again)
    store_bytes_before: int  # data.mdb
    store_bytes_after: int
    seconds: float


def upgrade(store: LmdbEnv, slots: VectorFile, assigned: int, progress: UpgradeProgress
            ) -> Upgrade:
    """Moves every embedding of the format-1 store into `slots`, compacts, sets format 2.
    Only while no other transaction of this process is open (the compaction waits for it)."""
    started, before = time.monotonic(), store.file_bytes()
    log.info("upgrading the store in %s to format %d: moving its embeddings into %s",
             store.path, FORMAT, slots.path.name)
    legacy = store.legacy_db(LEGACY_VECTORS_DB)
    moved = 0 if legacy is None else _move(store, legacy, slots, progress)
    slots.reserve(assigned)  # erased keys at the end have no slot written: holes
    slots.sync()
    compaction.compact(store)
    store.write(lambda txn: _finish(txn, store))
    made = Upgrade(moved, before, store.file_bytes(), time.monotonic() - started)
    log.info("upgraded the store to format %d: moved %d embeddings; data.mdb from %d to %d "
             "bytes", FORMAT, made.moved, before, made.store_bytes_after)
    return made


def logged_progress() -> UpgradeProgress:
    """Logs the upgrade's progress every 5%."""
    due = [0]

    def report(done: int, total: int) -> None:
        percent = 100 * done // max(1, total)
        if percent >= due[0] or done == total:
            log.info("store upgrade: %d of %d embeddings in the vector file (%d%%)", done,
                     total, percent)
            due[0] = percent + 5

    return report


def _move(store: LmdbEnv, legacy: Any, slots: VectorFile, progress: UpgradeProgress) -> int:
    after = store.read(lambda txn: from_u64(txn.get(MOVED, db=store.dbs.meta, default=u64(0))))
    total, done = store.read(lambda txn: _counts(txn, legacy, after))
    moved = 0
    progress(done, total)
    while True:
        keys, rows = store.read(functools.partial(
            _batch, legacy=legacy, after=after, dimension=slots.dimension, where=store.path))
        if not keys:
            return moved
        slots.write(keys, rows)
        slots.sync()  # durable before the commit that says they are moved
        after = keys[-1]
        store.write(functools.partial(_mark_moved, meta=store.dbs.meta, last=after))
        moved += len(keys)
        progress(done + moved, total)


def _counts(txn: lmdb.Transaction, legacy: Any, after: int) -> tuple[int, int]:
    """The embeddings in the legacy database, and how many of them an earlier run moved."""
    done = 0
    if after:
        for raw_key in txn.cursor(db=legacy).iternext(keys=True, values=False):
            if from_u64(raw_key) > after:
                break
            done += 1
    return int(txn.stat(legacy)["entries"]), done


def _batch(txn: lmdb.Transaction, legacy: Any, after: int, dimension: int, where: Path
           ) -> tuple[list[int], Matrix]:
    cursor = txn.cursor(db=legacy)
    keys, raws = [], []
    if cursor.set_range(u64(after + 1)):
        for raw_key, raw in cursor:
            if len(raw) != 4 * dimension:
                raise StoreDamaged(
                    f"{where}: the store is damaged: the embedding under key "
                    f"{from_u64(raw_key)} holds {len(raw)} bytes, not {4 * dimension}; "
                    "restore it from a backup")
            keys.append(from_u64(raw_key))
            raws.append(bytes(raw))
            if len(keys) == BATCH:
                break
    matrix = np.frombuffer(b"".join(raws), np.float32).reshape(len(keys), dimension)
    return keys, matrix


def _mark_moved(txn: lmdb.Transaction, meta: Any, last: int) -> None:
    txn.put(MOVED, u64(last), db=meta)


def _finish(txn: lmdb.Transaction, store: LmdbEnv) -> None:
    txn.put(b"format", u64(FORMAT), db=store.dbs.meta)
    txn.delete(MOVED, db=store.dbs.meta)
