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
        self.failed_rows: list[int] = []  # the queries (rows of QUERIES) of a failed batch
        self.first_started = threading.Event()
        self.release = threading.Event()
        self.overlap = threading.Barrier(2)  # with slices: both must be searching at once
        self.waits_for_overlap = False
        self._lock = threading.Lock()

    def __call__(self, queries, k):
        if not self.first_started.is_set():
            self.first_started.set()
            assert self.release.wait(10)
        with self._lock:
            self.batches.append(len(queries))
            self.omp_threads.append(faiss.omp_get_max_threads())
        if self.waits_for_overlap and len(queries) > 1:
            self.overlap.wait(10)  # BrokenBarrierError unless the other slice runs meanwhile
        if len(queries) == self.failing_size:
            self.failed_rows += [int(np.argmax(query)) for query in queries]
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
    assert batcher.counts() == (2, 8)
    for i, future in enumerate(futures):  # each caller got its own row
        assert future.result().ids.tolist() == search.expected(i)


def test_a_batch_is_cut_into_one_slice_a_thread_each_on_one_faiss_thread():
    search = RecordingSearch()
    search.waits_for_overlap = True
    batcher = SearchBatcher(search, dimension=8, dispatchers=1, threads=2)
    try:
        futures = eight_queries_seven_queued(batcher, search)
    finally:
        batcher.close()
    assert all(future.exception() is None for future in futures)  # the slices overlapped
    assert sorted(search.batches) == [1, 3, 4]  # the seven waiting, in two slices
    assert search.omp_threads == [1, 1, 1]  # FAISS's own threads would spin between batches
    assert batcher.counts() == (2, 8)
    for i, future in enumerate(futures):
        assert future.result().ids.tolist() == search.expected(i)


def test_a_failed_slice_fails_its_own_callers_only():
    search = RecordingSearch(failing_size=3)  # the smaller slice of the seven
    batcher = SearchBatcher(search, dimension=8, dispatchers=1, threads=2)
    try:
        futures = eight_queries_seven_queued(batcher, search)
        after = batcher.search(QUERIES[5], 3)  # the dispatcher goes on
    finally:
        batcher.close()
    failed = [i for i, future in enumerate(futures) if future.exception() is not None]
    assert len(failed) == 3 and failed == sorted(search.failed_rows)
    for i in set(range(8)) - set(failed):
        assert futures[i].result().ids.tolist() == search.expected(i)
    assert after.ids.tolist() == search.expected(5)


def test_callers_with_different_k_in_one_slice_each_get_their_own():
    search = RecordingSearch()
    search.release.set()
    batcher = SearchBatcher(search, dimension=8, dispatchers=1, threads=1)
    try:
        with ThreadPoolExecutor(4) as pool:
            found = list(pool.map(lambda k: batcher.search(QUERIES[k], k), [1, 2, 3, 4]))
    finally:
        batcher.close()
    for k, neighbours in zip([1, 2, 3, 4], found, strict=True):
        assert neighbours.ids.tolist() == search.index.search(QUERIES[k:k + 1], k)[1][0].tolist()
