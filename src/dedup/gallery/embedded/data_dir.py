"""Opening a data directory: its lock, held while open, and the store in it.

One process at a time serves or bulk-loads a data directory, since its index is in memory.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

from dedup.core.errors import StoreError
from dedup.core.settings import StoreConfig
from dedup.gallery.embedded.layout import LOCK_FILE, store_dir
from dedup.gallery.embedded.store import Store
from dedup.gallery.embedded.store_check import walk_store


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Takes the data directory's lock; it is held until the returned file is closed."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / LOCK_FILE, "ab")  # noqa: SIM115 - held until close()
    except OSError as error:
        raise StoreError(f"{data_dir}: cannot use the data directory ({error})") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreError(f"{data_dir} is in use by another dedup process (a running server?): "
                         "stop it, or send the work to it with --server") from None
    return handle


def open_data_dir(config: StoreConfig) -> tuple[IO[bytes], Store]:
    """Locks the data directory, walks the store's files if `check_on_open`, opens the store."""
    data_dir = Path(config.data_dir)
    lock = lock_data_dir(data_dir)
    try:
        if config.check_on_open:
            walk_store(store_dir(data_dir))
        return lock, Store(config)
    except BaseException:
        lock.close()
        raise
