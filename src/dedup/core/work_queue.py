"""Taking work off a queue in batches; None on the queue tells every worker to stop."""

from __future__ import annotations

import queue
import time
from typing import TypeVar

T = TypeVar("T")


def take_batch(source: queue.Queue[T | None], max_items: int, max_wait_s: float = 0.0
               ) -> list[T] | None:
    """Blocks for one item, then takes what else is waiting (up to `max_items`, waiting at
    most `max_wait_s` for more). None when the stop signal came first."""
    first = source.get()
    if first is None:
        return None
    batch = [first]
    deadline = time.monotonic() + max_wait_s
    while len(batch) < max_items:
        remaining = deadline - time.monotonic()
        try:
            item = source.get(timeout=remaining) if remaining > 0 else source.get_nowait()
        except queue.Empty:
            break
        if item is None:
            source.put(None)  # leave the stop signal for the other workers
            break
        batch.append(item)
    return batch
