"""Rebuilding the index while serving, and swapping the new one in.

A live rebuild builds in a child process (see rebuild.py) while writes go on, keeps the
change log from the current checkpoint on, applies the changes made meanwhile (the bulk
beside the writes, the tail with writes held off) and swaps. The side file, a checkpoint as
of the build, then becomes the checkpoint by a rename; the new index is written again instead
when someone was erased since the build (the side file still holds them) or a checkpoint was
written meanwhile (the side file would replace a later one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dedup.core.errors import FailedPrecondition, StoreError
from dedup.core.priority import below_this_thread
from dedup.core.settings import StoreConfig
from dedup.gallery.base import IndexStatus, Progress
from dedup.gallery.embedded.checkpoint import temporary_of
from dedup.gallery.embedded.checkpointer import Checkpointer
from dedup.gallery.embedded.index import (
    AUTO,
    VectorIndex,
    load_index,
    new_index,
    nlist_of,
    training_size,
    validate_kind,
)
from dedup.gallery.embedded.index_plan import IndexPlan
from dedup.gallery.embedded.layout import REBUILD_FILE
from dedup.gallery.embedded.live_index import LiveIndex
from dedup.gallery.embedded.rebuild import Built, build_in_child, build_in_process
from dedup.gallery.embedded.replay import apply_logged_changes

log = logging.getLogger("dedup.gallery")



class Rebuilder:
    def __init__(self, live: LiveIndex, plan: IndexPlan, checkpointer: Checkpointer,
                 config: StoreConfig, status: Callable[[], IndexStatus],
                 cancelled: Callable[[], bool]) -> None:
        """`status`: the gallery's index status, reported when a rebuild is done;
        `cancelled`: true once the gallery is closing."""
        self.live = live
        self.plan = plan
        self.checkpointer = checkpointer
        self.config = config
        self.side_file = Path(config.data_dir) / REBUILD_FILE
        self._status = status
        self._cancelled = cancelled
        self._running = threading.Lock()

    @property
    def running(self) -> bool:
        return self._running.locked()

    def rebuild(self, kind: str | None, progress: Progress) -> IndexStatus:
        """Builds `kind` (None: the configured type) in a child process and swaps it in."""
        self._refuse_when_closing()
        target = (validate_kind(kind, dimension=self.config.dimension) if kind
                  else self.plan.configured_kind)
        if target == AUTO:
            target = self.plan.wanted_kind(serving=self.live.index.kind)
        needed = training_size(target, self.config.dimension)
        have = self.plan.comparable_count()
        if needed > have:
            raise FailedPrecondition(f"index_factory: {target} needs at least {needed:,} "
                                     f"registrations to train, the store holds {have:,}")
        if not self._running.acquire(blocking=False):
            raise FailedPrecondition("a rebuild is already running")
        try:
            self._refuse_when_closing()  # again: close may have waited for rebuilds meanwhile
            self._rebuild_live(target, progress)
            return self._status()
        finally:
            self.checkpointer.unpin_log()
            self._running.release()

    def _refuse_when_closing(self) -> None:
        if self._cancelled():
            raise FailedPrecondition("the gallery is closing: no rebuild")

    def wait(self) -> None:
        """Until no rebuild runs: a closing gallery's store must outlive it (a rebuild sees
        the gallery closing and stops at its next step)."""
        with self._running:
            pass

    def _rebuild_live(self, kind: str, progress: Progress) -> None:
        try:
            self._build_and_swap(kind, progress)
        finally:
            # Swapped in or not, the side file holds every embedding as of the build's
            # snapshot, registrations erased since among them: it must not outlive the rebuild.
            for path in (self.side_file, temporary_of(self.side_file)):
                path.unlink(missing_ok=True)

    def _build_and_swap(self, kind: str, progress: Progress) -> None:
        started = time.monotonic()
        self.checkpointer.pin_log(self._about_the_size_of(kind))
        store, model_id = self.live.store, self.live.model_id
        progress("starting", 0, self.plan.comparable_count())
        built_at = build_in_child(self.config, kind, model_id, self.plan.only_model(),
                                  self.side_file, progress, cancelled=self._cancelled,
                                  pair_score=self.plan.pair_score,
                                  niceness=self.plan.rebuild_niceness)
        self.checkpointer.swap_bytes = self.side_file.stat().st_size  # no longer a guess
        niced = self.plan.rebuild_niceness
        built = below_this_thread(niced, lambda: load_index(
            self.side_file, self.config.dimension, model_id)[0])
        progress("catching_up", 0, store.sequence() - built_at)
        covered, erased = self._catch_up(built, built_at)  # the bulk, while writes go on
        # The checkpointer's lock first (as its checkpoints take them): its kept buffer
        # holds the new index's snapshot if one is taken, sized for it beforehand.
        with self.checkpointer.lock:
            self.checkpointer.fit_buffer(self.side_file.stat().st_size)
            with self.live.writes:  # the tail, with writes held off, then the swap
                covered, erased_in_tail = self._catch_up(built, covered)
                if len(built) != self.plan.comparable_count():
                    raise StoreError(f"rebuilt index holds {len(built)} vectors, the store "
                                     f"{self.plan.comparable_count()}: kept the old index")
                self.live.swap(built)
                # The side file is a checkpoint as of the build, the log holds the rest; it
                # may not stay if it holds someone erased since, nor replace a later one.
                adopt = not (erased or erased_in_tail) and self.checkpointer.sequence <= built_at
                snapshot = (None if adopt else
                            built.snapshot(covered, model_id, self.checkpointer.buffer))
            if snapshot is None:
                self.checkpointer.adopt(self.side_file, built_at)
            else:
                self.checkpointer.write(snapshot, covered, niceness=niced)
        log.info("rebuilt the index as %s: %d vectors in %.1f s%s", kind, len(built),
                 time.monotonic() - started,
                 "" if snapshot is None else "; written again as the checkpoint")

    def _about_the_size_of(self, kind: str) -> int:
        """The bytes of a `kind` index of the store's registrations (the erasure receipts
        allow for the swap writing it): an empty one's (PQ codebooks among them), its lists'
        float centroids, and its codes."""
        empty, dimension = new_index(kind, self.config.dimension), self.config.dimension
        return (empty.snapshot(0, self.live.model_id).nbytes + nlist_of(kind) * dimension * 4
                + int(empty.bytes_per_vector * self.plan.comparable_count()))

    def _catch_up(self, index: VectorIndex, covered: int) -> tuple[int, bool]:
        """Applies the logged changes after `covered`; returns the sequence now covered and
        whether any of them removed someone."""
        delta = apply_logged_changes(self.live.store, index, covered, self.live.model_id)
        if not delta.complete:
            raise StoreError("the change log no longer reaches back to the rebuild's snapshot")
        return delta.current, bool(delta.removed)

    def build_offline(self, kind: str, progress: Progress) -> Built:
        """For `dedup rebuild` on a data directory no server holds: build and swap here."""
        built = build_in_process(self.live.store, kind, self.live.model_id,
                                 self.plan.only_model(), progress, self.plan.pair_score)
        with self.live.writes:
            self.live.swap(built.index)
            self.live.deferred = False
        self.checkpointer.save(built.index, built.sequence)
        return built
