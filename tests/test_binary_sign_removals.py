"""BinarySign removals are marked, not compacted one by one: FAISS removes a code from a flat
index by moving every code after it (31-44 ms at 1,000,000 registrations, ~0.45 s at 10,000,000,
every check waiting). Searches, counts and checkpoints must not tell the difference."""

from __future__ import annotations

import numpy as np
from marked_removals import assert_marked_searches_as_removed

from dedup.core.vectors import normalize_rows
from dedup.gallery.embedded import index as index_module
from dedup.gallery.embedded.index import BinarySignIndex, SearchOptions

DIMENSION = 512
COUNT = 3000


def _filled(seed: int = 1) -> tuple[BinarySignIndex, np.ndarray]:
    vectors = normalize_rows(np.random.default_rng(seed).standard_normal(
        (COUNT, DIMENSION), dtype=np.float32))
    index = BinarySignIndex(DIMENSION, 512)
    index.add(np.arange(COUNT, dtype=np.int64), vectors)
    return index, vectors


def _removed_ids() -> np.ndarray:
    return np.random.default_rng(7).choice(COUNT, 200, replace=False).astype(np.int64)


def test_a_removal_marks_its_ids_instead_of_moving_every_code():
    index, _ = _filled()
    assert index.remove(np.array([17], np.int64)) == 1
    assert len(index) == COUNT - 1
    assert index._index.ntotal == COUNT  # before: every code after id 17 moved, at once


def test_searches_with_marked_removals_find_what_they_would_after_the_removal():
    marked, vectors = _filled()
    compacted, _ = _filled()
    removed = _removed_ids()
    assert_marked_searches_as_removed(marked, compacted, vectors, removed, SearchOptions())


def test_removing_what_is_not_there_changes_nothing():
    index, _ = _filled()
    assert index.remove(np.array([5, 6], np.int64)) == 2
    assert index.remove(np.array([5, 6, COUNT + 10, -3], np.int64)) == 0
    assert len(index) == COUNT - 2


def test_a_removal_that_reaches_the_limit_counts_only_what_was_there(monkeypatch):
    monkeypatch.setattr(index_module, "MARKED_REMOVALS_MOST", 4)
    index, _ = _filled()
    assert index.remove(np.array([5, 6], np.int64)) == 2
    # ids not held do not count to the limit: 7 is marked beside 5 and 6
    assert index.remove(np.array([5, 6, COUNT + 10, -3, 7], np.int64)) == 1
    assert (index._index.ntotal, len(index)) == (COUNT, COUNT - 3)
    assert index.remove(np.array([COUNT + 1, COUNT + 2, 9], np.int64)) == 1  # the 4th: all
    assert index._index.ntotal == COUNT - 4 == len(index)


def test_a_snapshot_holds_no_removed_code():
    index, vectors = _filled()
    removed = _removed_ids()
    index.remove(removed)
    checkpoint = index.snapshot(9, "m")
    assert checkpoint.vectors == COUNT - 200 == len(index)
    payload = b"".join(bytes(part) for part in checkpoint.parts)
    codes = index.encode(vectors)
    assert not [key for key in removed.tolist() if codes[key].tobytes() in payload]
    kept = [key for key in range(COUNT) if key not in set(removed.tolist())][:50]
    assert all(codes[key].tobytes() in payload for key in kept)  # the check can fail


def test_the_codes_go_once_enough_removals_are_marked(monkeypatch):
    monkeypatch.setattr(index_module, "MARKED_REMOVALS_MOST", 50)
    index, _ = _filled()
    assert index.remove(np.arange(49, dtype=np.int64)) == 49
    assert index._index.ntotal == COUNT
    assert index.remove(np.array([49, 50], np.int64)) == 2
    assert index._index.ntotal == COUNT - 51 == len(index)


def test_an_id_added_again_after_its_removal_is_found_by_its_new_code():
    index, vectors = _filled()
    index.remove(np.array([5], np.int64))
    index.add(np.array([5], np.int64), vectors[6:7])  # now id 5 holds person 6's face
    ids, scores = index.search(vectors[6:7], 2, SearchOptions())[0]
    assert sorted(ids.tolist()) == [5, 6] and scores[0] == scores[1] == 0
    assert len(index) == COUNT
