"""Waiting longer after each failure in a row: `first` seconds after the first, twice as long
after each next one, at most `most`; a success ends the waiting. Thread-safe."""

from __future__ import annotations

import threading
import time


class Backoff:
    def __init__(self, first: float, most: float) -> None:
        self.first, self.most = first, most
        self._lock = threading.Lock()
        self._failures = 0
        self._until = 0.0  # time.monotonic()

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            wait = self.first * float(2 ** min(self._failures - 1, 32))
            self._until = time.monotonic() + min(self.most, wait)

    def succeeded(self) -> None:
        with self._lock:
            self._failures, self._until = 0, 0.0

    def seconds_left(self) -> float:
        """Until the next try (0: now)."""
        return max(0.0, self._until - time.monotonic())
