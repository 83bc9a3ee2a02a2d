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
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
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


class RequestFeed:
    """The request iterator of a client-streaming servicer: items the call's coroutine read
    ahead on the event loop. Should the servicer take an item the coroutine has not read
    yet, its worker asks the loop for it and waits (bounded by the stream's idle timeout);
    dedup's servicers take one item per response, so that never happens."""

    def __init__(self, fetch: Callable[[], Coroutine[Any, Any, Any]],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._fetch = fetch
        self._loop = loop
        self._items: deque[Any] = deque()
        self.received = 0
        self.ended = False

    @property
    def hungry(self) -> bool:
        """The servicer took every item read so far, and the client may send more."""
        return not self._items and not self.ended

    def put(self, item: Any) -> None:
        """A request read from the client, or END."""
        if item is END:
            self.ended = True
            return
        self.received += 1
        self._items.append(item)

    def __iter__(self) -> RequestFeed:
        return self

    def __next__(self) -> Any:
        if not self._items and not self.ended:
            self.put(asyncio.run_coroutine_threadsafe(self._fetch(), self._loop).result())
        if self._items:
            return self._items.popleft()
        raise StopIteration
