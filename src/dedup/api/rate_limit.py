"""Per-caller call rates: a token bucket for each caller identity."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


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
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.get(identity, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            admitted = tokens >= 1.0
            self._buckets[identity] = (tokens - 1.0 if admitted else tokens, now)
        return admitted
