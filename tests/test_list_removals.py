"""Removals from the list types (FastScanIVF, SignIVF) are marked, not found by reading every
list's ids each time (FAISS's remove_ids: 6.3-6.5 ms at 1,000,000 registrations, 37-38 ms at
10,000,000 on one thread for FastScanIVF, every check waiting). Searches, counts, checkpoints
and loads must not tell the difference."""

from __future__ import annotations

import numpy as np
import pytest
from marked_removals import assert_marked_searches_as_removed

from dedup.core.vectors import normalize_rows
from dedup.gallery.embedded import index as index_module
from dedup.gallery.embedded.index import (
    FastScanIVFIndex,
    PartitionedIndex,
    SearchOptions,
    SignIVFIndex,
    training_size,
)

DIMENSION = 512
NLIST = 16
COUNT = 3000
EVERY_LIST = SearchOptions(nprobe=NLIST)


def _vectors(seed: int = 1) -> np.ndarray:
    return normalize_rows(np.random.default_rng(seed).standard_normal(
        (COUNT, DIMENSION), dtype=np.float32))


@pytest.fixture(params=[FastScanIVFIndex, SignIVFIndex], ids=["FastScanIVF", "SignIVF"])
def kind(request) -> type[PartitionedIndex]:
    return request.param


def _filled(kind: type[PartitionedIndex], vectors: np.ndarray) -> PartitionedIndex:
    index = kind(DIMENSION, NLIST)
    index.train(vectors[:training_size(index.kind, DIMENSION)])
    index.add(np.arange(COUNT, dtype=np.int64), vectors)
    return index


def _removed_ids() -> np.ndarray:
    return np.random.default_rng(7).choice(COUNT, 200, replace=False).astype(np.int64)


def _reloaded(index: PartitionedIndex) -> PartitionedIndex:
    payload = np.frombuffer(b"".join(bytes(part) for part in index.snapshot(1, "m").parts),
                            np.uint8)
    return type(index).deserialize(payload, DIMENSION, NLIST)


def test_a_removal_marks_its_ids_instead_of_reading_every_list(kind):
    index = _filled(kind, _vectors())
    assert index.remove(np.array([17], np.int64)) == 1
    assert len(index) == COUNT - 1
    assert index._index.ntotal == COUNT  # before: removed from its list at once


def test_searches_with_marked_removals_find_what_they_would_after_the_removal(kind, monkeypatch):
    monkeypatch.setattr(index_module, "MARKED_LIST_REMOVALS_MOST", 1024)  # all 200 marked
    vectors = _vectors()
    marked, compacted = _filled(kind, vectors), _filled(kind, vectors)
    removed = _removed_ids()
    assert_marked_searches_as_removed(marked, compacted, vectors, removed, EVERY_LIST)


def test_removing_what_is_not_there_changes_nothing(kind):
    index = _filled(kind, _vectors())
    assert index.remove(np.array([5, 6], np.int64)) == 2
    assert index.remove(np.array([5, 6, COUNT + 10, 10 * COUNT, -3], np.int64)) == 0
    assert len(index) == COUNT - 2


def test_a_snapshot_holds_no_removed_id_and_a_load_knows_what_it_holds(kind):
    vectors = _vectors()
    index = _filled(kind, vectors)
    removed = _removed_ids()
    index.remove(removed)
    loaded = _reloaded(index)
    assert len(loaded) == loaded._index.ntotal == COUNT - 200 == len(index)
    found = {int(key) for ids, _ in loaded.search(vectors, 5, EVERY_LIST) for key in ids}
    assert not found & set(removed.tolist())
    assert loaded.remove(removed[:10]) == 0  # not held: not counted again
    kept = [key for key in range(COUNT) if key not in set(removed.tolist())][:3]
    assert loaded.remove(np.array(kept, np.int64)) == 3
    assert len(loaded) == COUNT - 203


def test_the_codes_go_once_enough_removals_are_marked(kind, monkeypatch):
    monkeypatch.setattr(index_module, "MARKED_LIST_REMOVALS_MOST", 50)
    index = _filled(kind, _vectors())
    assert index.remove(np.arange(49, dtype=np.int64)) == 49
    assert index._index.ntotal == COUNT
    assert index.remove(np.array([49, 50, COUNT + 1], np.int64)) == 2
    assert index._index.ntotal == COUNT - 51 == len(index)


def test_an_id_added_again_after_its_removal_is_found_by_its_new_code(kind):
    vectors = _vectors()
    index = _filled(kind, vectors)
    index.remove(np.array([5], np.int64))
    index.add(np.array([5], np.int64), vectors[6:7])  # now id 5 holds person 6's face
    ids, _ = index.search(vectors[6:7], 2, EVERY_LIST)[0]
    assert sorted(ids.tolist()) == [5, 6]
    assert len(index) == COUNT
    assert index.remove(np.array([5], np.int64)) == 1 and len(index) == COUNT - 1


def test_a_built_index_knows_what_its_fill_holds(kind):
    vectors = _vectors()
    index = kind(DIMENSION, NLIST)
    index.train(vectors[:training_size(index.kind, DIMENSION)])
    for batch in np.array_split(np.arange(COUNT, dtype=np.int64), 3):  # as a build fills
        index.fill(batch, vectors[batch])
    assert index.remove(np.array([4, COUNT + 4], np.int64)) == 1  # finishes the fill first
    assert len(index) == COUNT - 1
    assert 4 not in index.search(vectors[4:5], 3, EVERY_LIST)[0][0]


def test_a_loaded_index_flags_ids_past_the_ones_it_was_loaded_with(kind):
    vectors = _vectors()
    loaded = _reloaded(_filled(kind, vectors))
    loaded.add(np.array([10 * COUNT], np.int64), vectors[:1])  # _held grows
    assert loaded.remove(np.array([10 * COUNT], np.int64)) == 1
    assert len(loaded) == COUNT


def test_codes_an_add_put_in_before_it_failed_can_be_removed(kind):
    """FAISS adds a batch's codes one after another: one failing partway (no memory) leaves
    some in the lists. A removal must still find them (the whole batch is flagged), or no
    checkpoint would ever drop an erased one."""
    vectors = _vectors()
    index = kind(DIMENSION, NLIST)
    index.train(vectors[:training_size(index.kind, DIMENSION)])
    first = COUNT - 10
    index.add(np.arange(first, dtype=np.int64), vectors[:first])
    index.remove(np.array([0], np.int64))  # a mark stays a mark
    name = "add_core" if kind is SignIVFIndex else "add_with_ids"
    real = getattr(index._index, name)

    def three_then_no_memory(*args):
        if name == "add_core":
            real(3, *args[1:])
        else:
            real(args[0][:3], args[1][:3])
        raise MemoryError

    setattr(index._index, name, three_then_no_memory)
    with pytest.raises(MemoryError):
        index.add(np.arange(first, COUNT, dtype=np.int64), vectors[first:])
    setattr(index._index, name, real)
    assert index._index.ntotal == first + 3
    assert index.remove(np.arange(first, COUNT, dtype=np.int64)) == 10  # 7 never went in
    assert index.remove(np.array([0], np.int64)) == 0
    loaded = _reloaded(index)
    assert len(index) == first - 1
    assert len(loaded) == first - 1
    found = {int(key) for ids, _ in loaded.search(vectors[first:first + 3], 3, EVERY_LIST)
             for key in ids}
    assert not found & set(range(first, COUNT))
