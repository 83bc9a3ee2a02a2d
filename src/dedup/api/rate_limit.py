"""Per-caller call rates: a token bucket for each caller identity, in one process or shared
by the processes of a multi-process server."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dedup.core.files import allocate


class CallerRate:
    """At most `rate` calls a second per caller, in bursts of up to `burst`; rate 0: no limit.

    One bucket per identity: identities come from the security file (certificate subjects and
    token names), so there are few.
    """

    def __init__(self, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, when)
        self._lock = threading.Lock()

    def admit(self, identity: str) -> bool:
        """Takes one call from the caller's bucket; False when it is empty."""
        if self.rate <= 0:
            return True
        with self._lock:
            return self._admit_here(identity, self.clock())

    def refund(self, identity: str) -> None:
        """Gives back the call `admit` took last: the call did nothing (RefusedUnstarted)."""
        if self.rate <= 0:
            return
        with self._lock:
            self._refund_here(identity)

    def _refund_here(self, identity: str) -> None:
        tokens, then = self._buckets.get(identity, (self.burst, self.clock()))
        self._buckets[identity] = (min(self.burst, tokens + 1.0), then)

    def _admit_here(self, identity: str, now: float) -> bool:
        """Takes one call from this process's bucket of the caller (the lock held)."""
        tokens, then = self._buckets.get(identity, (self.burst, now))
        admitted, left = self._take(tokens, then, now)
        self._buckets[identity] = (left, now)
        return admitted

    def _take(self, tokens: float, then: float, now: float) -> tuple[bool, float]:
        """Refills a bucket holding `tokens` at `then` up to `now` and takes one call if it
        can: (admitted, tokens left)."""
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        return (True, tokens - 1.0) if tokens >= 1.0 else (False, tokens)


class SharedCallerRate(CallerRate):
    """The buckets in a file every process of a multi-process server maps: the kernel
    spreads a caller's connections over the processes, and per process N of them would
    admit N times the rate. Each admission takes the file's lock (fcntl, microseconds).

    The file holds SLOTS buckets, each an identity's 16-byte digest, its tokens and when
    they were counted (CLOCK_MONOTONIC, one clock for every process of the machine); an
    identity past a full table keeps a bucket in its process, as CallerRate does.
    """

    SLOTS = 4096
    _SLOT = struct.Struct("<16sdd")

    def __init__(self, path: Path, rate: float, burst: int, create: bool) -> None:
        super().__init__(rate, burst)
        size = self.SLOTS * self._SLOT.size
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
        self._fd = os.open(path, flags, 0o600)
        try:
            if create:
                allocate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise

    def admit(self, identity: str) -> bool:
        if self.rate <= 0:
            return True
        digest = _digest(identity)
        with self._lock, self._file_locked():
            now = self.clock()
            offset = self._slot_of(digest)
            if offset is None:
                return self._admit_here(identity, now)
            held, tokens, then = self._SLOT.unpack_from(self._map, offset)
            if held != digest:
                tokens, then = self.burst, now
            admitted, left = self._take(tokens, then, now)
            self._SLOT.pack_into(self._map, offset, digest, left, now)
            return admitted

    def refund(self, identity: str) -> None:
        if self.rate <= 0:
            return
        digest = _digest(identity)
        with self._lock, self._file_locked():
            offset = self._slot_of(digest)
            if offset is None:
                self._refund_here(identity)
                return
            held, tokens, then = self._SLOT.unpack_from(self._map, offset)
            if held == digest:
                self._SLOT.pack_into(self._map, offset, digest, min(self.burst, tokens + 1.0),
                                     then)

    @contextlib.contextmanager
    def _file_locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _slot_of(self, digest: bytes) -> int | None:
        """The offset of the identity's slot, or of the free slot it takes (open
        addressing); None when the table is full."""
        first = int.from_bytes(digest[:8], "little") % self.SLOTS
        for step in range(self.SLOTS):
            offset = (first + step) % self.SLOTS * self._SLOT.size
            held = self._map[offset:offset + 16]
            if held == digest or held == bytes(16):
                return offset
        return None

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def _digest(identity: str) -> bytes:
    return hashlib.blake2b(identity.encode(), digest_size=16).digest()
