"""The index checkpoint file: a serialised index with the change sequence it covers.

Layout: magic (8 bytes) | format version (u32) | sequence (u64) | vectors (u64)
| payload length (u64) | SHA-256 of the payload (32 bytes) | embedding model id (64 bytes,
NUL-padded) | index type (64 bytes, NUL-padded) | payload.
Written to a temporary file (mode 0600: the index holds every embedding), fsynced, renamed
over the old one, then the directory is fsynced: a reader sees the old checkpoint or the new
one, never a mix.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from dedup.core.errors import CheckpointError, ResourceExhausted
from dedup.core.files import open_private

MAGIC = b"DDUPCKPT"
VERSION = 2
_HEADER = struct.Struct("<8sIQQQ32s64s64s")


@dataclass(frozen=True)
class Checkpoint:
    sequence: int
    vectors: int
    # The embedding model whose vectors the index holds (no other model's are ever in it).
    model_id: str
    # A view, so that multi-gigabyte indexes are not copied on their way to and from disk.
    payload: memoryview
    # The index type ("Flat", "BinarySign512", an IVF factory string).
    kind: str = "Flat"


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    digest = hashlib.sha256(checkpoint.payload).digest()
    header = _HEADER.pack(
        MAGIC, VERSION, checkpoint.sequence, checkpoint.vectors, checkpoint.payload.nbytes, digest,
        checkpoint.model_id.encode(), checkpoint.kind.encode(),
    )
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open_private(temporary, "wb") as handle:
            handle.write(header)
            handle.write(checkpoint.payload)
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
                      payload=payload, kind=kind.rstrip(b"\0").decode())


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
