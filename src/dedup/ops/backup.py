"""`dedup backup`: a consistent hot copy of a data directory, taken beside a running server."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dedup.core.errors import CheckpointError, StoreError
from dedup.core.files import open_private, private_dir
from dedup.core.records import DeleteKey
from dedup.core.settings import StoreConfig
from dedup.gallery.embedded.checkpoint import (
    checkpoint_model_id,
    fsync_directory,
    verified_sequence,
    write_checkpoint,
)
from dedup.gallery.embedded.data_dir import refuse_unfinished_backup
from dedup.gallery.embedded.index import load_index
from dedup.gallery.embedded.layout import (
    CHECKPOINT_FILE,
    UNFINISHED_BACKUP,
    store_dir,
    store_file,
)
from dedup.gallery.embedded.replay import apply_delta, change_delta
from dedup.gallery.embedded.store import Store

log = logging.getLogger("dedup.ops")


@dataclass(frozen=True)
class BackupReport:
    registrations: int
    sequence: int
    store_bytes: int  # data.mdb and the vector file, on disk
    checkpoint_bytes: int
    seconds: float
    erased_meanwhile: int = 0  # erased in the source while it was copied: erased in the copy
    # What became of the index checkpoint: "copied", "brought up to the copy" (it held
    # registrations erased since it was written), "left out" (see _checkpoint_of_the_copy)
    # or "none" (the source had none).
    checkpoint: str = "copied"


def backup(data_dir: Path, dest: Path) -> BackupReport:
    """Copies the checkpoint, then the store: LMDB's compacting copy in one read transaction,
    then the vector file's slots up to that transaction's last key.

    The checkpoint is copied first so that it never covers changes the copied store lacks;
    a restored server replays the log after it, or rebuilds from the store. A registration
    erased in the source before the slots are all read is erased in the copy too, and then
    the copy holds no byte of it, nor of anyone erased before the backup began:
    - its store is compacted (entry by entry, as the server's compaction) whenever it holds
      erasures not compacted away: LMDB's copy copies whole pages, whose free space can hold
      bytes of deleted entries;
    - the checkpoint, when the copy's change log removes registrations after it, is loaded,
      brought up to the copy by that log and written again (or left out where the log no
      longer reaches back to it, or it cannot be read: a restored server builds its index
      from the store).
    `dest` and its store directory are 0700 and every file in them 0600, as in a data
    directory. A backup that fails removes what it wrote; one killed leaves its marker
    (UNFINISHED_BACKUP), and a server refuses the directory.
    """
    started = time.monotonic()
    if not store_file(data_dir).exists():
        raise StoreError(f"{data_dir}: no dedup store to back up")
    refuse_unfinished_backup(data_dir)
    if dest.exists() and any(dest.iterdir()):
        raise StoreError(f"{dest}: not empty; back up into a new directory")
    made = not dest.exists()
    marker = dest / UNFINISHED_BACKUP
    private_dir(dest, narrow=True)
    try:
        with open_private(marker, "wb", exclusive=True) as handle:  # one backup a DEST
            os.fsync(handle.fileno())
    except FileExistsError:
        raise StoreError(f"{dest}: another backup is being written there") from None
    try:
        report = _backup(data_dir, dest, started)
        marker.unlink()
        fsync_directory(dest)
        return report
    except BaseException:
        _remove_written(dest, made)
        raise


def _backup(data_dir: Path, dest: Path, started: float) -> BackupReport:
    private_dir(store_dir(dest))
    checkpoint_bytes = _copy_checkpoint(data_dir / CHECKPOINT_FILE, dest / CHECKPOINT_FILE)
    source = Store.reader(data_dir)
    try:
        erased = source.copy_to(store_dir(dest)).erased_meanwhile
    finally:
        source.close()
    _erase_in_copy(dest, erased)
    checkpoint = _checkpoint_of_the_copy(dest) if checkpoint_bytes else "none"
    copied = Store.reader(dest)
    try:
        report = BackupReport(copied.count(), copied.sequence(),
                              store_file(dest).stat().st_size + copied.vector_file_bytes()[1],
                              _size_of(dest / CHECKPOINT_FILE), time.monotonic() - started,
                              len(erased), checkpoint)
    finally:
        copied.close()
    (store_dir(dest) / "lock.mdb").unlink(missing_ok=True)  # a reader's lock file, not data
    return report


def _erase_in_copy(dest: Path, registration_ids: list[str]) -> None:
    """Erases the registrations in the copy (each logged, so a restored server's index
    replays it), and compacts it if it holds any erasure not compacted away. A copy of
    a format-1 store (an older version's) is left as it is: opened for writing it would be
    upgraded, and no longer be a copy; the server that upgrades it compacts it."""
    reader = Store.reader(dest)
    try:
        legacy, erased_since = reader.legacy_format, reader.erased_since()
    finally:
        reader.close()
    if not registration_ids and (erased_since is None or legacy):
        return
    copy = Store(StoreConfig(data_dir=dest, check_on_open=False))
    try:
        for registration_id in registration_ids:
            copy.delete(DeleteKey.REGISTRATION_ID, registration_id)
        if copy.erased_since() is not None:
            copy.compact()
    finally:
        copy.close()


def _checkpoint_of_the_copy(dest: Path) -> str:
    """The copied checkpoint, brought up to the copy's store if the change log after it
    removes registrations (its index holds their embeddings or codes); left out if the log
    no longer reaches back to it (a checkpoint written since truncated it), it cannot be
    read, or the memory would not hold it. Returns what was done (BackupReport.checkpoint)."""
    path = dest / CHECKPOINT_FILE
    copy = Store.reader(dest)
    try:
        return _bring_up(path, copy)
    except CheckpointError as error:
        return _left_out(path, f"it cannot be read ({error})")
    except MemoryError:
        return _left_out(path, "not enough memory to bring it up")
    finally:
        copy.close()


def _bring_up(path: Path, copy: Store) -> str:
    model_id, covered = checkpoint_model_id(path), verified_sequence(path)
    delta = change_delta(copy, covered)
    if delta.complete and not delta.removed:
        return "copied"
    if not delta.complete:
        return _left_out(path, "the change log no longer reaches back to it")
    if copy.legacy_format:  # its embeddings are in LMDB, which the replay does not read
        return _left_out(path, "the copy is of a format-1 store")
    available = _memory_available()
    if available is not None and path.stat().st_size * 3 > available:
        return _left_out(path, f"bringing it up would take about three times its size in "
                         f"memory, and {available / 2**30:.1f} GiB is available")
    index, _ = load_index(path, copy.config.dimension, model_id)
    apply_delta(copy, index, delta, model_id)
    write_checkpoint(path, index.snapshot(delta.current, model_id))
    return "brought up to the copy"


def _left_out(path: Path, why: str) -> str:
    log.warning("backup: the index checkpoint is left out of the copy: %s; a server started "
                "on it builds its index from the store", why)
    path.unlink()
    fsync_directory(path.parent)
    return "left out"


def _memory_available() -> int | None:
    """The memory this process may still take, in bytes: MemAvailable (Linux), or less where
    its cgroup's limit (v2 memory.max, v1 memory.limit_in_bytes) leaves less; None where
    neither is known."""
    known = [value for value in (_mem_available(), cgroup_room()) if value is not None]
    return min(known) if known else None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"),
                root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's memory cgroup still lets it take: the smallest limit along its
    path (v2 memory.max, v1 memory.limit_in_bytes) less what that cgroup uses, its
    reclaimable page cache not counted (the server's mapped vector file is charged to it);
    None without a limit, or where it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            return _room(root, path, "memory.max", "memory.current", "inactive_file")
        if "memory" in controllers.split(","):  # v1
            return _room(root / "memory", path, "memory.limit_in_bytes",
                         "memory.usage_in_bytes", "total_inactive_file")
    return None


def _room(root: Path, path: str, limit_file: str, usage_file: str, reclaimable: str
          ) -> int | None:
    """The room under the smallest limit from `root`/`path` up to `root`, measured in the
    cgroup that sets it (a namespaced /proc/self/cgroup names "/": `root` itself)."""
    directory, rooms = root / path.strip("/"), []
    while True:
        try:
            most = (directory / limit_file).read_text().strip()
            if most != "max" and int(most) < 1 << 60:
                used = int((directory / usage_file).read_text())
                stat = dict(line.split() for line in
                            (directory / "memory.stat").read_text().splitlines())
                rooms.append(max(0, int(most) - used + int(stat.get(reclaimable, 0))))
        except (OSError, ValueError):
            pass
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    return min(rooms) if rooms else None


def _size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _remove_written(dest: Path, made: bool) -> None:
    """What a failed backup wrote into `dest` (and `dest` itself if it made it): everything
    in it, which was empty when its marker was made (exclusively: no other backup writes
    there). A part that cannot be removed is logged; the marker goes last."""
    def failed(_function: object, path: str, error: object) -> None:
        log.error("backup: cannot remove %s, written by the backup that failed: %s", path,
                  error[1] if isinstance(error, tuple) else error)

    for child in sorted(dest.iterdir(), key=lambda path: path.name == UNFINISHED_BACKUP):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, onerror=failed)  # onexc from Python 3.12 only
        else:
            try:
                child.unlink(missing_ok=True)
            except OSError as error:
                failed(None, str(child), error)
    if made:
        shutil.rmtree(dest, onerror=failed)


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
