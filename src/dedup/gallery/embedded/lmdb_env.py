"""The store's LMDB environment: opening it and its databases, transactions, map growth.

Transactions translate LMDB's errors: a damaged page becomes StoreDamaged, a full disk or a
map at its cap ResourceExhausted.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from dedup.core.errors import ResourceExhausted, StoreDamaged, StoreError
from dedup.core.files import PRIVATE_FILE_MODE, private_dir
from dedup.core.rwlock import ReadWriteLock
from dedup.core.settings import StoreConfig
from dedup.gallery.embedded.checkpoint import fsync_directory
from dedup.gallery.embedded.layout import DATA_FILE, LMDB_LOCK_FILE

log = logging.getLogger("dedup.store")

_T = TypeVar("_T")

# LMDB's answers to a page that is not what the tree says it should be.
DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.BadTxnError,
          lmdb.InvalidError, lmdb.VersionMismatchError)

# A reader that opened the store across a compaction's swap opens it again, up to this often.
_STALE_TABLE_REOPENINGS = 3
DUPSORT_DB = "by_id_number"  # one ID number, many keys (sorted duplicates)
_OPTIONAL_DBS = ("audit", "adjudications")  # absent from a store never written to them


@dataclass(frozen=True)
class Databases:
    """The named databases of the environment, in the order they are copied."""

    meta: Any  # format, dimension, next key, change sequence, counters
    records: Any  # key -> registration fields (JSON); its embedding is in the vector file
    by_registration_id: Any  # registration_id -> key
    by_id_number: Any  # id_number -> key (sorted duplicates)
    by_msisdn: Any  # msisdn -> key
    changes: Any  # sequence -> (op, key): the log the index replays after a checkpoint
    audit: Any  # sequence -> audit record; None if read-only and never written
    adjudications: Any  # "<id>\0<other id>" -> adjudication record; None likewise

    def named(self) -> list[tuple[str, Any]]:
        return [(field.name, getattr(self, field.name)) for field in fields(self)]


@dataclass(frozen=True)
class StoreUsage:
    map_bytes: int  # the LMDB map's current size
    used_bytes: int  # pages in use, up to the last one written
    file_bytes: int  # data.mdb's size on disk


def open_db(env: lmdb.Environment, name: str, create: bool = True) -> Any:
    dupsort = name == DUPSORT_DB
    return env.open_db(name.encode(), dupsort=dupsort, dupfixed=dupsort, create=create)


def entries_with_prefix(txn: lmdb.Transaction, db: Any, prefix: bytes
                        ) -> Iterator[tuple[bytes, bytes]]:
    """(key without the prefix, value) of every entry whose key starts with `prefix`."""
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if not bytes(key).startswith(prefix):
            return
        yield bytes(key)[len(prefix):], bytes(value)


class LmdbEnv:
    """One LMDB environment and its databases, for the life of a Store."""

    def __init__(self, path: Path, config: StoreConfig, readonly: bool) -> None:
        self.path = path
        self.config = config
        self.readonly = readonly
        # Every transaction runs under `reading`; growing the map takes `writing`, since
        # LMDB allows a resize only while this process has no transaction open.
        self._resize = ReadWriteLock()
        # Held by every write transaction, and by a compaction while it catches its copy up
        # and swaps it in: writes pause then, reads go on.
        self._writes = threading.Lock()
        # While a compaction copies the store: the change-log sequence its snapshot holds,
        # below which the log must not be truncated (the copy is caught up from it).
        self.compacting_from: int | None = None
        # Around the swap of a compaction: the read replicas close the environment first
        # and open it again after (they would read the old file until then).
        self.others_released: Callable[[], AbstractContextManager[object]] = nullcontext
        # The lock file a compaction swapped in, locked by this process (see
        # replace_data_file): kept open as long as the environment is, since closing any
        # descriptor of a file drops every fcntl lock the process holds on it, LMDB's too.
        self._lock_claim: int | None = None
        self._env = self._open_environment()
        self.dbs = self._open_dbs()

    # -- opening ---------------------------------------------------------------------

    def _open_environment(self) -> lmdb.Environment:
        """The environment, and which data file it reads (`_opened_file`): the same before
        and after opening it, so that a compaction's swap meanwhile is seen."""
        try:
            private_dir(self.path)  # before lmdb.open, which would make it with `mode` (0600)
        except OSError as error:
            raise StoreError(f"{self.path}: cannot create the store directory ({error})") from error
        for _ in range(_STALE_TABLE_REOPENINGS):
            before = self._data_file_id()
            env = self._open_current()
            after = self._data_file_id()
            if after == before or before is None:  # the same file, or one lmdb.open made
                before = after
                break
            env.close()
        else:
            before = self._data_file_id()
            env = self._open_current()
        self._opened_file = before
        # Read after opening: a lock file swapped in meanwhile is taken for this one, never
        # the reverse (see peek).
        self._opened_lock_file = self._file_id(LMDB_LOCK_FILE)
        return env

    def _data_file_id(self) -> tuple[int, int] | None:
        return self._file_id(DATA_FILE)

    def _file_id(self, name: str) -> tuple[int, int] | None:
        try:
            status = (self.path / name).stat()
        except FileNotFoundError:
            return None
        return status.st_dev, status.st_ino

    def reopen_if_replaced(self) -> bool:
        """A reader in another process than the server's (backup, doctor) keeps reading the
        data file a compaction replaced, as the store was before its swap: opens the store
        again if so (no transaction of this process may be open). True if it did. (The
        server's own store follows its compactions itself: see replace_data_file.)"""
        if not self.readonly:
            return False
        with self._resize.writing():
            if self._data_file_id() == self._opened_file:
                return False
            self._env.close()
            self._env = self._open_environment()
            self.dbs = self._open_dbs()
            return True

    def _open_current(self) -> lmdb.Environment:
        env = self._open_lmdb()
        for reopenings in range(_STALE_TABLE_REOPENINGS + 1):
            if _lock_table_current(env):
                break
            env.close()
            if not self.readonly or reopenings == _STALE_TABLE_REOPENINGS:
                raise self._stale_lock_table()
            # Opened across a compaction's swap (the old lock file, the new data file): the
            # lock file is the new one by now. A commit between the two reads looks the same.
            time.sleep(0.05 * reopenings)
            env = self._open_lmdb()
        stale = env.reader_check()
        if stale:
            log.warning("cleared %d stale LMDB reader slot(s) left by a dead process", stale)
        return env

    def _open_lmdb(self) -> lmdb.Environment:
        # Room to grow: a map no larger than the file (a compacted store) makes the next
        # write grow it, which waits for every reader and holds up the reads after it.
        used = self.file_bytes()
        map_size = min(max(self.config.initial_map_size, 2 * used),
                       max(self.config.max_map_size, used))
        try:
            env = lmdb.open(
                str(self.path), map_size=map_size, max_dbs=16, max_readers=self.config.max_readers,
                sync=True, metasync=True, lock=True, readahead=False, readonly=self.readonly,
                create=not self.readonly, mode=PRIVATE_FILE_MODE,
            )
        except lmdb.Error as error:
            raise StoreError(f"{self.path}: cannot open the LMDB store ({error})") from error
        self._refuse_truncated(env)
        return env

    def _stale_lock_table(self) -> StoreError:
        danger = ("reading beside it could see pages the writer reuses" if self.readonly
                  else "writing beside it would lose commits")
        return StoreError(
            f"{self.path}: LMDB's lock file (lock.mdb) is not the one of data.mdb (a data "
            f"file put in place while another process had the store open): {danger}; stop "
            "every process that has the store open (dedup doctor, backup, audit) and start "
            "again")

    def _refuse_truncated(self, env: lmdb.Environment) -> None:
        # Pages past the end of a truncated file are mapped but unbacked: touching one is a
        # SIGBUS, not an error, so a short file is refused before any page is read.
        usage = _usage_of(env, self.file_bytes())
        if usage.file_bytes < usage.used_bytes:
            env.close()
            raise StoreError(
                f"{self.path}: the store is damaged: data.mdb holds {usage.file_bytes} bytes "
                f"but its pages reach {usage.used_bytes}; restore it from a backup")

    def _open_dbs(self) -> Databases:
        try:
            return Databases(**{field.name: self._open_db(field.name)
                                for field in fields(Databases)})
        except DAMAGE as error:
            self._env.close()
            raise self.damaged(error) from error

    def _open_db(self, name: str) -> Any:
        try:
            return open_db(self._env, name, create=not self.readonly)
        except lmdb.NotFoundError:
            if name in _OPTIONAL_DBS:
                return None  # read-only, and nothing was ever written to it
            raise

    def legacy_db(self, name: str) -> Any:
        """A database this version no longer uses (an older format's), or None if absent."""
        try:
            return self._env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            return None

    def replace_data_file(self, replacement: Path, keep_replaced: Path | None = None) -> None:
        """Closes the environment, renames `replacement` over its data file with a new lock
        file (durably) and opens it again. Only inside `exclusive()`.

        `keep_replaced`: where a link to the replaced data file is left, for the caller to
        delete once writes go on. The rename would otherwise free its blocks while writes
        wait: 0.97-1.06 s for the 1.9 GB file of 10,000,000 registrations here (ext4).

        Another process may have the environment open (doctor, backup, a rebuild's child).
        LMDB's lock file holds the last transaction's id, which it takes from the data file
        only when no other process has the environment open: reopened beside one, the
        writer would keep the old file's id, build on the wrong meta page of the new file
        and lose its last commits. So the new data file comes with a new lock file, locked
        by this process before either is swapped in: a process opening the store meanwhile
        waits, and the reopening initialises it from the new data file. A process that had
        the store open keeps the old lock file and data file (both unlinked) and reads the
        store as it was before the swap until it opens it again.
        """
        # Claimed and renamed in while this environment still holds the old lock file: a
        # process opening the store can never find the old one held by nobody and make
        # itself its sole owner beside the new data file.
        previous_claim = self._lock_claim
        self._lock_claim = claim_new_lock_file(self.path)
        self._env.close()
        if previous_claim is not None:
            os.close(previous_claim)
        try:
            if keep_replaced is not None:
                _link_if_possible(self.path / DATA_FILE, keep_replaced)
            replacement.replace(self.path / DATA_FILE)
            fsync_directory(self.path)
        finally:
            self._env = self._open_environment()
            self.dbs = self._open_dbs()

    def _release_lock_claim(self) -> None:
        """Only once the environment is closed (see _lock_claim)."""
        if self._lock_claim is not None:
            os.close(self._lock_claim)
            self._lock_claim = None

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def shared(self) -> Iterator[lmdb.Environment]:
        """The environment, under the lock every transaction holds; damage is StoreDamaged."""
        try:
            with self._resize.reading():
                yield self._env
        except DAMAGE as error:
            raise self.damaged(error) from error

    @contextmanager
    def writes_paused(self) -> Iterator[None]:
        """No write transaction of this process begins meanwhile; reads go on."""
        with self._writes:
            yield

    @contextmanager
    def exclusive(self) -> Iterator[lmdb.Environment]:
        """The environment while no transaction of this process is open or can begin."""
        with self._resize.writing():
            yield self._env

    @contextmanager
    def read_txn(self) -> Iterator[lmdb.Transaction]:
        while True:
            began = False
            try:
                with self.shared() as env, env.begin(write=False) as txn:
                    began = True
                    yield txn
                return
            except lmdb.MapResizedError:
                if began:
                    raise
                self._adopt_grown_map()

    def _adopt_grown_map(self) -> None:
        """Another process (the writer) grew the map past this one's: take its size."""
        with self._resize.writing():
            self._env.set_mapsize(0)
            log.debug("adopted the LMDB map's new size of %d bytes",
                      int(self._env.info()["map_size"]))

    @contextmanager
    def peek(self) -> Iterator[tuple[lmdb.Transaction, Databases]]:
        """A read transaction of its own, seeing the latest commit, and the databases to
        read in it; taken without the lock: only inside another transaction of this thread,
        which holds it already (taking it again could wait forever behind a waiting map
        growth).

        A read-only store in another process than the server's (a live rebuild's child,
        a backup) reads the data file a compaction replaced as it was before the swap: the
        latest commit is then read from the current files, through an environment opened
        for the read. Only where the lock file is a new one too: LMDB's locks would not
        survive a second environment on the lock file this one holds."""
        if self.readonly and self._data_file_id() != self._opened_file \
                and self._file_id(LMDB_LOCK_FILE) != self._opened_lock_file:
            current = LmdbEnv(self.path, self.config, readonly=True)
            try:
                with current._env.begin(write=False) as txn:
                    yield txn, current.dbs
            finally:
                current.close()
            return
        with self._env.begin(write=False) as txn:
            yield txn, self.dbs

    def read(self, work: Callable[[lmdb.Transaction], _T]) -> _T:
        with self.read_txn() as txn:
            return work(txn)

    def clear_stale_readers(self) -> int:
        """Frees the reader slots of processes that died (a replica killed mid-read)."""
        with self.shared() as env:
            return int(env.reader_check())

    def write(self, work: Callable[[lmdb.Transaction], _T]) -> _T:
        """Runs `work` in one write transaction, committed durably; grows a full map."""
        while True:
            try:
                with self._writes, self._resize.reading(), \
                        self._env.begin(write=True) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                self._grow_map()
            except DAMAGE as error:
                raise self.damaged(error) from error
            except lmdb.Error as error:
                if _is_disk_full(error):
                    raise ResourceExhausted(f"store: the disk is full ({error})") from error
                raise

    def damaged(self, error: lmdb.Error) -> StoreDamaged:
        log.error("LMDB reports damage in %s: %s", self.path, error)
        return StoreDamaged(f"{self.path}: the store is damaged ({error}); restore it from a "
                            "backup (run `dedup doctor` for a full check)")

    def _grow_map(self) -> None:
        with self._resize.writing():
            current = int(self._env.info()["map_size"])
            if current >= self.config.max_map_size:
                raise ResourceExhausted(
                    f"store: the LMDB map is at its cap of {self.config.max_map_size} bytes"
                )
            grown = min(current * 2, self.config.max_map_size)
            self._env.set_mapsize(grown)
            log.info("grew the LMDB map from %d to %d bytes", current, grown)

    # -- size ------------------------------------------------------------------------

    def file_bytes(self) -> int:
        data_file = self.path / DATA_FILE
        return data_file.stat().st_size if data_file.exists() else 0

    def usage(self) -> StoreUsage:
        with self._resize.reading():
            return _usage_of(self._env, self.file_bytes())

    def close(self) -> None:
        with self._resize.writing():
            self._env.close()
            self._release_lock_claim()


def _usage_of(env: lmdb.Environment, file_bytes: int) -> StoreUsage:
    info, page_size = env.info(), env.stat()["psize"]
    return StoreUsage(map_bytes=int(info["map_size"]),
                      used_bytes=(int(info["last_pgno"]) + 1) * int(page_size),
                      file_bytes=file_bytes)


def _lock_table_current(env: lmdb.Environment) -> bool:
    """Whether the last transaction id in LMDB's lock file is the data file's.

    LMDB initialises the lock file from the data file only when it opens the environment
    alone. A process that opens it beside one holding a lock file from before the data file
    was replaced keeps that file's id: a write would build on an older meta page and lose
    the commits after it; a read would see an older state, on pages the writer may reuse.
    """
    with env.begin(write=False) as txn:
        table_txnid = int(txn.id())
    return table_txnid == int(env.info()["last_txnid"])


def _link_if_possible(source: Path, link: Path) -> None:
    try:
        os.link(source, link)
    except OSError as error:  # a file system without hard links: freed during the rename
        log.warning("could not keep %s as %s (%s): the replaced file is freed while writes "
                    "are paused (about 1 s for each 2 GB on ext4)", source, link, error)


def claim_new_lock_file(directory: Path) -> int:
    """Puts an empty lock file in place of LMDB's, with the byte LMDB locks to tell whether
    it is alone locked by this process: another process opening the environment waits on
    it, and this one's LMDB finds itself alone and initialises the lock file (LMDB then
    shares the byte). Returns the locked file's descriptor."""
    claimed = directory / (LMDB_LOCK_FILE + ".new")
    claimed.unlink(missing_ok=True)  # left by a crash
    descriptor = os.open(claimed, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         PRIVATE_FILE_MODE)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        os.replace(claimed, directory / LMDB_LOCK_FILE)
    except BaseException:
        os.close(descriptor)
        claimed.unlink(missing_ok=True)
        raise
    return descriptor


def _is_disk_full(error: lmdb.Error) -> bool:
    return "No space left" in str(error) or getattr(error, "errno", None) == errno.ENOSPC
