"""Building an index from the store: in this process at start, or in a spawned one live.

A live rebuild runs in a separate process (spawn, never fork: LMDB environments and
FAISS's threads do not survive a fork) with one OpenMP thread, so the server keeps a core
for answering. The child reads one consistent snapshot of the store, trains and fills the
new index, writes it to a side file and reports the change sequence it covers; the server
then applies the changes that arrived meanwhile and swaps.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

import faiss
import numpy as np

from dedup.core.blas import limit_numpy_blas
from dedup.core.errors import FailedPrecondition, StoreError
from dedup.core.priority import niceness_above_this_thread
from dedup.core.settings import REBUILD_NICENESS, IndexConfig, StoreConfig
from dedup.gallery.base import Progress
from dedup.gallery.embedded.calibration import calibrate_on_snapshot
from dedup.gallery.embedded.checkpoint import write_checkpoint
from dedup.gallery.embedded.index import (
    TRAINED,
    PartitionedIndex,
    VectorIndex,
    new_index,
    training_size,
)
from dedup.gallery.embedded.store import Snapshot, Store

log = logging.getLogger("dedup.gallery")

ADD_BATCH = 20_000
# Training sample: enough points per centroid for k-means, not the whole gallery.
SAMPLE_PER_CENTROID = 64
DEFAULT_PAIR_SCORE = IndexConfig().calibration_min_score


@dataclass(frozen=True)
class Built:
    index: VectorIndex
    sequence: int


def build_from_snapshot(snapshot: Snapshot, kind: str, dimension: int, model_id: str,
                        only_model: str | None, progress: Progress,
                        pair_score: float = DEFAULT_PAIR_SCORE) -> Built:
    """`pair_score`: a SignIVF or FastScanIVF index is calibrated on same-person pairs
    scoring at least this (the server's review threshold: the lowest score a verdict turns
    on)."""
    total = snapshot.count(model_id)
    index = new_index(kind, dimension)
    if isinstance(index, TRAINED):
        needed = training_size(kind, dimension)
        if total < needed:
            raise FailedPrecondition(
                f"index_factory: {kind} needs at least {needed:,} registrations to train, the "
                f"store holds {total:,}")
        progress("training", 0, total)
        size = max(needed, SAMPLE_PER_CENTROID * needed // 39)
        index.train(snapshot.sample(size, model_id, only_model))
    done = 0
    progress("adding", done, total)
    add = index.fill if isinstance(index, PartitionedIndex) else index.add
    for keys, vectors in snapshot.vectors(ADD_BATCH, only_model):
        add(np.asarray(keys, np.int64), vectors)
        done += len(keys)
        progress("adding", done, total)
    if isinstance(index, PartitionedIndex):
        index.finish_fill()
        progress("calibrating", done, total)
        calibrate_on_snapshot(index, snapshot, model_id, only_model, pair_score)
    return Built(index, snapshot.sequence)


def build_in_process(store: Store, kind: str, model_id: str, only_model: str | None,
                     progress: Progress, pair_score: float = DEFAULT_PAIR_SCORE) -> Built:
    with store.snapshot() as snapshot:
        return build_from_snapshot(snapshot, kind, store.config.dimension, model_id,
                                   only_model, progress, pair_score)


def _lower_priority(child: BaseProcess, nice: int) -> None:
    """The child's main thread (where the whole build runs) at niceness `nice`, right
    after the spawn: its imports too, and the threads they make inherit it (the child sets
    any made before, _every_thread_at). Logged, never a failed rebuild, when refused."""
    if child.pid is None or nice == os.getpriority(os.PRIO_PROCESS, 0):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, child.pid, nice)
    except OSError as error:
        log.warning("the rebuild's process keeps the server's priority: %s", error)


def _every_thread_at(nice: int | None) -> None:
    """In the child: each of its threads at niceness `nice` (Linux keeps one a thread)."""
    if nice is None:
        return
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


_PR_SET_PDEATHSIG = 1


def _die_with_the_server(server: int) -> None:
    """In the child: killed (SIGKILL) when the server's thread that started it ends, the
    server killed too. Otherwise an orphan builds on for up to half an hour, holding its
    snapshot of the store (whose pages LMDB then cannot reuse) and a core beside the
    restarted server, which may start a rebuild of its own."""
    if sys.platform != "linux":
        return
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        log.warning("the rebuild's process may outlive its server: prctl failed (errno %d)",
                    ctypes.get_errno())
    if os.getppid() != server:  # the server ended before the line above
        os._exit(1)


def _child_main(config: StoreConfig, kind: str, model_id: str, only_model: str | None,
                out: str, messages: multiprocessing.Queue[tuple[str, int, int, str]],
                pair_score: float, nice: int | None = None, server: int | None = None) -> None:
    """Runs in the spawned process: build, write the side file, report."""
    if server is not None:
        _die_with_the_server(server)
    _every_thread_at(nice)
    faiss.omp_set_num_threads(1)
    limit_numpy_blas(1)  # one core: numpy's idle BLAS threads would spin on the server's
    try:
        store = Store(config, readonly=True)
        with store.snapshot() as snapshot:
            built = build_from_snapshot(
                snapshot, kind, config.dimension, model_id, only_model,
                lambda phase, done, total: messages.put((phase, done, total, "")),
                pair_score)
        messages.put(("writing", 0, 1, ""))
        write_checkpoint(Path(out), built.index.snapshot(built.sequence, model_id))
        messages.put(("built", built.sequence, len(built.index), ""))
    except FailedPrecondition as error:
        messages.put(("precondition", 0, 0, str(error)))
    except Exception as error:  # reported to the server, which keeps its index
        messages.put(("error", 0, 0, f"{type(error).__name__}: {error}"))


def build_in_child(config: StoreConfig, kind: str, model_id: str, only_model: str | None,
                   out: Path, progress: Progress, cancelled: Callable[[], bool],
                   poll_s: float = 0.5, pair_score: float = DEFAULT_PAIR_SCORE,
                   niceness: int = REBUILD_NICENESS) -> int:
    """Builds in a spawned process `niceness` above this thread's (capped at 19); returns
    the sequence the side file covers.

    `cancelled` is polled: when it turns true (the server is stopping) the child is killed.
    """
    context = multiprocessing.get_context("spawn")
    messages: multiprocessing.Queue[tuple[str, int, int, str]] = context.Queue()
    nice = niceness_above_this_thread(niceness)
    child = context.Process(target=_child_main, name="dedup-rebuild", daemon=True,
                            args=(config, kind, model_id, only_model, str(out), messages,
                                  pair_score, nice, os.getpid()))
    child.start()
    try:
        _lower_priority(child, nice)
        for phase, first, second, text in _messages(child, messages, poll_s):
            if cancelled():
                raise StoreError("rebuild cancelled: the server is stopping")
            if phase == "built":
                return first
            if phase == "precondition":
                raise FailedPrecondition(text)
            if phase == "error":
                raise StoreError(f"rebuild failed in the build process: {text}")
            if phase != "waiting":
                progress(phase, first, second)
        raise StoreError(f"rebuild process exited with code {child.exitcode} before finishing")
    finally:
        if cancelled():
            child.kill()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def _messages(child: multiprocessing.process.BaseProcess,
              messages: multiprocessing.Queue[tuple[str, int, int, str]],
              poll_s: float) -> Iterator[tuple[str, int, int, str]]:
    while True:
        try:
            yield messages.get(timeout=poll_s)
        except queue.Empty:
            yield ("waiting", 0, 0, "")
            if not child.is_alive():
                time.sleep(poll_s)  # a last message may still be in the pipe
                try:
                    yield messages.get_nowait()
                except queue.Empty:
                    return
