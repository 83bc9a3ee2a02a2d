"""`dedup backup`: a consistent hot copy of a data directory, taken beside a running server."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dedup.core.errors import StoreError
from dedup.core.files import open_private, private_dir
from dedup.core.records import DeleteKey
from dedup.core.settings import StoreConfig
from dedup.gallery.embedded.layout import CHECKPOINT_FILE, store_dir, store_file
from dedup.gallery.embedded.store import Store


@dataclass(frozen=True)
class BackupReport:
    registrations: int
    sequence: int
    store_bytes: int  # data.mdb and the vector file, on disk
    checkpoint_bytes: int
    seconds: float
    erased_meanwhile: int = 0  # erased in the source while it was copied: erased in the copy


def backup(data_dir: Path, dest: Path) -> BackupReport:
    """Copies the checkpoint, then the store: LMDB's compacting copy in one read transaction,
    then the vector file's slots up to that transaction's last key.

    The checkpoint is copied first so that it never covers changes the copied store lacks;
    a restored server replays the log after it, or rebuilds from the store. A registration
    erased in the source between the two store copies (its slot zeroed before it was read) is
    erased in the copy too, which is then compacted: the copy never holds a record without
    its embedding, nor any byte of it. `dest` and its store directory are 0700 and every file
    in them 0600, as in a data directory.
    """
    started = time.monotonic()
    if not store_file(data_dir).exists():
        raise StoreError(f"{data_dir}: no dedup store to back up")
    if dest.exists() and any(dest.iterdir()):
        raise StoreError(f"{dest}: not empty; back up into a new directory")
    private_dir(store_dir(private_dir(dest, narrow=True)))
    checkpoint_bytes = _copy_checkpoint(data_dir / CHECKPOINT_FILE, dest / CHECKPOINT_FILE)
    source = Store.reader(data_dir)
    try:
        erased = source.copy_to(store_dir(dest)).erased_meanwhile
    finally:
        source.close()
    if erased:
        _erase_in_copy(dest, erased)
    copied = Store.reader(dest)
    try:
        report = BackupReport(copied.count(), copied.sequence(),
                              store_file(dest).stat().st_size + copied.vector_file_bytes()[1],
                              checkpoint_bytes, time.monotonic() - started, len(erased))
    finally:
        copied.close()
    (store_dir(dest) / "lock.mdb").unlink(missing_ok=True)  # a reader's lock file, not data
    return report


def _erase_in_copy(dest: Path, registration_ids: list[str]) -> None:
    """Erases the registrations in the copy (each logged, so a restored server's index
    replays it) and compacts it."""
    copy = Store(StoreConfig(data_dir=dest, check_on_open=False))
    try:
        for registration_id in registration_ids:
            copy.delete(DeleteKey.REGISTRATION_ID, registration_id)
        copy.compact()
    finally:
        copy.close()


def _copy_checkpoint(source: Path, target: Path) -> int:
    partial = target.with_name(target.name + ".partial")
    try:
        original = open(source, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return 0
    # The server replaces the checkpoint by rename: the open file is a whole one.
    with original, open_private(partial, "wb") as copy:
        shutil.copyfileobj(original, copy)
        copy.flush()
        os.fsync(copy.fileno())
    partial.rename(target)
    return target.stat().st_size
