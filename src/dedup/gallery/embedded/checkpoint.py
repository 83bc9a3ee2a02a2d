"""The index checkpoint file: a serialised index with the change sequence it covers.

Layout (version 3): magic (8 bytes) | format version (u32) | sequence (u64) | vectors (u64)
| payload length (u64) | SHA-256 (32 bytes) | model id length (u16) | index type length (u16)
| embedding model id (UTF-8) | index type (UTF-8) | payload. The SHA-256 covers everything
but itself: a flipped bit in the sequence would otherwise make the start replay the change
log from the wrong change (an acknowledged enrolment missing, an erased face served).
Version 2 (fixed 64-byte model id and type, the SHA-256 over the payload alone) is still read;
the next checkpoint is written as version 3.
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
VERSION = 3
_FIXED = struct.Struct("<8sIQQQ32sHH")  # version 3, before the model id and index type
_HEADER_V2 = struct.Struct("<8sIQQQ32s64s64s")
_DIGEST_AT = 36  # the SHA-256's offset in both versions' headers
FLUSH_EVERY = 4 << 20
MAX_TEXT_BYTES = 0xFFFF


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
    header = _header(checkpoint)
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


def _header(checkpoint: Checkpoint) -> bytes:
    model, kind = checkpoint.model_id.encode(), checkpoint.kind.encode()
    if max(len(model), len(kind)) > MAX_TEXT_BYTES:
        raise CheckpointError(f"model id or index type over {MAX_TEXT_BYTES} bytes")
    unsigned = _FIXED.pack(MAGIC, VERSION, checkpoint.sequence, checkpoint.vectors,
                           checkpoint.nbytes, bytes(32), len(model), len(kind)) + model + kind
    digest = _sha256(unsigned, checkpoint.parts)
    return unsigned[:_DIGEST_AT] + digest + unsigned[_DIGEST_AT + 32:]


def _sha256(header: bytes, parts: tuple[memoryview, ...], version: int = VERSION) -> bytes:
    """Of the header with its SHA-256 field zeroed, then the payload (version 2: of the
    payload alone)."""
    hashed = _hash_of_header(header, version)
    for part in parts:
        hashed.update(part)
    return hashed.digest()


def _hash_of_header(header: bytes, version: int) -> hashlib._Hash:
    """A SHA-256 fed what a checkpoint signs before its payload."""
    signed = header[:_DIGEST_AT] + bytes(32) + header[_DIGEST_AT + 32:]
    return hashlib.sha256(signed if version == VERSION else b"")


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
    try:
        return _parsed(data)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error


def _parsed(data: bytes) -> Checkpoint:
    header = _header_of(data)
    payload = memoryview(data)[header.size:]
    if payload.nbytes != header.length:
        raise CheckpointError(f"payload is {payload.nbytes} bytes, header says {header.length}")
    if _sha256(data[:header.size], (payload,), header.version) != header.digest:
        raise CheckpointError("checksum mismatch")
    return Checkpoint(sequence=header.sequence, vectors=header.vectors,
                      model_id=header.model_id, parts=(payload,), kind=header.kind)


@dataclass(frozen=True)
class _Header:
    version: int
    sequence: int
    vectors: int
    length: int
    digest: bytes
    model_id: str
    kind: str
    size: int  # bytes before the payload


def _header_of(data: bytes) -> _Header:
    if len(data) >= len(MAGIC) and data[:len(MAGIC)] != MAGIC:
        raise CheckpointError("not a dedup checkpoint (bad magic)")
    _require(data, _FIXED.size)
    version = struct.unpack_from("<I", data, len(MAGIC))[0]
    if version == VERSION:
        _, _, sequence, vectors, length, digest, model_bytes, kind_bytes = _FIXED.unpack_from(data)
        size = _require(data, _FIXED.size + model_bytes + kind_bytes)
        model, kind = data[_FIXED.size:_FIXED.size + model_bytes], data[size - kind_bytes:size]
    elif version == 2:
        size = _require(data, _HEADER_V2.size)
        _, _, sequence, vectors, length, digest, model, kind = _HEADER_V2.unpack_from(data)
        model, kind = model.rstrip(b"\0"), kind.rstrip(b"\0")
    else:
        raise CheckpointError(f"unsupported checkpoint version {version}")
    return _Header(version, sequence, vectors, length, digest, _text(model, "model id"),
                   _text(kind, "index type"), size)


def _require(data: bytes, size: int) -> int:
    """`size`, once `data` is known to hold a header of that many bytes."""
    if len(data) < size:
        raise CheckpointError(f"truncated header ({len(data)} bytes)")
    return size


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as error:
        raise CheckpointError(f"damaged header: its {name} is not UTF-8") from error


def checkpoint_kind(path: Path) -> str | None:
    """The index type a checkpoint holds, from its header alone; None if there is none or
    it is damaged (the header's SHA-256 is checked only when the whole file is read)."""
    try:
        return _head_of(path).kind
    except CheckpointError:
        return None


def checkpoint_model_id(path: Path) -> str:
    """The embedding model a checkpoint's header names, read from the header alone
    (unchecked until the whole file is read); a CheckpointError naming the file if it
    cannot be read."""
    return _head_of(path).model_id


def verified_sequence(path: Path, chunk: int = 1 << 24) -> int:
    """The change sequence a checkpoint covers, its checksum verified by reading the file a
    chunk at a time (not held in memory whole, as read_checkpoint does); a CheckpointError
    naming the file if it is damaged or unreadable."""
    header = _head_of(path)
    try:
        with open(path, "rb") as handle:
            hashed = _hash_of_header(handle.read(header.size), header.version)
            length = 0
            while piece := handle.read(chunk):
                hashed.update(piece)
                length += len(piece)
    except OSError as error:
        raise CheckpointError(f"{path}: unreadable ({error.strerror})") from error
    if length != header.length or hashed.digest() != header.digest:
        raise CheckpointError(f"{path}: checksum mismatch")
    return header.sequence


def _head_of(path: Path) -> _Header:
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_V2.size + 2 * MAX_TEXT_BYTES)
    except OSError as error:
        raise CheckpointError(f"{path}: unreadable ({error.strerror})") from error
    try:
        return _header_of(head)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
