"""Micro-batching: concurrent single-query searches coalesced into FAISS batch searches.

A batch search of 64 queries reads the index once instead of 64 times. Callers hand a
query to `search` and wait; a dispatcher thread takes every query waiting (waiting at most
`max_wait_s` for more when fewer than `max_batch` are there), cuts the batch into `threads`
slices, searches them at once on as many threads (one FAISS thread each), and hands each
caller its row. `dispatchers` such threads may run batches at once.

One dispatcher cutting its batch, or one dispatcher a core taking turns (the default:
dispatchers=2, threads=1): the hope was fuller batches, since a batch search reads a list once
for all its queries and while a batch is searched every other query queues for the next. Raw
FAISS on FastScanIVF4096 at 10,000,000 clustered registrations, nprobe 1,448, CPU ms a query:
one query a call 7.4-8.1, two 6.4-6.5, four 4.7-4.8. Served to 8 clients (benchmarks/scale.py),
one dispatcher of two slices took 3.7-3.9 queries a batch where two dispatchers took 2.05 each,
but that is the same ~2 a FAISS call, and checks/s came out the same within this machine's
noise, both ways round (10,000,000 clustered: 212 against 192, 184 against 185; 1,000,000
clustered: 408 against 310, then 332 and 342 against 421). Waiting 3 ms for a fuller batch made
198, 6 ms 174. The slices run on Python threads, not FAISS's OpenMP threads: libgomp's idle
threads spin between batches on the cores the request path needs (served that way a check cost
9.5-10.1 ms of CPU against 7.9, and 8.4 with OMP_WAIT_POLICY=PASSIVE).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np

from dedup.core.vectors import Matrix, Vector
from dedup.core.work_queue import take_batch
from dedup.gallery.embedded.index import Ids, Scores

log = logging.getLogger("dedup.gallery")

# Runs one batch search; returns whether its scores are exact (it says which index answered:
# a rebuild may swap the index between a caller's decision and the search), and the rows.
SearchBatch = Callable[[Matrix, int], tuple[bool, list[tuple[Ids, Scores]]]]


@dataclass(frozen=True)
class Neighbours:
    ids: Ids
    scores: Scores
    exact: bool


@dataclass
class _Query:
    vector: Vector
    k: int
    future: Future[Neighbours]


# FAISS answers an exact search with a matrix multiply (BLAS), which reads the gallery once
# per batch, when queries x dimension reaches distance_compute_blas_threshold; its default
# (128,000 in faiss-cpu 1.15) makes every micro-batch under 250 queries scan the gallery
# once per query. Measured here at 100,000 vectors on one thread: one query 67 q/s by the
# scan and 32 by BLAS; batches of 4: 125 q/s, of 8: 230, of 64: 933 by BLAS, 70 by the scan.
BLAS_FROM_BATCH = 2


class SearchBatcher:
    def __init__(self, search: SearchBatch, dimension: int, max_batch: int = 64,
                 max_wait_s: float = 0.0, dispatchers: int = 2, threads: int = 1) -> None:
        self._search = search
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.threads = threads
        self._batches = self._queries = 0  # searched so far (the average batch: ratio)
        self._counting = threading.Lock()
        self._queue: queue.Queue[_Query | None] = queue.Queue()
        faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_BATCH * dimension
        # OpenMP's thread count is per calling thread: one in each slice's thread.
        self._slices = ThreadPoolExecutor(
            dispatchers * (threads - 1), thread_name_prefix="dedup-search-slice",
            initializer=faiss.omp_set_num_threads, initargs=(1,)) if threads > 1 else None
        self._dispatchers = [threading.Thread(target=self._dispatch, daemon=True,
                                              name=f"dedup-search-{i}")
                             for i in range(dispatchers)]
        for thread in self._dispatchers:
            thread.start()

    def search(self, vector: Vector, k: int) -> Neighbours:
        query = _Query(vector, k, Future())
        self._queue.put(query)
        return query.future.result()

    def _dispatch(self) -> None:
        faiss.omp_set_num_threads(1)
        while (batch := take_batch(self._queue, self.max_batch, self.max_wait_s)) is not None:
            first, *others = _slices(batch, self.threads)
            running = [self._start(part) for part in others]
            self._answer(first)
            for future in running:
                future.result()  # _answer never raises: each caller has its outcome
            with self._counting:
                self._batches, self._queries = self._batches + 1, self._queries + len(batch)

    def _start(self, part: list[_Query]) -> Future[None]:
        """`part` answered on a slice thread; on this one once the pool is shut down (a
        dispatcher still searching when close() gave up waiting for it)."""
        try:
            if self._slices:
                return self._slices.submit(self._answer, part)
        except RuntimeError:
            pass
        self._answer(part)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _answer(self, batch: Sequence[_Query]) -> None:
        """Every caller of `batch` gets its row or the search's error; never raises."""
        try:
            exact, results = self._search(np.vstack([q.vector for q in batch]),
                                          max(q.k for q in batch))
            rows = [Neighbours(ids[:query.k], scores[:query.k], exact)
                    for query, (ids, scores) in zip(batch, results, strict=True)]
        except BaseException as error:  # hand the failure to every waiting caller
            for query in batch:
                query.future.set_exception(error)
            return
        for query, row in zip(batch, rows, strict=True):
            query.future.set_result(row)

    def counts(self) -> tuple[int, int]:
        """(batches searched, queries in them) so far."""
        with self._counting:
            return self._batches, self._queries

    def close(self) -> None:
        for _ in self._dispatchers:
            self._queue.put(None)
        for thread in self._dispatchers:
            thread.join(timeout=10)
        if self._slices:
            self._slices.shutdown(wait=True)
        batches, queries = self.counts()
        if batches:
            log.info("searched %d queries in %d batches (%.2f a batch)", queries, batches,
                     queries / batches)


def _slices(batch: list[_Query], threads: int) -> list[list[_Query]]:
    """`batch` cut into min(threads, len(batch)) slices of nearly equal size, in order."""
    parts = min(threads, len(batch))
    return [batch[len(batch) * i // parts:len(batch) * (i + 1) // parts] for i in range(parts)]
