"""Background upkeep of a serving gallery: due checkpoints, due compactions of the store,
and the automatic switch to the index type the gallery's size calls for."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dedup.core.settings import StoreConfig
from dedup.gallery.embedded.checkpointer import Checkpointer
from dedup.gallery.embedded.index import PartitionedIndex
from dedup.gallery.embedded.index_plan import IndexPlan
from dedup.gallery.embedded.live_index import LiveIndex
from dedup.gallery.embedded.rebuilder import Rebuilder
from dedup.gallery.embedded.store import Store

log = logging.getLogger("dedup.gallery")

# After a failed automatic switch of index type, wait this long before trying again.
SWITCH_RETRY_S = 600.0
MIN_POLL_S = 0.05  # a zero erasure delay must not make the thread spin
SWITCH_EVERY_S = 5.0  # how often the wanted index type is looked at, at most
COMPACTION_RETRY_S = 60.0  # after a failed compaction (a full disk, say)
# An erasure's receipt allows a compaction twice the last one's time, at least this; until
# this server has compacted, its data.mdb at COMPACTION_BYTES_PER_S (under half the rate
# measured: 1.90 GB at 10,000,000 registrations in 25-44 s, checks going on).
MIN_COMPACTION_ALLOWANCE_S = 1.0
COMPACTION_BYTES_PER_S = 20e6


class CompactionSchedule:
    """Rewrites of the store without erased registrations' bytes, one at a time. One starts
    `delay_s` after the first erasure since the last; an erasure's receipt promises when it
    will have ended (`due`)."""

    def __init__(self, store: Store, delay_s: float) -> None:
        self.store = store
        self.delay_s = delay_s
        self._running = threading.Lock()
        self.last_seconds: float | None = None  # the last compaction's, on this server
        self._failed_at = -COMPACTION_RETRY_S

    def start(self) -> float | None:
        """Unix time at which the next compaction starts (None: nobody erased)."""
        since = self.store.erased_since()
        return None if since is None else since + self.delay_s

    def due(self) -> float | None:
        """Unix time by which erased registrations' bytes will be compacted away. One erased
        once the compaction may have begun is only deleted from its copy: the next one, from
        compact_delay_s after this one's end, rewrites it."""
        start = self.start()
        if start is None:
            return None
        now = time.time()
        allowance = self.allowance()
        return start + allowance if now < start else now + 2 * allowance + self.delay_s

    def allowance(self) -> float:
        """Twice the last compaction's time; until there was one, the store's files at
        COMPACTION_BYTES_PER_S; at least MIN_COMPACTION_ALLOWANCE_S."""
        took = (self.store.file_bytes() / COMPACTION_BYTES_PER_S if self.last_seconds is None
                else self.last_seconds)
        return max(MIN_COMPACTION_ALLOWANCE_S, 2 * took)

    def seconds_to_start(self) -> float:
        start = self.start()
        retry = COMPACTION_RETRY_S - (time.monotonic() - self._failed_at)
        return math.inf if start is None else max(0.0, start - time.time(), retry)

    def compact(self) -> tuple[int, int]:
        """Rewrites the store compacted (reads go on); see compaction.compact."""
        with self._running:
            return self._compact()

    def compact_if_due(self) -> None:
        if time.monotonic() - self._failed_at < COMPACTION_RETRY_S:
            return
        with self._running:  # an operator's compaction meanwhile may have done it
            start = self.start()
            if start is not None and time.time() >= start:
                try:
                    self._compact()
                except Exception:
                    self._failed_at = time.monotonic()  # each try copies the whole store
                    raise

    def _compact(self) -> tuple[int, int]:
        started = time.monotonic()
        compacted = self.store.compact()
        self.last_seconds = time.monotonic() - started
        return compacted


class IndexSwitch:
    """Rebuilds the index as the wanted type once the gallery can train it."""

    def __init__(self, live: LiveIndex, plan: IndexPlan, rebuilder: Rebuilder) -> None:
        self.live = live
        self.plan = plan
        self.rebuilder = rebuilder
        self._failed_at = -SWITCH_RETRY_S
        self._pinned: str | None = None  # the type an operator's rebuild asked for by name

    @contextmanager
    def pinned(self, kind: str | None) -> Iterator[None]:
        """Around an operator's rebuild: pins `kind` (None: back to the configured type)
        from before it starts, or keeps the earlier pin when it fails."""
        earlier, self._pinned = self._pinned, kind
        try:
            yield
        except BaseException:
            self._pinned = earlier
            raise

    def switch_if_wanted(self) -> None:
        if self._pinned is not None:
            return
        index = self.live.index
        wanted = self.plan.wanted_kind(serving=index.kind)
        outgrown = isinstance(index, PartitionedIndex) and index.outgrown(len(index))
        if (wanted == index.kind and not outgrown) or self.rebuilder.running:
            return
        if not self.plan.can_train(wanted):
            return
        if time.monotonic() - self._failed_at < SWITCH_RETRY_S:
            return
        if wanted == index.kind:
            log.info("the gallery has doubled since its %s index was trained and calibrated: "
                     "rebuilding", wanted)
        else:
            log.info("gallery size calls for a %s index (now %s): rebuilding", wanted,
                     index.kind)
        try:
            self.rebuilder.rebuild(wanted, lambda *_: None)
        except Exception:
            self._failed_at = time.monotonic()  # the old index serves; retry later
            raise


class Maintenance:
    """Three threads until `closed` is set: one writes the index checkpoints, one compacts
    the store, one switches the index type. A compaction or a rebuild takes minutes at
    10,000,000 registrations, and an erasure's checkpoint or compaction must not wait for
    either: each is promised by its receipt."""

    def __init__(self, config: StoreConfig, closed: threading.Event, checkpointer: Checkpointer,
                 compaction: CompactionSchedule, switch: IndexSwitch) -> None:
        self.config = config
        self.closed = closed
        self.checkpointer = checkpointer
        self.compaction = compaction
        self.switch = switch
        self._threads = [
            threading.Thread(target=self._checkpoints, name="dedup-checkpoints", daemon=True),
            threading.Thread(target=self._compactions, name="dedup-compaction", daemon=True),
            threading.Thread(target=self._index_type, name="dedup-index-switch",
                             daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def _checkpoints(self) -> None:
        # An erasure is seen by a poll before its checkpoint starts, which is then waited
        # for exactly: the erasure's receipt promises when that checkpoint is written.
        poll = max(MIN_POLL_S, min(1.0, self.config.checkpoint_interval_s,
                                   self.config.erasure_checkpoint_delay_s))
        run_every(self.closed, poll, self.checkpointer.seconds_to_erasure_checkpoint,
                  self.checkpointer.checkpoint_if_due, "index checkpoint")

    def _compactions(self) -> None:
        # A failed compaction is tried again COMPACTION_RETRY_S later (compact_if_due).
        poll = max(MIN_POLL_S, min(1.0, self.config.checkpoint_interval_s))
        run_every(self.closed, poll, self.compaction.seconds_to_start,
                  self.compaction.compact_if_due, "compaction")

    def _index_type(self) -> None:
        switch_every = max(MIN_POLL_S, min(SWITCH_EVERY_S, self.config.checkpoint_interval_s))
        run_every(self.closed, switch_every, lambda: switch_every,
                  self.switch.switch_if_wanted, "index type switch")


def run_every(closed: threading.Event, poll: float, seconds_to_next: Callable[[], float],
              work: Callable[[], None], what: str) -> None:
    """Runs `work` every `poll` seconds and when `seconds_to_next` says, until `closed`;
    after a failure, again a poll later at most (an erasure's checkpoint due sooner keeps its
    start), never at once."""
    wait = poll
    while not closed.wait(wait):
        try:
            work()
            wait = max(0.0, min(poll, seconds_to_next()))
        except Exception:  # the store is the truth; a failure here only costs time
            log.exception("background %s failed", what)
            wait = max(MIN_POLL_S, min(poll, _or_poll(seconds_to_next, poll)))


def _or_poll(seconds_to_next: Callable[[], float], poll: float) -> float:
    """`seconds_to_next()`, or `poll` should it fail too (a compaction's reads the store:
    after a read error the thread must go on, not end)."""
    try:
        return seconds_to_next()
    except Exception:
        return poll
