"""A live rebuild's process paused for moments while the checks beside it run slow.

Niceness gives a rebuild a fixed share of a busy CPU, whatever that does to the checks. The
pacer holds the checks to a budget instead: while the slowest tenth of the last second's
checks take more than `budget` times what they took in the minute before the rebuild began
(the median of its seconds' 90th percentiles),
the rebuild's process is stopped (SIGSTOP), and it is continued (SIGCONT) as soon as they are
back within it. So a rebuild on an idle or lightly loaded node runs at full speed, and on a
saturated one takes what the checks can spare.

It is never stopped for more than half the time since the rebuild began, so a rebuild ends
even where checks are slow for reasons of their own, and it is continued before the server
waits for it or kills it. With too few checks before the rebuild (fewer than
FEWEST_BEFORE in the minute) there is nothing to hold to and it never pauses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from dedup.core.latency import RecentLatencies

log = logging.getLogger("dedup.gallery")

TICK_S = 0.25  # how often the pacer looks
QUANTILE = 0.9  # the checks' quantile held to the budget: a second holds tens to hundreds
WINDOW_S = 1.0  # the latest checks judged
BEFORE_S = 60.0  # the checks before the rebuild whose quantile the budget multiplies
FEWEST_BEFORE = 200
FEWEST_NOW = 20  # fewer in the window: too few to judge, the rebuild runs
MOST_PAUSED = 0.5  # of the time since the rebuild began


class RebuildPacer:
    """Stops and continues one rebuild's process by its checks' latency (module doc)."""

    def __init__(self, checks: RecentLatencies, budget: float) -> None:
        """`budget`: the checks' latency allowed during the rebuild, times that before it
        (0: no pacing)."""
        self._checks = checks
        self._budget = budget
        self._limit: float | None = None
        self._started = 0.0
        self._paused_at: float | None = None
        self.paused_s = 0.0
        self.pauses = 0

    def start(self) -> None:
        """Takes the checks of the minute before as the measure (as the rebuild begins):
        the median of its seconds' p90s, so that a cold start's slow seconds in it do not
        raise the limit."""
        now = self._checks.clock()
        self._started = now
        since = now - BEFORE_S
        if self._budget <= 0 or self._checks.quantile(QUANTILE, since)[1] < FEWEST_BEFORE:
            return
        before = self._checks.typical_quantile(QUANTILE, since, WINDOW_S, FEWEST_NOW)
        if before is not None:
            self._limit = self._budget * before

    @property
    def limit_s(self) -> float | None:
        """The latency the checks' quantile is held to; None: not pacing."""
        return self._limit

    def pace(self, pid: int) -> None:
        """Stops or continues process `pid` by the latest checks (every TICK_S)."""
        if self._limit is None:
            return
        now = self._checks.clock()
        recent, count = self._checks.quantile(QUANTILE, since=now - WINDOW_S)
        slow = count >= FEWEST_NOW and recent > self._limit
        if slow and self._paused_at is None and self._may_pause(now):
            self._signal(pid, signal.SIGSTOP)
            self._paused_at = now
            self.pauses += 1
        elif self._paused_at is not None and not (slow and self._may_pause(now)):
            self.resume(pid)

    def resume(self, pid: int) -> None:
        """Continues `pid` if this pacer stopped it."""
        if self._paused_at is None:
            return
        self._signal(pid, signal.SIGCONT)
        self.paused_s += self._checks.clock() - self._paused_at
        self._paused_at = None

    def _may_pause(self, now: float) -> bool:
        paused = self.paused_s + (0.0 if self._paused_at is None else now - self._paused_at)
        return paused < MOST_PAUSED * (now - self._started)

    @staticmethod
    def _signal(pid: int, number: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # it ended and was reaped meanwhile
            os.kill(pid, number)

    def report(self) -> None:
        if self._limit is not None:
            log.info("rebuild paced: stopped %d times, %.1f s in all, holding checks' p%d "
                     "to %.1f ms", self.pauses, self.paused_s, round(QUANTILE * 100),
                     self._limit * 1000)
