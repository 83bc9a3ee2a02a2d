"""The index checkpoint file: a serialised index with the change sequence it covers.

Layout: magic (8 bytes) | format version (u32) | sequence (u64) | vectors (u64)
| payload length (u64) | SHA-256 of the payload (32 bytes) | embedding model id (64 bytes,
NUL-padded) | index type (64 bytes, NUL-padded) | payload.
Written to a temporary file (mode 0600: the index holds every embedding), fsynced, renamed
over the old one, then the directory is fsynced: a reader sees the old checkpoint or the new
one, never a mix.

The payload is flushed to disk as it is written, FLUSH_EVERY bytes at a time, and its pages
are dropped from the page cache. Written whole and fsynced once, a 720 MB checkpoint (SignIVF
at 10,000,000) left that much dirty data for the store's own fsyncs to queue behind: a commit
beside it waited up to 0.4 s, against 19 ms flushed every 4 MB (benchmarks/checkpoint_write.py).
And the cache keeps the stored vectors that checks re-rank from, not a file read only at the
next start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dedup.core.errors import CheckpointError, ResourceExhausted
from dedup.core.files import open_private

MAGIC = b"DDUPCKPT"
VERSION = 2
_HEADER = struct.Struct("<8sIQQQ32s64s64s")
FLUSH_EVERY = 4 << 20


@dataclass(frozen=True)
class Checkpoint:
    sequence: int
    vectors: int
    # The embedding model whose vectors the index holds (no other model's are ever in it).
    model_id: str
    # The payload in views, written one after the other, so that multi-gigabyte indexes are
    # not copied on their way to and from disk (a checkpoint read holds one).
    parts: tuple[memoryview, ...]
    # The index type ("Flat", "BinarySign512", an IVF factory string).
    kind: str = "Flat"

    @property
    def payload(self) -> memoryview:
        """The payload as one view (joined, when written from several parts)."""
        if len(self.parts) == 1:
            return self.parts[0]
        return memoryview(b"".join(self.parts))

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)


def temporary_of(path: Path) -> Path:
    """Where write_checkpoint writes `path` before renaming it."""
    return path.with_name(path.name + ".tmp")


def write_checkpoint(path: Path, checkpoint: Checkpoint,
                     flush_every: int | None = FLUSH_EVERY) -> None:
    """`flush_every`: bytes between flushes to disk; None writes it all, then fsyncs once."""
    hashed = hashlib.sha256()
    for part in checkpoint.parts:
        hashed.update(part)
    header = _HEADER.pack(
        MAGIC, VERSION, checkpoint.sequence, checkpoint.vectors, checkpoint.nbytes,
        hashed.digest(),
        checkpoint.model_id.encode(), checkpoint.kind.encode(),
    )
    temporary = temporary_of(path)
    try:
        with open_private(temporary, "wb") as handle:
            handle.write(header)
            _write_parts(handle, checkpoint.parts, flush_every)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)  # a partial file would only hold the disk further
        if error.errno == errno.ENOSPC:
            raise ResourceExhausted(f"{path}: no space left to write the index checkpoint; "
                                    "the change log still covers every change") from error
        raise CheckpointError(f"{path}: cannot write the index checkpoint ({error})") from error
    fsync_directory(path.parent)


def _write_parts(handle: IO[Any], parts: tuple[memoryview, ...], flush_every: int | None
                 ) -> None:
    unflushed = 0
    for part in parts:
        data = part.cast("B")
        step = flush_every or max(1, data.nbytes)
        for start in range(0, data.nbytes, step):
            piece = data[start:start + step]
            handle.write(piece)
            unflushed += piece.nbytes
            if flush_every is not None and unflushed >= flush_every:
                _flush(handle)
                unflushed = 0


def _flush(handle: IO[Any]) -> None:
    handle.flush()
    os.fdatasync(handle.fileno())
    if hasattr(os, "posix_fadvise"):  # flushed pages are clean: dropping them is free
        with contextlib.suppress(OSError):  # only advice: the checkpoint is flushed anyway
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_checkpoint(path: Path) -> Checkpoint:
    """Reads and verifies a checkpoint; any damage is a CheckpointError naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: no checkpoint") from error
    except OSError as error:
        raise CheckpointError(f"{path}: unreadable ({error.strerror})") from error
    if len(data) < _HEADER.size:
        raise CheckpointError(f"{path}: truncated header ({len(data)} bytes)")
    magic, version, sequence, vectors, length, digest, model, kind = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not a dedup checkpoint (bad magic)")
    if version != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {version}")
    payload = memoryview(data)[_HEADER.size :]
    if payload.nbytes != length:
        raise CheckpointError(f"{path}: payload is {payload.nbytes} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch")
    return Checkpoint(sequence=sequence, vectors=vectors, model_id=model.rstrip(b"\0").decode(),
                      parts=(payload,), kind=kind.rstrip(b"\0").decode())


def checkpoint_kind(path: Path) -> str | None:
    """The index type a checkpoint holds, from its header alone; None if there is none."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(_HEADER.size)
    except OSError:
        return None
    if len(header) < _HEADER.size or header[:len(MAGIC)] != MAGIC:
        return None
    return str(_HEADER.unpack(header)[7].rstrip(b"\0").decode())


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
