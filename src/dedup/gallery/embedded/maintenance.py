"""Background upkeep of a serving gallery: due checkpoints, due compactions of the store,
and the automatic switch to the index type the gallery's size calls for."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
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


class CompactionSchedule:
    """Rewrites of the store without erased registrations' bytes, one at a time."""

    def __init__(self, store: Store, delay_s: float) -> None:
        self.store = store
        self.delay_s = delay_s
        self._running = threading.Lock()

    def due(self) -> float | None:
        """Unix time by which erased registrations' bytes will be compacted away."""
        since = self.store.erased_since()
        return None if since is None else since + self.delay_s

    def compact(self) -> tuple[int, int]:
        """Rewrites the store compacted (reads go on); see compaction.compact."""
        with self._running:
            return self.store.compact()

    def compact_if_due(self) -> None:
        due = self.due()
        if due is not None and time.time() >= due:
            self.compact()


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
    """The maintenance thread; it runs until `closed` is set."""

    def __init__(self, config: StoreConfig, closed: threading.Event, checkpointer: Checkpointer,
                 compaction: CompactionSchedule, switch: IndexSwitch) -> None:
        self.config = config
        self.closed = closed
        self.checkpointer = checkpointer
        self.compaction = compaction
        self.switch = switch
        self._thread = threading.Thread(target=self._run, name="dedup-maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        # An erasure is seen by a poll before its checkpoint starts, which then is waited
        # for exactly: the erasure's receipt promises when that checkpoint is written.
        poll = max(MIN_POLL_S, min(1.0, self.config.checkpoint_interval_s,
                                   self.config.erasure_checkpoint_delay_s))
        switch_every = max(1, round(min(5.0, self.config.checkpoint_interval_s) / poll))
        rounds = 0
        while not self.closed.wait(min(poll, self.checkpointer.seconds_to_erasure_checkpoint())):
            rounds += 1
            try:
                self.checkpointer.checkpoint_if_due()
                self.compaction.compact_if_due()
                if rounds % switch_every == 0:
                    self.switch.switch_if_wanted()
            except Exception:  # the store is the truth; a failure here only costs time
                log.exception("background index maintenance failed")
