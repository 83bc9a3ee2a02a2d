"""Opening a data directory: its access, its lock, held while open, and the store in it.

One process at a time serves or bulk-loads a data directory, since its index is in memory.
The directory is 0700 and every file in it 0600: it holds the population's faces, ID numbers
and phone numbers.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
from pathlib import Path
from typing import IO

from dedup.core.errors import SharedDataDir, StoreError
from dedup.core.files import narrow_files, open_private, private_dir, shared_dir_mode
from dedup.core.settings import StoreConfig
from dedup.gallery.embedded.layout import (
    LOCK_FILE,
    UNFINISHED_BACKUP,
    compaction_dir,
    store_dir,
    store_file,
)
from dedup.gallery.embedded.store import Store
from dedup.gallery.embedded.store_check import walk_store
from dedup.gallery.embedded.store_upgrade import Upgrade, UpgradeProgress

log = logging.getLogger("dedup.store")


def check_access(data_dir: Path, allow_shared: bool) -> None:
    """SharedDataDir if group or other users may use `data_dir`, unless `allow_shared`
    (then a warning). A private directory's files left readable by an older version are
    narrowed to the owner."""
    mode = shared_dir_mode(data_dir)
    if mode is None:
        _narrow_files(data_dir)
        return
    if not allow_shared:
        raise SharedDataDir(data_dir, mode)
    log.warning("SERVING A SHARED DATA DIRECTORY: %s has mode %04o, so other users on this "
                "host can read every registration in it (--allow-shared-data-dir); "
                "run `chmod 700 %s`", data_dir, mode, data_dir)


def _narrow_files(data_dir: Path) -> None:
    try:
        narrowed = narrow_files(data_dir) if data_dir.is_dir() else []
    except OSError as error:  # another user's file, say: the directory still shields it
        log.warning("could not narrow the files in %s to their owner: %s", data_dir, error)
        return
    for path in narrowed:
        log.info("narrowed %s to its owner (other users could read it)", path)


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Takes the data directory's lock; it is held until the returned file is closed."""
    try:
        private_dir(data_dir)
        handle: IO[bytes] = open_private(data_dir / LOCK_FILE, "ab")
    except OSError as error:
        raise StoreError(f"{data_dir}: cannot use the data directory ({error})") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreError(f"{data_dir} is in use by another dedup process (a running server?): "
                         "stop it, or send the work to it with --server") from None
    return handle


def open_data_dir(config: StoreConfig, upgrade_progress: UpgradeProgress | None = None
                  ) -> tuple[IO[bytes], Store]:
    """Checks who may use the data directory, locks it, walks the store's files if
    `check_on_open`, opens the store (upgrading a store of an older format, see Store)."""
    data_dir = Path(config.data_dir)
    check_access(data_dir, config.allow_shared_data_dir)
    lock = lock_data_dir(data_dir)
    try:
        refuse_unfinished_backup(data_dir)
        # before anything that may refuse the store: what it holds must not outlive a failed start
        remove_unfinished_compaction(store_dir(data_dir))
        if config.check_on_open:
            walk_store(store_dir(data_dir))
        return lock, Store(config, upgrade_progress=upgrade_progress)
    except BaseException:
        lock.close()
        raise


def refuse_unfinished_backup(data_dir: Path) -> None:
    """A backup killed before it finished leaves its marker in its directory: what it holds
    is no backup (registrations erased meanwhile may still be in it)."""
    if (data_dir / UNFINISHED_BACKUP).exists():
        raise StoreError(f"{data_dir}: a backup that did not finish (killed?) was being "
                         "written here: it may hold registrations erased since, and is no "
                         "backup. Remove the directory and back up again")


def remove_unfinished_compaction(store_path: Path) -> None:
    """A compaction killed before it cleaned up leaves its directory: a copy of the store, and
    after the swap the replaced data file, whose free pages may hold erased registrations.
    Only by the holder of the data directory's lock (no compaction can be running)."""
    staging = compaction_dir(store_path)
    if not staging.exists():
        return
    try:
        shutil.rmtree(staging)
    except OSError as error:
        raise StoreError(f"{staging}: left by a compaction that did not finish, and it may "
                         f"hold erased registrations' bytes; cannot remove it ({error})"
                         ) from error
    log.warning("removed %s, left by a compaction that did not finish", staging)


def upgrade_data_dir(data_dir: Path, progress: UpgradeProgress) -> Upgrade | None:
    """Upgrades the store in `data_dir` (no other process may hold it) to this version's
    format, as a server's start would; None if it was in that format already."""
    if not store_file(data_dir).exists():
        raise StoreError(f"{data_dir}: no dedup store here")
    lock, store = open_data_dir(StoreConfig(data_dir=data_dir), progress)
    try:
        return store.upgraded
    finally:
        store.close()
        lock.close()
