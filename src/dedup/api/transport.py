"""The gRPC transport: a grpc.aio server on an asyncio event loop in a thread of its own, and
the worker pool where the synchronous servicers run (see api/bridge.py).

The loop admits every call and waits for every client; workers only ever do a call's work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

_T = TypeVar("_T")
_LOOP_DRAIN_S = 5.0


async def _new_server(options: list[tuple[str, Any]]) -> grpc.aio.Server:
    # On the loop: a grpc.aio server belongs to the loop it is made on.
    return grpc.aio.server(options=options)


class Transport:
    """Also what `DedupServer.grpc_server` is: `stop(grace)` returns an event, as a
    grpc.Server's does."""

    def __init__(self, options: list[tuple[str, Any]], workers: int,
                 worker_init: Callable[[], object] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dedup-grpc-loop",
                                        daemon=True)
        self._thread.start()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dedup-rpc",
                                       initializer=worker_init)
        self._stop_lock = threading.Lock()
        self.stopped = threading.Event()
        try:
            self.server = self.run(_new_server(options))
        except BaseException:
            self._close()
            raise

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Runs `coroutine` on the loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def on_loop(self, function: Callable[..., _T], *args: Any) -> _T:
        """Calls `function` on the loop's thread (where the server's set-up belongs)."""
        async def call() -> _T:
            return function(*args)

        return self.run(call())

    def start(self) -> None:
        self.run(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stops taking calls; calls in flight get `grace` seconds, then are cancelled.
        Returns once stopped, with an event that is set."""
        with self._stop_lock:
            if not self.stopped.is_set():
                try:
                    self.run(self.server.stop(grace))
                finally:
                    self._close()
        return self.stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """True when `timeout` passed before the server stopped."""
        return not self.stopped.wait(timeout)

    def _close(self) -> None:
        """Drops queued work, ends what is left on the loop, and the loop's thread."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.run(_cancel_the_rest())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
            self.stopped.set()


async def _cancel_the_rest() -> None:
    rest = asyncio.all_tasks() - {asyncio.current_task()}
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=_LOOP_DRAIN_S)
