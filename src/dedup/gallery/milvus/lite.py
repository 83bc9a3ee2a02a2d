"""Milvus Lite's flushes, kept apart from every other call this process makes to it.

Milvus Lite 3.2.2 flushes (`engine/collection.py`, `_trigger_flush`) by swapping in a fresh
memtable and write-ahead log *before* it takes its own lock, then writes the old memtable
out as a segment and deletes the old log. A search in that window reads the new, empty
memtable and the old segments: it misses every row being flushed, acknowledged or not (the
stress test's transient misses). A write in it goes to the old log and the new memtable: a
crash before the next flush loses it. So a flush here takes a lock exclusively and every
other call shares it (tests/test_milvus_lite_flush.py holds the window open).

What this cannot cover: Milvus Lite also flushes by itself inside an insert once its
memtable reaches 128 MiB (dedup's own flushes every flush_interval_s keep it far below
that), and a Milvus Lite *server* shared by several dedup processes, whose flushes race the
other processes' calls: run several nodes on a Milvus server, not on Milvus Lite.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

EXCLUSIVE_CALLS = frozenset({"flush"})
_locks: dict[str, SharedLock] = {}
_locks_lock = threading.Lock()


class SharedLock:
    """Many holders at once, or one exclusive holder; a waiting exclusive holder goes
    before new shared ones (flushes are not starved by a stream of searches). Not
    re-entrant: every holder here is one call to Milvus Lite."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sharing = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._exclusive and not self._waiting)
            self._sharing += 1
        try:
            yield
        finally:
            with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._changed:
            self._waiting += 1
            self._changed.wait_for(lambda: not self._exclusive and not self._sharing)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._changed:
                self._exclusive = False
                self._changed.notify_all()


def lock_for(uri: str) -> SharedLock:
    """The one lock of this process for the Milvus Lite at `uri`."""
    where = os.path.abspath(uri) if uri.endswith(".db") else uri
    with _locks_lock:
        return _locks.setdefault(where, SharedLock())


class _GuardedIterator:
    """A query iterator whose pages are fetched under the shared lock."""

    def __init__(self, iterator: Any, lock: SharedLock) -> None:
        self._iterator = iterator
        self._lock = lock

    def next(self) -> Any:
        with self._lock.shared():
            return self._iterator.next()

    def close(self) -> None:
        self._iterator.close()


class GuardedClient:
    """A MilvusClient of a Milvus Lite whose flushes never run beside its other calls."""

    def __init__(self, client: Any, lock: SharedLock) -> None:
        self._client = client
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        hold: Callable[[], AbstractContextManager[None]] = (
            self._lock.exclusive if name in EXCLUSIVE_CALLS else self._lock.shared)

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            with hold():
                result = attribute(*args, **kwargs)
            if name == "query_iterator":
                return _GuardedIterator(result, self._lock)
            return result

        return call


def guarded(client: Any, uri: str) -> GuardedClient:
    return GuardedClient(client, lock_for(uri))
