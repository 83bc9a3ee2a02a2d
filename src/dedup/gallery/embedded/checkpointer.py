"""Checkpoints of the live index: when one is due, the change it covers, and truncating the
change log behind it.

A checkpoint is due after checkpoint_every_changes changes, after checkpoint_interval_s with
any change pending, and erasure_checkpoint_delay_s after an erasure (so that erased
registrations leave the file on disk too). An erasure's receipt promises when that checkpoint
will have been written: its start, plus what is left of a write under way, plus an
allowance for writing (`writing_allowance`), a live rebuild's new index included.

A checkpoint that fails (a full disk, an index out of step with the store) is tried again
after erasure_checkpoint_delay_s (at least MIN_RETRY_S), then after twice as long each time
it fails again, up to RETRY_AT_MOST_S: each try may write most of the index before it fails.
Any checkpoint written ends the waiting. A new erasure's checkpoint is tried at the start its
receipt promised whatever failed before it; a promise made while a retry waits allows for it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path

from dedup.core.backoff import Backoff
from dedup.core.errors import CheckpointError, ResourceExhausted, StoreDamaged
from dedup.core.priority import below_this_thread
from dedup.core.settings import StoreConfig
from dedup.gallery.embedded.checkpoint import Checkpoint, fsync_directory, write_checkpoint
from dedup.gallery.embedded.index import SnapshotBuffer, VectorIndex
from dedup.gallery.embedded.live_index import IndexOutOfStep, LiveIndex

log = logging.getLogger("dedup.gallery")

# The least time allowed for writing an erasure's checkpoint: an fsync alone can take
# hundreds of milliseconds on a busy disk (benchmarks/checkpoint_write.py).
MIN_WRITING_ALLOWANCE_S = 0.5
# Until this server has written a checkpoint, its time is taken as the one on disk written at
# this rate: half the measured (410 MB held and written in 1.15 s at 10,000,000, README).
ASSUMED_BYTES_PER_S = 180e6
RETRY_AT_MOST_S = 60.0
MIN_RETRY_S = 1.0  # a zero erasure delay (tests) must not retry a full disk every poll


class Checkpointer:
    def __init__(self, live: LiveIndex, path: Path, config: StoreConfig) -> None:
        self.live = live
        self.path = path
        self.config = config
        self.sequence = 0  # the change the checkpoint on disk covers
        self.written_at = time.monotonic()
        # While a live rebuild runs, the change log is kept from this sequence on.
        self.log_pin: int | None = None
        # When the checkpoint without erased registrations starts (time.time()), and by when
        # it will have been written (the erasure receipts' promise).
        self.erasure_start: float | None = None
        self.erasure_due: float | None = None
        self.erased_through = 0  # the store's change at the latest erasure
        self.last_seconds = 0.0  # the last checkpoint's, writes held and written
        self.last_bytes = 0  # and its size: the disk's rate as this server measured it
        # A write under way: when it started (time.monotonic) and its size. An erasure's
        # checkpoint waits for it, and a rebuild's swap writes another type and size.
        self.writing: tuple[float, int] | None = None
        # While a live rebuild runs, about the size of the new index its swap may write.
        self.swap_bytes = 0
        # One checkpoint writer at a time: they share the temporary file's name, and the
        # buffer each snapshot is taken into (written out before the next is taken).
        self.lock = threading.RLock()
        self.buffer = SnapshotBuffer()
        # After checkpoints failed in a row, no periodic one is tried until it says.
        self._retry = Backoff(max(MIN_RETRY_S, config.erasure_checkpoint_delay_s),
                              RETRY_AT_MOST_S)

    def checkpoint(self, covering: int | None = None) -> int:
        """Writes the index with the sequence it covers; returns that sequence. With
        `covering`, nothing is written if the last checkpoint already covers that change.
        CheckpointError when it cannot be written, also while the index cannot take changes
        the store made (IndexOutOfStep: LiveIndex.add_unadded, remove_unremoved)."""
        with self.lock:  # the outcome recorded before another checkpoint is written
            try:
                sequence = self._checkpoint(covering)
            except BaseException:
                # The periodic checkpoint waits for the retry. An erasure's is tried at its
                # start still (its receipt promised that); when it fails, its next start is
                # the retry (_erasure_checkpoint_again).
                self._retry.failed()
                raise
            self._retry.succeeded()
            return sequence

    def _checkpoint(self, covering: int | None) -> int:
        with self.lock:
            with self.live.writes:  # the index and the sequence must agree
                started = time.monotonic()  # holding writes from here, not waiting for them
                sequence = self.live.store.sequence()
                if self.live.deferred:
                    log.info("no checkpoint at change %d: an import left its rows to be "
                             "indexed when it ends (else by the next start, from the change "
                             "log)", sequence)
                    return self.sequence
                if covering is not None and self.sequence >= covering:
                    return self.sequence
                if sequence == self.sequence and self.path.exists():
                    return sequence
                self.live.add_unadded()
                self.live.remove_unremoved()
                snapshot = self.live.index.snapshot(sequence, self.live.model_id, self.buffer)
            held = time.monotonic() - started
            self.write(snapshot, sequence)
            self.last_seconds = time.monotonic() - started
            log.info("checkpoint at change %d: %d vectors, %.0f MB; writes held %.2f s, "
                     "written in %.2f s", sequence, snapshot.vectors,
                     snapshot.nbytes / 1e6, held, time.monotonic() - started - held)
            return sequence

    def checkpoint_if_due(self) -> None:
        start = self.erasure_start
        if start is not None and time.time() >= start:
            self.write_erasure_checkpoint()
            return
        if self._retry.seconds_left():
            return
        pending = self.live.store.sequence() - self.sequence
        overdue = time.monotonic() - self.written_at >= self.config.checkpoint_interval_s
        if pending >= self.config.checkpoint_every_changes or (pending and overdue):
            self.checkpoint()

    def write_erasure_checkpoint(self) -> None:
        """Writes the checkpoint erasures wait for, if one is pending (now: at its start, or
        earlier, before a live rebuild may change what a write takes)."""
        with self.live.writes:  # an erasure from here on waits for the next checkpoint
            if self.erasure_start is None:
                return
            promised = (self.erasure_start, self.erasure_due)
            self.erasure_start = self.erasure_due = None
            erased_by = self.erased_through
        written = False
        try:
            # Not again when one already covers the erasures (a rebuild's swap wrote the new
            # index after them), whatever was enrolled since.
            written = self.checkpoint(covering=erased_by) >= erased_by
        finally:  # not written (a full disk, an import deferring it): again later
            if not written:
                self._erasure_checkpoint_again(promised)

    def erasure_checkpoint_by(self) -> float:
        """After an erasure (under the write lock): when the checkpoint will have been
        written without it. One checkpoint covers every erasure until it starts; an erasure
        that finds one pending gets the later of its promise and its own."""
        self.erased_through = self.live.store.sequence()
        start = self.erasure_start  # set and cleared with erasure_due
        if start is None:
            return self._schedule_erasure_checkpoint()
        due = max(self.erasure_due or 0.0, self._due_when_started_at(start))
        self.erasure_due = due
        return due

    def _schedule_erasure_checkpoint(self) -> float:
        """Under the write lock: the erasure checkpoint starts after the erasure delay (or
        when a failed checkpoint is tried again, if later); returns by when it will have
        been written."""
        self.erasure_start = time.time() + max(self.config.erasure_checkpoint_delay_s,
                                                self._retry.seconds_left())
        self.erasure_due = self._due_when_started_at(self.erasure_start)
        return self.erasure_due

    def _due_when_started_at(self, start: float) -> float:
        return start + self._rest_of_the_write_under_way(start) + self.writing_allowance()

    def writing_allowance(self) -> float:
        """Twice the time to write the largest of the last checkpoint, a write under way and
        a live rebuild's new index (`seconds_to_write`), at least MIN_WRITING_ALLOWANCE_S
        (the last checkpoint of 10,000,000 FastScanIVF4096 registrations gives ~1.2 s). A
        rebuild's swap covers every erasure made before its snapshot with its own write, so
        an erasure meanwhile waits for one write of the new index at most."""
        writing = self.writing
        largest = max(self.swap_bytes, 0 if writing is None else writing[1])
        return max(MIN_WRITING_ALLOWANCE_S, 2 * self.last_seconds,
                   2 * self.seconds_to_write(largest) if largest else 0.0)

    def _rest_of_the_write_under_way(self, start: float) -> float:
        """How long after `start` (time.time()) a write under way may still hold the lock the
        erasure checkpoint needs, allowing it twice its estimated time."""
        writing = self.writing
        if writing is None:
            return 0.0
        began, nbytes = writing
        ends = began + 2 * self.seconds_to_write(nbytes)  # time.monotonic()
        return max(0.0, ends - time.monotonic() - (start - time.time()))

    def seconds_to_erasure_checkpoint(self) -> float:
        """Until the erasure checkpoint starts (0: now, inf: none is due)."""
        start = self.erasure_start
        return math.inf if start is None else max(0.0, start - time.time())

    def _erasure_checkpoint_again(self, promised: tuple[float, float | None]) -> None:
        """After a failed erasure checkpoint: at its promised start if that is still ahead
        (an early try, before a live rebuild, failed), else after the erasure delay or the
        retry, whichever is later (its promise is broken then)."""
        with self.live.writes:
            start, due = promised
            if start > time.time():  # one scheduled since (an erasure meanwhile) starts later
                self.erasure_start = min(start, self.erasure_start or start)
                self.erasure_due = max(due or 0.0, self.erasure_due or 0.0)
            elif self.erasure_start is None:  # no erasure since
                self._schedule_erasure_checkpoint()
        log.warning("the checkpoint after an erasure was not written: trying again at %s",
                    time.strftime("%H:%M:%S", time.localtime(self.erasure_start)))

    def save(self, index: VectorIndex, sequence: int) -> None:
        """Writes `index` as covering `sequence` (a freshly built or recovered one)."""
        with self.lock:
            started = time.monotonic()
            self.write(index.snapshot(sequence, self.live.model_id, self.buffer), sequence)
            self.last_seconds = time.monotonic() - started

    def save_at_start(self, index: VectorIndex, sequence: int, on_disk: int,
                      holds_erased: bool) -> int:
        """Checkpoints the recovered index; returns the sequence the checkpoint on disk covers
        (`on_disk` if this one cannot be written, e.g. on a full disk). `holds_erased`: the
        checkpoint on disk may hold erased registrations, so a failed write is tried again
        as an erasure's checkpoint is, not left to the periodic one."""
        try:
            self.save(index, sequence)
        except (ResourceExhausted, CheckpointError) as error:
            # The server can run without it: the change log keeps covering the index.
            log.error("could not checkpoint the recovered index: %s", error)
            if holds_erased:
                with self.live.writes:
                    self.erased_through = sequence
                    self._schedule_erasure_checkpoint()
            return on_disk
        return sequence

    def recovered(self, sequence: int) -> None:
        """Start is over: the checkpoint on disk covers `sequence`; the interval counts
        from now."""
        self.sequence = sequence
        self.written_at = time.monotonic()
        if not self.last_seconds and self.path.exists():
            self.last_bytes = self.path.stat().st_size
            self.last_seconds = self.last_bytes / ASSUMED_BYTES_PER_S

    def fit_buffer(self, nbytes: int) -> None:
        """Sizes the snapshot buffer for a snapshot of about `nbytes` now, writes not held
        (a server at its start, a rebuild before its swap). Without the memory, the next
        checkpoint grows the buffer itself."""
        with self.lock:
            try:
                self.buffer.fit(nbytes)
            except MemoryError:
                log.warning("no memory for a %d MB checkpoint buffer now: the next "
                            "checkpoint takes it", nbytes // 10**6)

    def write(self, snapshot: Checkpoint, sequence: int, niceness: int = 0) -> None:
        """`niceness`: the checksum and the writing run that far below the checks (this
        thread waits for them, holding the lock)."""
        with self.lock:
            started = time.monotonic()
            self.writing = (started, snapshot.nbytes)
            try:
                below_this_thread(niceness, lambda: write_checkpoint(self.path, snapshot))
            finally:
                self.writing = None
            # The erasure receipts' allowance follows the index as it is now (a rebuild's
            # swap writes another type and size); checkpoint() counts the held writes too.
            self.last_seconds = time.monotonic() - started
            self.last_bytes = snapshot.nbytes
            self.fit_buffer(snapshot.nbytes)  # the views are written: the buffer may move
            self._covers(sequence)

    def adopt(self, written: Path, sequence: int) -> None:
        """Makes `written`, a checkpoint already on disk (fsynced) covering `sequence`, the
        checkpoint, by a rename: a live rebuild's side file, not written a second time. The
        change log is kept from `sequence` on, so a start replays what came after it."""
        with self.lock:
            try:
                size = written.stat().st_size
                os.replace(written, self.path)
                fsync_directory(self.path.parent)
            except OSError as error:  # the sequence stays the older one: the log keeps more
                raise CheckpointError(f"{self.path}: cannot take the rebuilt index's file "
                                      f"{written.name} as the checkpoint ({error})") from error
            # Not written by this server: the allowance for writing it, never lowered here
            # (a measured one goes only by a measurement).
            estimate = self.seconds_to_write(size)
            if estimate > self.last_seconds:
                self.last_seconds, self.last_bytes = estimate, size
            self._covers(sequence)

    def seconds_to_write(self, nbytes: int) -> float:
        """A checkpoint of `nbytes`, at the slower of the rate last measured here and
        ASSUMED_BYTES_PER_S."""
        measured = self.last_seconds * nbytes / self.last_bytes if self.last_bytes else 0.0
        return max(measured, nbytes / ASSUMED_BYTES_PER_S)

    def _covers(self, sequence: int) -> None:
        """The checkpoint on disk now covers `sequence`: the log before it goes (unless a
        live rebuild still needs it)."""
        self._retry.succeeded()
        self.sequence = sequence
        self.written_at = time.monotonic()
        pin = self.log_pin
        try:
            self.live.store.truncate_changes(sequence if pin is None else min(pin, sequence))
        except StoreDamaged:
            raise  # DATA_LOSS to a caller, not a log line
        except Exception:  # the checkpoint is written; a longer log is always safe
            log.exception("could not truncate the change log behind the checkpoint at change "
                          "%d: the next checkpoint tries again", sequence)

    def pin_log(self, swap_bytes: int) -> None:
        """A live rebuild starts: keeps the change log from the current checkpoint on, until
        `unpin_log`; its swap may write a new index of about `swap_bytes`, which erasures
        from now on allow for. A checkpoint pending for earlier erasures, whose promise
        allowed for the index served now, is written first (a full disk then fails the
        rebuild, as it would fail writing the rebuild's side file; an index out of step with the
        store does not: the swap's index, built from the store, is in step)."""
        with self.live.writes:
            self.log_pin = self.sequence
            self.swap_bytes = swap_bytes
        try:
            self.write_erasure_checkpoint()
        except IndexOutOfStep:
            log.warning("the checkpoint after an erasure waits for the rebuild: the index "
                        "is out of step with the store")

    def unpin_log(self) -> None:
        self.log_pin = None
        self.swap_bytes = 0
