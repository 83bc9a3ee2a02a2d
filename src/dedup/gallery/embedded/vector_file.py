"""The vector file: every registration's embedding as float32, in a slot of fixed size.

`store/vectors.f32` beside LMDB's files: a header of one page (magic, file format, dimension,
slot size), then slot i holds the embedding of key i + 1. Keys are assigned in increasing
order and never reused, so LMDB keeps no slot column. An erased registration's slot is
zeros, never a valid embedding (they are unit vectors), so its bytes leave the file at once.

Slots are written with os.pwrite and made durable (fdatasync) before the LMDB transaction
that references them commits (store.py). Scattered slots (a re-rank's candidates) are read
through a read-only shared memory map, remapped when the file has grown; runs of slots (a
scan: a rebuild's fill, compaction, doctor) with os.preadv into fresh memory, because the
map, advised MADV_RANDOM for the re-rank, faults a cold file in a page at a time (1,000,000
slots of the 10,000,000 gallery from a cold cache: 70 MB/s through the map, 482 MB/s by
preadv; benchmarks/vector_scan.py). Many scattered slots at once (a training sample) are
read through the map after their reads were queued (POSIX_FADV_WILLNEED). The file grows
in 64 MB steps by ftruncate, so it is sparse: only written slots take disk.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dedup.core.errors import ResourceExhausted, StoreDamaged, StoreError
from dedup.core.files import PRIVATE_FILE_MODE, SHARED_BITS
from dedup.core.vectors import Matrix
from dedup.gallery.embedded.checkpoint import fsync_directory

MAGIC = b"dedup vectors\x00\x00\x00"
FILE_FORMAT = 1
HEADER_BYTES = 4096  # one page, so that slots stay page-aligned
GROWTH_BYTES = 64 << 20
_HEADER = struct.Struct("<16sIII")  # magic, file format, dimension, slot bytes
_SCAN_ROWS = 256  # more rows than this, of a dense run of keys, at once: a scan
_SCAN_CHUNK = 32_768  # slots a scan reads at once (64 MB at 512 dimensions)
# more scattered slots than this at once (a training sample; a re-rank reads at most 64 checks'
# 64 candidates by default): their reads are queued to the disk a chunk at a time
_QUEUED_ROWS = 16_384
_QUEUE_CHUNK = 4_096

Keys = npt.NDArray[np.int64]


class VectorFile:
    """The slots of one vector file: read by any thread; written by one at a time (inside
    the store's write transaction), or zeroed (erasures)."""

    def __init__(self, path: Path, dimension: int, descriptor: int | None,
                 refusal: str = "") -> None:
        self.path = path
        self.dimension = dimension
        self.slot_bytes = 4 * dimension
        self._descriptor = descriptor
        self._refusal = refusal  # why this store's embeddings cannot be read here, if so
        self._size = HEADER_BYTES if descriptor is None else os.fstat(descriptor).st_size
        self._remapping = threading.Lock()
        self._view: Matrix = np.empty((0, dimension), np.float32)
        self._remap()

    @classmethod
    def open(cls, path: Path, dimension: int, assigned: int, writable: bool) -> VectorFile:
        """The vector file of a store that has assigned keys 1..`assigned`. Created when
        absent if `writable` and no key was assigned; StoreDamaged if it is missing, its
        header is not a vector file's of this dimension, or it is too short for those keys."""
        descriptor = _open_descriptor(path, dimension, writable, assigned)
        if descriptor is None:
            return cls(path, dimension, None)
        try:
            _check_header(path, descriptor, dimension)
            opened = cls(path, dimension, descriptor)
            opened.check_length(assigned)
        except BaseException:
            os.close(descriptor)
            raise
        return opened

    @classmethod
    def unavailable(cls, path: Path, dimension: int, why: str) -> VectorFile:
        """A stand-in whose reads raise StoreError(`why`)."""
        return cls(path, dimension, None, refusal=why)

    @property
    def available(self) -> bool:
        return not self._refusal

    def slots(self) -> int:
        """How many slots the file has room for (written or not)."""
        return max(0, (self._size - HEADER_BYTES) // self.slot_bytes)

    def check_length(self, assigned: int) -> None:
        if self.slots() < assigned:
            raise damaged(self.path, f"holds {self.slots()} slots but the store has assigned "
                          f"{assigned} keys (the file was cut short)")

    def disk_bytes(self) -> tuple[int, int]:
        """The file's size and the bytes it takes on disk (it is sparse)."""
        if self._descriptor is None:
            return 0, 0
        status = os.fstat(self._descriptor)
        return status.st_size, status.st_blocks * 512

    # -- reading ---------------------------------------------------------------------

    def rows(self, keys: Keys) -> Matrix:
        """Copies of the slots of `keys` (each >= 1); zero rows for keys past the file."""
        index = keys - 1
        first, stop = (int(index.min()), int(index.max()) + 1) if len(index) else (0, 0)
        view = self._view_covering(stop)
        if len(keys) > _SCAN_ROWS and stop - first <= 2 * len(keys):  # a dense run: a scan
            return self._scan(index, first, stop, len(view))
        if len(keys) > _QUEUED_ROWS:
            return self._gather_queued(view, index)
        return self._gather(view, index)

    def block(self, first_key: int, count: int) -> Matrix:
        """The slots of keys `first_key` .. `first_key` + `count` - 1, read into fresh memory
        (fewer rows if the file ends before)."""
        start = first_key - 1
        slots = len(self._view_covering(start + count))
        return self._read_slots(start, max(start, min(start + count, slots)), slots)

    def _gather(self, view: Matrix, index: Keys) -> Matrix:
        inside = index < len(view)
        if inside.all():
            return view[index]
        rows = np.zeros((len(index), self.dimension), np.float32)
        rows[inside] = view[index[inside]]
        return rows

    def _gather_queued(self, view: Matrix, index: Keys) -> Matrix:
        """Many scattered slots through the map, each chunk's reads first queued to the disk
        at once (POSIX_FADV_WILLNEED), where the map would fault them in one after another
        (262,144 slots of the 10,000,000 gallery from a cold cache: 19.5 s, 2.6 s queued;
        benchmarks/vector_scan.py)."""
        rows = np.empty((len(index), self.dimension), np.float32)
        for start in range(0, len(index), _QUEUE_CHUNK):
            part = index[start:start + _QUEUE_CHUNK]
            self._queue_reads(part[part < len(view)])
            rows[start:start + len(part)] = self._gather(view, part)
        return rows

    def _queue_reads(self, index: Keys) -> None:
        descriptor = self._descriptor
        if descriptor is None or not hasattr(os, "posix_fadvise"):
            return
        try:
            for slot in index.tolist():
                os.posix_fadvise(descriptor, HEADER_BYTES + slot * self.slot_bytes,
                                 self.slot_bytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # only advice: the map reads them regardless
            pass

    def _scan(self, index: Keys, first: int, stop: int, slots: int) -> Matrix:
        """The rows of slots `index` (first..stop-1 their span), read a chunk of the span at a
        time: at most one chunk beyond the rows is in memory."""
        if stop - first <= _SCAN_CHUNK and _consecutive(index):
            return self._read_slots(first, stop, slots)
        rows = np.empty((len(index), self.dimension), np.float32)
        for start in range(first, stop, _SCAN_CHUNK):
            end = min(start + _SCAN_CHUNK, stop)
            inside = (index >= start) & (index < end)
            if inside.any():
                rows[inside] = self._read_slots(start, end, slots)[index[inside] - start]
        return rows

    def _read_slots(self, start: int, stop: int, slots: int) -> Matrix:
        """Slots start..stop-1 by preadv, zeros for those at or past `slots` (the file's end
        when it was mapped)."""
        rows = np.empty((stop - start, self.dimension), np.float32)
        raw = rows.reshape(-1).view(np.uint8)
        wanted = max(0, min(stop, slots) - start) * self.slot_bytes
        descriptor = self._descriptor
        done = 0 if descriptor is None else self._read_into(
            descriptor, raw[:wanted], HEADER_BYTES + start * self.slot_bytes)
        raw[done:] = 0
        return rows

    def _read_into(self, descriptor: int, buffer: npt.NDArray[np.uint8], offset: int) -> int:
        """Reads into `buffer` from `offset`; how many bytes (fewer if the file ends sooner)."""
        done = 0
        try:
            while done < len(buffer):
                read = os.preadv(descriptor, [buffer[done:].data], offset + done)
                if read == 0:
                    break
                done += read
        except OSError as error:  # EIO, or a read racing close(): not a damaged slot
            raise StoreError(f"{self.path}: the vector file could not be read: "
                             f"{error.strerror or error}") from error
        return done

    def _view_covering(self, slots: int) -> Matrix:
        if self._refusal:
            raise StoreError(self._refusal)
        view = self._view
        return view if len(view) >= slots else self._remap()

    def _remap(self) -> Matrix:
        """Maps the whole file again if it has grown; returns the current view."""
        with self._remapping:
            if self._descriptor is None:
                return self._view
            slots = max(0, (os.fstat(self._descriptor).st_size - HEADER_BYTES) // self.slot_bytes)
            if slots > len(self._view):
                mapped = mmap.mmap(self._descriptor, HEADER_BYTES + slots * self.slot_bytes,
                                   flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                mapped.madvise(mmap.MADV_RANDOM)  # re-ranking reads a few scattered slots
                self._view = np.frombuffer(mapped, np.float32, count=slots * self.dimension,
                                           offset=HEADER_BYTES).reshape(slots, self.dimension)
            return self._view

    # -- writing ---------------------------------------------------------------------

    def write(self, keys: list[int], vectors: Matrix) -> None:
        """Writes row i of `vectors` into the slot of keys[i] (increasing); durable only
        after sync()."""
        if not keys:
            return
        descriptor = self._writable()
        rows = np.ascontiguousarray(vectors, np.float32)
        with self._writing():
            self._grow_to(keys[-1])
            for start, stop in _runs(keys):
                _pwrite_all(descriptor, rows[start:stop].tobytes(), self._offset(keys[start]))

    def zero(self, keys: list[int]) -> int:
        """Overwrites with zeros the slots of `keys` that hold anything; how many did (durable
        only after sync())."""
        descriptor = self._writable()
        held: list[int] = []
        # A chunk at a time: a compaction hands every key ever erased (1,000,000 slots would
        # be 2 GB read at once).
        for start in range(0, len(keys), _SCAN_CHUNK):
            chunk = np.asarray(keys[start:start + _SCAN_CHUNK], np.int64)
            held += chunk[self.rows(chunk).any(axis=1)].tolist()
        zeros = bytes(self.slot_bytes)
        with self._writing():
            for key in held:
                _pwrite_all(descriptor, zeros, self._offset(key))
        return len(held)

    def reserve(self, assigned: int) -> None:
        """Room for the slots of keys 1..`assigned` (erased ones at the end stay holes)."""
        with self._writing():
            self._grow_to(assigned)

    def cut_after(self, assigned: int) -> int:
        """Drops every slot past key `assigned` (written for a transaction that never
        committed: a kill between the two). Only while no other thread reads. How many
        slots' room was dropped."""
        descriptor, end = self._writable(), self._offset(assigned + 1)
        if self._size <= end:
            return 0
        dropped = self.slots() - assigned
        with self._writing():
            os.ftruncate(descriptor, end)
            os.fdatasync(descriptor)
        self._size = end
        self._view = np.empty((0, self.dimension), np.float32)
        self._remap()
        return dropped

    def sync(self) -> None:
        """Makes every write and zeroing so far durable."""
        with self._writing():
            os.fdatasync(self._writable())

    def close(self) -> None:
        self._view = np.empty((0, self.dimension), np.float32)
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def _offset(self, key: int) -> int:
        return HEADER_BYTES + (key - 1) * self.slot_bytes

    def _grow_to(self, last_key: int) -> None:
        needed = self._offset(last_key + 1)
        if needed > self._size:
            steps = -(-(needed - HEADER_BYTES) // GROWTH_BYTES)
            self._size = HEADER_BYTES + steps * GROWTH_BYTES
            os.ftruncate(self._writable(), self._size)

    def _writable(self) -> int:
        if self._descriptor is None:
            raise StoreError(f"{self.path}: the vector file is open read-only")
        return self._descriptor

    def _writing(self) -> AbstractContextManager[None]:
        return _write_errors(self.path)


@contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A full disk is ResourceExhausted; any other failed write a StoreError naming the file."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise ResourceExhausted(f"store: the disk is full ({error})") from error
        raise StoreError(f"{path}: cannot write the vector file ({error})") from error


def damaged(path: Path, what: str) -> StoreDamaged:
    return StoreDamaged(f"{path}: the store is damaged: the vector file {what}; restore it "
                        "from a backup (run `dedup doctor` for a full check)")


def header(dimension: int) -> bytes:
    return _HEADER.pack(MAGIC, FILE_FORMAT, dimension, 4 * dimension).ljust(HEADER_BYTES, b"\0")


def _open_descriptor(path: Path, dimension: int, writable: bool, assigned: int) -> int | None:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        if assigned:
            raise damaged(path, f"is missing, but the store has assigned {assigned} keys") from None
        return _create(path, dimension) if writable else None
    if writable and os.fstat(descriptor).st_mode & SHARED_BITS:
        os.fchmod(descriptor, PRIVATE_FILE_MODE)  # left readable by hand: narrowed, as LMDB's
    return descriptor


def _create(path: Path, dimension: int) -> int:
    """A new file holding only the header, made whole under another name and renamed."""
    partial = path.with_name(path.name + ".new")
    descriptor = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         PRIVATE_FILE_MODE)
    try:
        if os.fstat(descriptor).st_mode & SHARED_BITS:
            os.fchmod(descriptor, PRIVATE_FILE_MODE)
        _pwrite_all(descriptor, header(dimension), 0)
        os.fsync(descriptor)
        os.replace(partial, path)
        fsync_directory(path.parent)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _check_header(path: Path, descriptor: int, dimension: int) -> None:
    raw = os.pread(descriptor, HEADER_BYTES, 0)
    if len(raw) < HEADER_BYTES:
        raise damaged(path, f"is {len(raw)} bytes long, shorter than its header")
    magic, file_format, stored_dimension, slot_bytes = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise damaged(path, "does not start with a vector file's header")
    if file_format != FILE_FORMAT:
        raise StoreError(f"{path}: vector file format {file_format}, this dedup reads "
                         f"{FILE_FORMAT}")
    if (stored_dimension, slot_bytes) != (dimension, 4 * dimension):
        raise damaged(path, f"header says {stored_dimension}-d slots of {slot_bytes} bytes, "
                      f"the store holds {dimension}-d embeddings")


def _consecutive(index: Keys) -> bool:
    """Whether `index` is one run of consecutive slots, in order."""
    return len(index) > 0 and bool((np.diff(index) == 1).all())


def _runs(keys: list[int]) -> Iterator[tuple[int, int]]:
    """(start, stop) positions of each run of consecutive keys."""
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[i - 1] + 1:
            yield start, i
            start = i


def _pwrite_all(descriptor: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(descriptor, view, offset)
        view, offset = view[written:], offset + written
