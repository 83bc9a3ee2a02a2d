"""Runs a call's synchronous servicer code on the worker pool so that no worker ever waits
for the client.

A unary behaviour is one step on the pool. A response generator is stepped one item at a
time: the call's coroutine writes each item on the event loop before the next step. A
request stream reaches the servicer through a `RequestFeed` of items the coroutine has
already read. Every step runs under the call's context variables (CALLER, REQUEST_ID).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

_T = TypeVar("_T")


class End:
    """The end of a request stream, or of a servicer's responses."""

    def __repr__(self) -> str:
        return "END"


END = End()


class CallWork:
    """One call's work on the pool: one step at a time, under the context variables the
    call had when this was made."""

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        self._context = contextvars.copy_context()
        self._running: Future[Any] | None = None

    async def run(self, function: Callable[..., _T], *args: Any) -> _T:
        self._running = self._pool.submit(self._context.run, function, *args)
        return await asyncio.wrap_future(self._running)

    async def step(self, responses: Iterator[_T]) -> _T | End:
        """The servicer's next response, or END."""
        return await self.run(next, responses, END)

    def when_idle(self, callback: Callable[[], object]) -> None:
        """Calls `callback` now or, when a cancelled call's step still runs on a worker,
        once that step is done: the call holds its slots for as long as it holds a worker."""
        running = self._running
        if running is None or running.done():
            callback()
        else:
            running.add_done_callback(lambda _: callback())

    def close(self, responses: Iterator[Any]) -> None:
        """Closes a response generator the call left unfinished (it was cancelled or
        aborted between items), so that its `finally` blocks run."""
        close = getattr(responses, "close", None)
        if close is None:
            return

        def close_on_pool() -> None:
            with contextlib.suppress(RuntimeError):  # the pool is shut down: stopping
                self._pool.submit(self._context.run, close)

        self.when_idle(close_on_pool)


# Requests of a stream read ahead of the servicer, at most (besides a budget in bytes).
READ_AHEAD_ITEMS = 64


class RequestFeed:
    """The request iterator of a client-streaming servicer: items the call's coroutine reads
    ahead on the event loop (Call.stream), up to `most_items` or `most_bytes`, while the
    servicer works. The servicer takes one item (iteration) or every item already read
    (`batches`). Call.stream steps the servicer only once an item waits (or the stream
    ended), so no worker waits for the client; should one find nothing anyway, it waits at
    most `first_s` for the first and `idle_s` for each next item, then raises the error
    `timed_out` makes. Thread-safe: the loop puts, a worker takes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, waits: tuple[float, float],
                 timed_out: Callable[[bool], BaseException], most_items: int = READ_AHEAD_ITEMS,
                 most_bytes: int = 4 << 20) -> None:
        self._loop = loop
        self._first_s, self._idle_s = waits
        self._timed_out = timed_out
        self._most_items, self._most_bytes = most_items, most_bytes
        self._items: deque[tuple[Any, int]] = deque()  # with each one's size in bytes
        self._bytes = 0
        self._changed = threading.Condition()
        self._room = asyncio.Event()
        self._arrived = asyncio.Event()
        self._failure: BaseException | None = None
        self.received = 0  # read from the client so far
        self.taken = 0  # taken by the servicer so far
        self.ended = False
        self._woken = False

    # -- on the event loop -----------------------------------------------------------

    async def wait_for_room(self) -> None:
        """Until fewer items than the budget wait to be taken (one always fits)."""
        while True:
            self._room.clear()
            with self._changed:
                if not self._items or (len(self._items) < self._most_items
                                       and self._bytes < self._most_bytes):
                    return
            await self._room.wait()

    async def arrival(self) -> None:
        """Until an item waits to be taken, the stream ended, or `wake` was called."""
        while True:
            self._arrived.clear()
            with self._changed:
                if self._items or self.ended or self._woken:
                    return
            await self._arrived.wait()

    def wake(self) -> None:
        """Ends every wait in `arrival`, now and after (the server is shutting down)."""
        self._woken = True
        self._arrived.set()

    def put(self, item: Any) -> None:
        """A request read from the client, or END."""
        with self._changed:
            if item is END:
                self.ended = True
            else:
                self.received += 1
                size = _size(item)
                self._items.append((item, size))
                self._bytes += size
            self._changed.notify_all()
        self._arrived.set()

    def fail(self, error: BaseException) -> None:
        """Reading the stream failed: the servicer gets `error` once it took what came
        before."""
        with self._changed:
            self._failure, self.ended = error, True
            self._changed.notify_all()
        self._arrived.set()

    def close(self) -> None:
        """The call is over: a servicer still waiting gets the end of the stream."""
        self.put(END)

    # -- on a worker -----------------------------------------------------------------

    def __iter__(self) -> RequestFeed:
        return self

    def __next__(self) -> Any:
        taken = self.take(1)
        if not taken:
            raise StopIteration
        return taken[0]

    def batches(self, largest: int) -> Iterator[list[Any]]:
        """Lists of 1 to `largest` requests, each of those already read when it is taken:
        it never waits for more than one."""
        while taken := self.take(largest):
            yield taken

    def take(self, largest: int) -> list[Any]:
        """Up to `largest` items already read (waiting for one); [] at the end."""
        first = self.taken == 0
        with self._changed:
            if not self._changed.wait_for(lambda: self._items or self.ended,
                                          self._first_s if first else self._idle_s):
                raise self._timed_out(first)
            if not self._items:
                if self._failure is not None:
                    raise self._failure
                return []
            taken = []
            for _ in range(min(largest, len(self._items))):
                item, size = self._items.popleft()
                taken.append(item)
                self._bytes -= size
            self.taken += len(taken)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped
            self._loop.call_soon_threadsafe(self._room.set)
        return taken


def _size(item: Any) -> int:
    size = getattr(item, "ByteSize", None)
    return int(size()) if size is not None else 0
