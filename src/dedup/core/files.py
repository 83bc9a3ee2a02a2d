"""Files and directories readable by their owner only: everything dedup writes holds faces,
ID numbers or phone numbers (the store, checkpoints, backups, exports).

Created with os.open(..., 0o600) and os.mkdir(..., 0o700): the umask can only narrow those
modes, so no other user can read a file at any moment, not even between its creation and a
chmod. A file that already exists with group or other bits (written by an older version) is
narrowed before anything is written into it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("dedup.files")

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
SHARED_BITS = 0o077  # group and other: none of them on anything dedup writes

_WRITE_FLAGS = {"w": os.O_TRUNC, "a": os.O_APPEND}


def private_dir(path: Path, narrow: bool = False) -> Path:
    """`path` as a directory: created 0700 if absent (missing parents with the default mode).

    An existing directory keeps its mode unless `narrow` (for a new, empty target such as a
    backup's), which makes it 0700. (A data directory open to others is refused instead:
    gallery/embedded/data_dir.py.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        if narrow and path_mode(path) & SHARED_BITS:
            os.chmod(path, PRIVATE_DIR_MODE)
    return path


def open_private(path: Path, mode: str = "wb", exclusive: bool = False,
                 newline: str | None = None) -> IO[Any]:
    """`path` opened for writing ("w", "wb", "a", "ab"), created 0600 if absent;
    `exclusive`: an existing file is FileExistsError."""
    flags = os.O_WRONLY | os.O_CREAT | _WRITE_FLAGS[mode[0]]
    if exclusive:
        flags |= os.O_EXCL
    descriptor = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        if os.fstat(descriptor).st_mode & SHARED_BITS:
            os.fchmod(descriptor, PRIVATE_FILE_MODE)
        return os.fdopen(descriptor, mode, newline=None if "b" in mode else newline)
    except BaseException:
        os.close(descriptor)
        raise


def write_private(path: Path, data: bytes | str) -> None:
    """Replaces the contents of `path` (created 0600, or narrowed to it) with `data`."""
    with open_private(path, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def path_mode(path: Path) -> int:
    """The permission bits of `path` (of what a symlink points to)."""
    return stat.S_IMODE(os.stat(path).st_mode)


def shared_dir_mode(path: Path) -> int | None:
    """The mode of an existing directory that group or other may use; None when private
    or absent."""
    try:
        mode = path_mode(path)
    except FileNotFoundError:
        return None
    return mode if mode & SHARED_BITS else None


def narrow_files(directory: Path) -> list[Path]:
    """Takes the group and other bits off every file and directory under `directory` (left
    by an older version); returns those changed."""
    changed = []
    for path in Path(directory).rglob("*"):
        if path.is_symlink():
            continue
        mode = path_mode(path)
        if mode & SHARED_BITS:
            os.chmod(path, mode & ~SHARED_BITS)
            changed.append(path)
    return changed


def allocate(fd: int, size: int) -> None:
    """Makes the file at least `size` bytes, every block of them allocated (what it holds is
    kept). For a file a process maps and writes: sized by ftruncate it is sparse, a page gets
    its block when first written, and on a full disk that write kills the process (SIGBUS);
    allocated, a full disk is an error here (ENOSPC) instead. A filesystem that cannot
    allocate ahead gets the sparse file, with a warning."""
    size = max(size, os.fstat(fd).st_size)
    if size <= 0:  # posix_fallocate refuses a length of 0 (EINVAL)
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        log.warning("cannot allocate a mapped file's blocks ahead (%s): sized sparse, a full "
                    "disk will stop the process that writes it", error)
        os.ftruncate(fd, size)
