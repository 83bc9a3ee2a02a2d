"""The latencies of a server's latest checks, for work that yields to them (a live rebuild:
gallery/embedded/rebuild_pace.py)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

KEPT = 1 << 15  # the latest checks kept: minutes of them at the rates a node answers


class RecentLatencies:
    """Seconds each of the latest calls took, with when it ended; thread-safe."""

    def __init__(self, kept: int = KEPT, clock: Callable[[], float] = time.monotonic) -> None:
        self._calls: deque[tuple[float, float]] = deque(maxlen=kept)
        self._lock = threading.Lock()
        self.clock = clock

    def add(self, seconds: float) -> None:
        """One call that ended now after `seconds`."""
        ended = self.clock()
        with self._lock:
            self._calls.append((ended, seconds))

    def since(self, since: float) -> list[tuple[float, float]]:
        """(when it ended, seconds) of each call that ended at `since` or later (on this
        recorder's clock), oldest first."""
        with self._lock:
            calls = list(self._calls)
        return [call for call in calls if call[0] >= since]

    def quantile(self, share: float, since: float) -> tuple[float, int]:
        """The `share` quantile of the calls that ended at `since` or later, and how many
        those are (0: the quantile is 0.0)."""
        latest = [seconds for _, seconds in self.since(since)]
        if not latest:
            return 0.0, 0
        return float(np.quantile(latest, share)), len(latest)

    def typical_quantile(self, share: float, since: float, window: float, fewest: int
                         ) -> float | None:
        """The median over the `window`-second stretches since `since` of each one's `share`
        quantile (stretches of fewer than `fewest` calls left out): a few slow stretches,
        such as a cold start's, do not move it. None: no stretch had `fewest` calls."""
        stretches: dict[int, list[float]] = {}
        for ended, seconds in self.since(since):
            stretches.setdefault(int((ended - since) // window), []).append(seconds)
        quantiles = [float(np.quantile(calls, share)) for calls in stretches.values()
                     if len(calls) >= fewest]
        return float(np.median(quantiles)) if quantiles else None
