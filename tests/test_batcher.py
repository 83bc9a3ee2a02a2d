"""The micro-batcher: the queries waiting coalesced into one batch, cut into one slice a
search thread, each searched on one FAISS thread."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import faiss
import numpy as np

from dedup.gallery.embedded.batcher import SearchBatcher

QUERIES = np.eye(8, dtype=np.float32)


class RecordingSearch:
    """A FAISS exact search of a small gallery that records each batch's size and its
    thread's OpenMP thread count, and holds the first batch until released; batches of
    `failing_size` queries fail."""

    def __init__(self, failing_size: int = 0) -> None:
        rng = np.random.default_rng(3)
        self.index = faiss.IndexFlatIP(8)
        self.index.add(rng.standard_normal((100, 8)).astype(np.float32))
        self.failing_size = failing_size
        self.batches: list[int] = []
        self.omp_threads: list[int] = []
        self.first_started = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, queries, k):
        if not self.first_started.is_set():
            self.first_started.set()
            assert self.release.wait(10)
        with self._lock:
            self.batches.append(len(queries))
            self.omp_threads.append(faiss.omp_get_max_threads())
        if len(queries) == self.failing_size:
            raise RuntimeError("this slice failed")
        scores, ids = self.index.search(queries, k)
        return True, list(zip(ids, scores, strict=True))

    def expected(self, i: int) -> list[int]:
        return self.index.search(QUERIES[i:i + 1], 3)[1][0].tolist()


def eight_queries_seven_queued(batcher: SearchBatcher, search: RecordingSearch
                               ) -> list[Future]:
    """The first query's search held until seven more wait behind it; their futures."""
    pool = ThreadPoolExecutor(8)
    futures = [pool.submit(batcher.search, QUERIES[0], 3)]
    assert search.first_started.wait(10)
    futures += [pool.submit(batcher.search, QUERIES[i], 3) for i in range(1, 8)]
    while batcher._queue.qsize() < 7:
        threading.Event().wait(0.01)
    search.release.set()
    pool.shutdown(wait=True)
    return futures


def test_queries_arriving_during_a_search_go_into_the_next_batch_together():
    search = RecordingSearch()
    batcher = SearchBatcher(search, dimension=8, dispatchers=1, threads=1)
    try:
        futures = eight_queries_seven_queued(batcher, search)
    finally:
        batcher.close()
    assert search.batches == [1, 7]
    assert (batcher.batches, batcher.queries) == (2, 8)
    for i, future in enumerate(futures):  # each caller got its own row
        assert future.result().ids.tolist() == search.expected(i)


def test_a_batch_is_cut_into_one_slice_a_thread_each_on_one_faiss_thread():
    search = RecordingSearch()
    batcher = SearchBatcher(search, dimension=8, dispatchers=1, threads=2)
    try:
        futures = eight_queries_seven_queued(batcher, search)
    finally:
        batcher.close()
    assert sorted(search.batches) == [1, 3, 4]  # the seven waiting, in two slices
    assert search.omp_threads == [1, 1, 1]  # FAISS's own threads would spin between batches
    assert (batcher.batches, batcher.queries) == (2, 8)
    for i, future in enumerate(futures):
        assert future.result().ids.tolist() == search.expected(i)


def test_a_failed_slice_fails_its_own_callers_only():
    search = RecordingSearch(failing_size=3)  # the first slice of the seven
    batcher = SearchBatcher(search, dimension=8, dispatchers=1, threads=2)
    try:
        futures = eight_queries_seven_queued(batcher, search)
    finally:
        batcher.close()
    failed = [i for i, future in enumerate(futures) if future.exception() is not None]
    assert failed == [1, 2, 3]
    for i in (0, 4, 5, 6, 7):
        assert futures[i].result().ids.tolist() == search.expected(i)
