"""Copies of the store: the entry-by-entry rewrite that compacts it, and LMDB's own copy."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lmdb

from dedup.core.files import PRIVATE_FILE_MODE, open_private, private_dir
from dedup.gallery.embedded.layout import DATA_FILE
from dedup.gallery.embedded.lmdb_env import DAMAGE, DUPSORT_DB, Databases, LmdbEnv, open_db
from dedup.gallery.embedded.store_format import ERASED_SINCE

log = logging.getLogger("dedup.store")

_REWRITE_BATCH = 20_000


def compact(store: LmdbEnv) -> tuple[int, int]:
    """Rewrites the store entry by entry into a new file (fsynced, renamed over the old).

    Not LMDB's compacting copy: that copies whole pages, and a page's free space still
    holds bytes of entries deleted from it (ID numbers, say). New pages start zeroed, so
    after this no byte of an erased registration is left in data.mdb. Every transaction
    waits meanwhile. Returns the file's size before and after.
    """
    before = store.file_bytes()
    staging = store.path.with_name(store.path.name + ".compacting")
    shutil.rmtree(staging, ignore_errors=True)
    private_dir(staging)
    try:
        with store.exclusive() as env:
            try:
                _rewrite_into(env, store.dbs, staging)
            except DAMAGE as error:
                raise store.damaged(error) from error
            store.replace_data_file(staging / DATA_FILE)
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


def _rewrite_into(env: lmdb.Environment, dbs: Databases, staging: Path) -> None:
    target = lmdb.open(str(staging), map_size=int(env.info()["map_size"]),
                       max_dbs=16, sync=False, metasync=False, lock=False,
                       mode=PRIVATE_FILE_MODE)
    try:
        with env.begin(write=False) as source:
            for name, db in dbs.named():
                if db is not None:
                    _copy_entries(source, db, target, name)
        # The copy holds no freed pages: no erasure awaits compaction in it. (Cleared here,
        # under the same lock as the copy, so an erasure right after it is not forgotten.)
        with target.begin(write=True, db=target.open_db(b"meta")) as txn:
            txn.delete(ERASED_SINCE)
        target.sync(True)
    finally:
        target.close()
    with open(staging / DATA_FILE, "rb") as written:
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
