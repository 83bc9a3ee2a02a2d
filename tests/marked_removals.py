"""What the index types that mark removals (BinarySign, FastScanIVF) must show: searches, after
removals marked one by one and in a batch, as on an index whose codes were removed."""

from __future__ import annotations

from typing import Any

import numpy as np

from dedup.gallery.embedded.index import SearchOptions


def assert_marked_searches_as_removed(marked: Any, compacted: Any, vectors: np.ndarray,
                                      removed: np.ndarray, options: SearchOptions) -> None:
    """`marked` and `compacted` hold `vectors` under ids 0..n-1; `removed` (200 of them) are
    marked in `marked` and removed for good from `compacted`."""
    count = len(vectors)
    for key in removed[:100]:  # one by one, as deletes come
        assert marked.remove(np.array([key])) == 1
    assert marked.remove(removed[100:]) == 100
    compacted.remove(removed)
    with compacted._lock.writing():
        compacted._remove_marked()
    assert len(marked) == len(compacted) == count - 200
    assert marked._index.ntotal == count and compacted._index.ntotal == count - 200
    queries = vectors[:60] + 0.05 * np.random.default_rng(3).standard_normal(
        (60, vectors.shape[1]), dtype=np.float32)
    for (ids, scores), (want_ids, want_scores) in zip(
            marked.search(queries, 64, options), compacted.search(queries, 64, options),
            strict=True):
        assert not np.isin(ids, removed).any()
        np.testing.assert_array_equal(scores, want_scores)
        above_the_last = want_scores > want_scores[-1]  # ties at the k-th may come in any order
        assert set(ids[above_the_last]) == set(want_ids[above_the_last])
