"""A build's choice of lists by int8 products (list_assignment.py) on real FAISS and
onnxruntime: always the exact nearest centroid, on any gallery, including where the integer
scores alone cannot tell two centroids apart; and an index filled so is the index added
exactly, code for code."""

from __future__ import annotations

import threading
import time
import tracemalloc

import numpy as np
import pytest

from dedup import FaceGenerator
from dedup.core.errors import FailedPrecondition
from dedup.core.vectors import normalize_rows
from dedup.gallery.embedded import index as index_module
from dedup.gallery.embedded import list_assignment
from dedup.gallery.embedded.checkpoint import write_checkpoint
from dedup.gallery.embedded.index import (
    FastScanIVFIndex,
    SearchOptions,
    SignIVFIndex,
    load_index,
    training_size,
)
from dedup.gallery.embedded.list_assignment import (
    Int8Assignment,
    _product_session,
    _products_exact,
    int8_assignment,
    paying_rescores,
    rows_per_product,
)

NLIST = 64
SIZE = 20_000


def uneven(count: int, seed: int) -> np.ndarray:
    """Vectors with a few strong directions, as face embeddings have."""
    rng = np.random.default_rng(seed)
    spectrum = (1.0 / np.sqrt(np.arange(1, 513))).astype(np.float32)
    return normalize_rows(rng.standard_normal((count, 512), dtype=np.float32) * spectrum)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return uneven(SIZE, 3)


@pytest.fixture(scope="module")
def trained(vectors) -> SignIVFIndex:
    index = SignIVFIndex(512, NLIST)
    index.train(vectors[: training_size(index.kind, 512)])
    return index


def centroids_of(index: SignIVFIndex) -> np.ndarray:
    return index._centroids.reconstruct_n(0, index.nlist)


def exact_int8(centroids: np.ndarray) -> Int8Assignment:
    """The int8 assignment, or a skip on a CPU whose int8 products are not exact (builds
    there assign by the float product, which the index tests cover)."""
    assignment = int8_assignment(centroids)
    if assignment is None:
        pytest.skip("onnxruntime's int8 products are not exact on this CPU")
    return assignment


def trained_with_int8(kind, vectors: np.ndarray):
    """An index of `kind` trained on `vectors`, or a skip on a CPU whose int8 products are
    not exact (its fills take the float product)."""
    index = kind(512, NLIST)
    index.train(vectors[: training_size(index.kind, 512)])
    if index._fill_assignment is None:
        pytest.skip("onnxruntime's int8 products are not exact on this CPU")
    return index


def assert_nearest(chosen: np.ndarray, vectors: np.ndarray, centroids: np.ndarray) -> None:
    """Each chosen centroid scores the best in float64 (within float32's rounding)."""
    scores = vectors.astype(np.float64) @ centroids.astype(np.float64).T
    best = scores.max(axis=1)
    mine = scores[np.arange(len(vectors)), chosen]
    assert np.all(mine >= best - 1e-6), np.flatnonzero(mine < best - 1e-6)[:10]


@pytest.mark.parametrize("gallery", ["uneven", "isotropic"])
def test_every_list_is_the_exact_nearest_centroid(trained, vectors, gallery):
    rows = vectors if gallery == "uneven" else FaceGenerator(11).persons(SIZE)
    centroids = centroids_of(trained)
    assignment = exact_int8(centroids)
    chosen = assignment.lists_of(rows)
    assert chosen.shape == (SIZE,) and chosen.dtype == np.int64
    assert_nearest(chosen, rows, centroids)


def test_centroids_the_integer_scores_cannot_tell_apart_are_told_apart_in_float(trained):
    # each vector halfway between two centroids, nudged towards one: the integer scores'
    # error bound covers both, so the float re-score decides
    centroids = centroids_of(trained)
    rng = np.random.default_rng(5)
    first, second = rng.integers(0, NLIST, 2000), rng.integers(0, NLIST, 2000)
    keep = first != second
    nudge = rng.choice([-1e-3, 1e-3], keep.sum())[:, None]
    rows = normalize_rows((0.5 + nudge) * centroids[first[keep]]
                          + (0.5 - nudge) * centroids[second[keep]])
    assignment = exact_int8(centroids)
    chosen = assignment.lists_of(rows)
    assert_nearest(chosen, rows, centroids)
    codes, slack = assignment._codes(rows)
    integer = (codes.astype(np.int64) - 128) @ np.rint(centroids * assignment.scale).T
    tied = np.sort(integer, axis=1)[:, -2] >= integer.max(axis=1) - slack
    assert tied.mean() > 0.9  # the case under test occurs


def test_a_centroid_is_assigned_its_own_list(trained):
    centroids = centroids_of(trained)
    assert exact_int8(centroids).lists_of(centroids).tolist() == list(range(NLIST))


def test_float_rescoring_in_small_chunks_chooses_the_same_exact_lists(trained, vectors,
                                                                      monkeypatch):
    # uneven rows leave many centroids close in integers: re-scored 50 (row, centroid)
    # pairs at a time, a row's candidates span chunks, and it must choose as before
    centroids = centroids_of(trained)
    assignment = exact_int8(centroids)
    rows = vectors[:3000]
    whole = assignment.lists_of(rows)
    monkeypatch.setattr(list_assignment, "_CANDIDATES", 50)
    grouped = assignment.lists_of(rows)
    assert grouped.tolist() == whole.tolist()
    assert_nearest(grouped, rows, centroids)


def test_a_product_holds_a_cache_sized_block_of_scores_up_to_65536_lists():
    assert rows_per_product(4096) == 256  # the size measured on 10,000,000 rows
    assert rows_per_product(65_536) == 16  # 4 MB of scores, not the 64 MB of 256 rows
    assert rows_per_product(64) == 1024  # few lists: at most 1,024 rows of vectors
    assert rows_per_product(1 << 22) == 16


def test_a_row_close_to_every_centroid_is_rescored_a_bounded_group_at_a_time(monkeypatch):
    # a zero row ties with all 4,096 centroids: its float re-score must not gather them all
    # at once (16 MB of vectors and centroids here; 256 MB at 65,536 lists)
    centroids = normalize_rows(np.random.default_rng(8).standard_normal((4096, 512),
                                                                        dtype=np.float32))
    assignment = exact_int8(centroids)
    rows = np.zeros((3, 512), np.float32)
    rows[1] = centroids[77]
    whole = assignment.lists_of(rows)
    # 256 pairs gather ~1 MB; the 4,096 at once (or the default 1,024's 4 MB) would not fit
    monkeypatch.setattr(list_assignment, "_CANDIDATES", 256)
    tracemalloc.start()
    try:
        grouped = assignment.lists_of(rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grouped.tolist() == whole.tolist() and grouped[1] == 77
    assert_nearest(grouped, rows, centroids)
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB at most 256 pairs at a time"


def test_a_zero_row_gets_a_list_and_rows_that_would_overflow_are_refused(trained):
    centroids = centroids_of(trained)
    assignment = exact_int8(centroids)
    rows = np.zeros((2, 512), np.float32)
    rows[1, 0] = 1.0
    with np.errstate(all="raise"):  # no overflow or NaN on the way
        chosen = assignment.lists_of(rows)
    assert 0 <= chosen[0] < NLIST
    assert_nearest(chosen[1:], rows[1:], centroids)
    for bad in (np.nan, np.inf, 1e-38, 1e31):
        wrong = rows.copy()
        wrong[1, :] = 0
        wrong[1, 5] = bad  # the row's largest value
        with pytest.raises(ValueError, match="vectors: row 1 holds NaN"):
            assignment.lists_of(wrong)


def test_integer_products_that_are_not_exact_are_refused(trained):
    codes = np.rint(centroids_of(trained) * 100).astype(np.int8)
    session = _product_session(codes, threads=1)
    if not _products_exact(session, codes):
        pytest.skip("onnxruntime's int8 products are not exact on this CPU")
    other = codes.copy()
    other[3, 7] += 1  # a session whose products differ from these codes' in one place
    assert not _products_exact(session, other)


PARTITIONED = [SignIVFIndex, FastScanIVFIndex]


def snapshot_bytes(index) -> bytes:
    return b"".join(bytes(part) for part in index.snapshot(1, "model").parts)


@pytest.mark.parametrize("kind", PARTITIONED, ids=lambda kind: kind.__name__)
def test_an_index_filled_so_is_the_index_added_exactly(vectors, kind):
    ids = np.arange(SIZE, dtype=np.int64) * 7 + 1
    filled, added = kind(512, NLIST), kind(512, NLIST)
    for index in (filled, added):
        index.train(vectors[: training_size(index.kind, 512)])
    for batch in np.array_split(np.arange(SIZE), 3):  # as a build fills, batch by batch
        filled.fill(ids[batch], vectors[batch])
    assert len(filled) == SIZE
    filled.finish_fill()
    assert filled._fill_assignment is None  # its session and centroids' copy not kept
    added.add(ids, vectors)
    assert snapshot_bytes(filled) == snapshot_bytes(added)
    queries = normalize_rows(vectors[:300] + 0.5 * uneven(300, 9))
    every_list = SearchOptions(nprobe=NLIST)
    for (_, filled_scores), (_, added_scores) in zip(
            filled.search(queries, 10, every_list), added.search(queries, 10, every_list),
            strict=True):
        assert filled_scores.tolist() == added_scores.tolist()
    own = filled.search(vectors[:300], 1, SearchOptions(nprobe=4))
    assert [found.tolist() for found, _ in own] == [[i] for i in ids[:300]]


def test_a_fast_scan_fill_is_searched_changed_and_saved_whole_without_finish_fill(vectors):
    """Whatever comes after a fill sees every filled vector: a search, an add, a removal
    and a snapshot each finish the fill first."""
    def filled() -> FastScanIVFIndex:
        index = FastScanIVFIndex(512, NLIST)
        index.train(vectors[: training_size(index.kind, 512)])
        index.fill(np.arange(SIZE - 1, dtype=np.int64), vectors[:-1])
        return index

    searched = filled()
    found = searched.search(vectors[:50], 1, SearchOptions(nprobe=4))
    assert [ids.tolist() for ids, _ in found] == [[i] for i in range(50)]
    grown = filled()
    grown.add(np.array([SIZE - 1], np.int64), vectors[-1:])
    assert len(grown) == SIZE
    assert grown.search(vectors[-1:], 1, SearchOptions(nprobe=4))[0][0].tolist() == [SIZE - 1]
    shrunk = filled()
    assert shrunk.remove(np.arange(10, dtype=np.int64)) == 10 and len(shrunk) == SIZE - 11
    saved, reference = filled(), filled()
    reference.finish_fill()
    assert snapshot_bytes(saved) == snapshot_bytes(reference)


def test_an_empty_batch_mid_fill_keeps_the_fill_pending(vectors):
    index = trained_with_int8(FastScanIVFIndex, vectors)
    index.fill(np.arange(100, dtype=np.int64), vectors[:100])
    index.fill(np.zeros(0, np.int64), np.zeros((0, 512), np.float32))
    index.fill(np.arange(100, 200, dtype=np.int64), vectors[100:200])
    assert index._filling is not None and int(index._filling.ntotal) == 200
    index.finish_fill()
    assert len(index) == 200


def test_a_fill_after_vectors_were_added_adds_exactly(vectors):
    index = FastScanIVFIndex(512, NLIST)
    index.train(vectors[: training_size(index.kind, 512)])
    index.add(np.arange(100, dtype=np.int64), vectors[:100])
    index.fill(np.arange(100, 200, dtype=np.int64), vectors[100:200])
    assert len(index) == 200 and index._filling is None  # nothing held back
    assert index.search(vectors[150:151], 1, SearchOptions(nprobe=4))[0][0].tolist() == [150]


@pytest.mark.parametrize("kind", PARTITIONED, ids=lambda kind: kind.__name__)
def test_fill_needs_the_centroids_of_train(vectors, kind):
    index = kind(512, NLIST)
    with pytest.raises(FailedPrecondition, match="fill follows train"):
        index.fill(np.arange(3, dtype=np.int64), vectors[:3])


@pytest.mark.parametrize("kind", PARTITIONED, ids=lambda kind: kind.__name__)
@pytest.mark.parametrize("int8", [True, False], ids=["int8", "float"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e31, 1e-31])
def test_a_fill_refuses_the_same_rows_whether_or_not_int8_products_are_exact(vectors, kind,
                                                                             int8, bad):
    index = kind(512, NLIST)
    index.train(vectors[: training_size(index.kind, 512)])
    if int8 and index._fill_assignment is None:
        pytest.skip("onnxruntime's int8 products are not exact on this CPU")
    if not int8:
        index._fill_assignment = None  # as train leaves it on such a CPU
    rows = vectors[:5000].copy()
    rows[4100] = 0
    rows[4100, 4] = bad  # past the first product's rows: named by its row in the batch
    with pytest.raises(ValueError, match="vectors: row 4100 holds NaN"):
        index.fill(np.arange(5000, dtype=np.int64), rows)
    index.finish_fill()
    assert len(index) == 0  # nothing of the batch was added


def test_a_fast_scan_fill_after_an_add_refuses_what_a_fill_refuses(vectors):
    index = FastScanIVFIndex(512, NLIST)
    index.train(vectors[: training_size(index.kind, 512)])
    index.add(np.arange(10, dtype=np.int64), vectors[:10])
    rows = vectors[10:13].copy()
    rows[1, 4] = np.nan
    with pytest.raises(ValueError, match="vectors: row 1 holds NaN"):
        index.fill(np.arange(10, 13, dtype=np.int64), rows)
    assert len(index) == 10


def test_a_fast_scan_fill_waits_for_a_search_in_progress(vectors):
    index = trained_with_int8(FastScanIVFIndex, vectors)
    fill = threading.Thread(target=index.fill, args=(np.arange(100, dtype=np.int64),
                                                     vectors[:100]))
    with index._lock.reading():  # as a search holds it
        fill.start()
        deadline = time.monotonic() + 30
        while index._lock._writers_waiting == 0 and fill.is_alive():
            assert time.monotonic() < deadline, "the fill neither waited nor ended"
            time.sleep(0.001)
        assert index._filling is None and len(index) == 0, "the fill changed the index"
    fill.join(30)
    assert not fill.is_alive() and len(index) == 100


class FinishingFirst:
    """An assignment whose list choice lets a search finish the pending fill first, as one
    may between a fill's checks and its write lock."""

    def __init__(self, index: FastScanIVFIndex, assignment: Int8Assignment) -> None:
        self.index, self.assignment = index, assignment

    def lists_of(self, vectors: np.ndarray) -> np.ndarray:
        self.index.search(vectors[:1], 1, SearchOptions(nprobe=1))  # finishes the fill
        return self.assignment.lists_of(vectors)


def test_a_fill_that_finds_the_fill_finished_meanwhile_adds_to_the_index(vectors):
    # the batch must join the vectors the index holds, not start a new fill that would
    # replace them at the next finish_fill
    index = trained_with_int8(FastScanIVFIndex, vectors)
    index.fill(np.arange(100, dtype=np.int64), vectors[:100])
    index._fill_assignment = FinishingFirst(index, index._fill_assignment)
    index.fill(np.arange(100, 200, dtype=np.int64), vectors[100:200])
    index.finish_fill()
    assert len(index) == 200
    found = index.search(vectors[[5, 150]], 1, SearchOptions(nprobe=4))
    assert [ids.tolist() for ids, _ in found] == [[5], [150]]


def test_the_rescores_a_row_that_pay_scale_with_the_lists():
    assert paying_rescores(4096) == 16.0  # measured there
    assert paying_rescores(16_384) == 64.0
    assert paying_rescores(64) == float("inf")  # both cheap, unmeasured: int8 kept


def measured_at_64_lists(monkeypatch) -> None:
    """The limit as at 4,096 lists, scaled to 64 (0.25 a row)."""
    monkeypatch.setattr(list_assignment, "_FEWEST_LISTS_MEASURED", 1)


def test_rescored_a_row_counts_the_centroids_integer_scores_leave_close(trained, vectors):
    assignment = exact_int8(centroids_of(trained))
    own = assignment.rescored_a_row(vectors[:2048])  # the gallery the centroids were made on
    other = assignment.rescored_a_row(FaceGenerator(11).persons(2048))  # another one
    assert 1 < own < 8 < other
    assert assignment.rescored_a_row(vectors[:0]) == 0.0


@pytest.mark.parametrize("kind", PARTITIONED, ids=lambda kind: kind.__name__)
def test_a_build_takes_the_float_product_where_the_int8_choice_does_not_pay(vectors, kind,
                                                                            monkeypatch):
    measured_at_64_lists(monkeypatch)
    ids = np.arange(SIZE, dtype=np.int64)
    filled, added = kind(512, NLIST), kind(512, NLIST)
    for index in (filled, added):
        index.train(vectors[: training_size(index.kind, 512)])
    if filled._fill_assignment is None:
        pytest.skip("onnxruntime's int8 products are not exact on this CPU")
    for batch in np.array_split(np.arange(SIZE), 3):
        filled.fill(ids[batch], vectors[batch])
        # the first batch leaves ~4 centroids a row close: more than 64 lists pay for
        assert filled._fill_assignment is None
    filled.finish_fill()
    added.add(ids, vectors)
    assert snapshot_bytes(filled) == snapshot_bytes(added)


def test_the_first_batch_decides_for_the_whole_build(vectors, monkeypatch):
    measured_at_64_lists(monkeypatch)
    monkeypatch.setattr(list_assignment, "_PAYING_RESCORES_AT_4096", 2_000.0)  # 31 at 64
    index = trained_with_int8(SignIVFIndex, vectors)
    index.fill(np.arange(1000, dtype=np.int64), vectors[:1000])  # ~4 a row: int8 pays
    assert index._fill_assignment is not None
    other = FaceGenerator(11).persons(1000)  # ~45 a row: a first batch of these would not
    assert index._fill_assignment.rescored_a_row(other) > 31
    index.fill(np.arange(1000, 2000, dtype=np.int64), other)
    assert index._fill_assignment is not None and len(index) == 2000
    another = SignIVFIndex(512, NLIST)  # another build, whose first batch is those rows
    another.train(vectors[: training_size(another.kind, 512)])
    another.fill(np.arange(1000, dtype=np.int64), other)
    assert another._fill_assignment is None and len(another) == 1000


@pytest.mark.parametrize("gallery", ["uneven", "isotropic"])
def test_a_search_scans_the_lists_nearest_in_integer_scores(trained, vectors, gallery):
    rows = (vectors if gallery == "uneven" else FaceGenerator(11).persons(SIZE))[:2000]
    centroids = centroids_of(trained)
    nprobe = 8
    chosen = exact_int8(centroids).probed_lists(rows, nprobe)
    assert chosen.shape == (len(rows), nprobe) and chosen.dtype == np.int64
    assert all(len(set(row)) == nprobe for row in chosen.tolist())
    scores = rows.astype(np.float64) @ centroids.astype(np.float64).T
    by_float = np.argsort(-scores, axis=1)[:, :nprobe]
    shared = [len(set(a) & set(b)) / nprobe
              for a, b in zip(chosen.tolist(), by_float.tolist(), strict=True)]
    # Not checked in float: the lists near the nprobe-th may differ, the nearest may not.
    assert np.mean(shared) >= 0.95
    assert np.mean([best in row for best, row in zip(by_float[:, 0], chosen, strict=True)]) \
        >= 0.999


class FarthestLists:
    """A stand-in search choice taking the lists farthest from each query: a search that
    scans only them scans what it was handed."""

    def __init__(self, centroids: np.ndarray) -> None:
        self.centroids = centroids

    def probed_lists(self, queries: np.ndarray, nprobe: int) -> np.ndarray:
        return np.argsort(queries @ self.centroids.T, axis=1)[:, :nprobe].astype(np.int64)


def in_lists(found, lists: np.ndarray, home: np.ndarray) -> bool:
    """Every id a search found is in one of the lists it was to scan."""
    return all(set(home[ids[ids >= 0]].tolist()) <= set(probed.tolist())
               for (ids, _), probed in zip(found, lists, strict=True))


@pytest.mark.parametrize("kind", PARTITIONED, ids=lambda kind: kind.__name__)
def test_a_search_scans_the_int8_choice_of_lists_nearest_first(vectors, kind):
    index = trained_with_int8(kind, vectors)
    assert index._search_choice is not None  # made by train, not on a check's time
    index.add(np.arange(SIZE, dtype=np.int64), vectors)
    home = index._lists_of(vectors, 1)[:, 0]  # each vector's list (add's exact choice)
    queries = normalize_rows(vectors[:200] + 0.5 * uneven(200, 5))
    lists = index._probed_lists(queries, 4)
    assert in_lists(index.search(queries, 10, SearchOptions(nprobe=4)), lists, home)
    chosen = index._search_choice
    index._search_choice = FarthestLists(centroids_of(index))  # lists no float choice takes
    farthest = index._probed_lists(queries, 4)
    assert not any(set(mine) & set(nearest) for mine, nearest in zip(
        farthest.tolist(), index._lists_of(queries, 4).tolist(), strict=True))
    assert in_lists(index.search(queries, 10, SearchOptions(nprobe=4)), farthest, home)
    index._search_choice = chosen
    centroids = centroids_of(index)
    scores = np.take_along_axis(queries @ centroids.T, index._probed_lists(queries, NLIST), 1)
    # nearest first, as FAISS's float choice orders them (int8 rounding swaps near-ties)
    position_against_rank = [np.corrcoef(np.arange(NLIST), np.argsort(np.argsort(-row)))[0, 1]
                             for row in scores]
    assert np.min(position_against_rank) >= 0.99
    every = index.search(queries, 10, SearchOptions(nprobe=NLIST))
    assert all(len(ids[ids >= 0]) == 10 for ids, _ in every)


@pytest.mark.parametrize("kind", PARTITIONED, ids=lambda kind: kind.__name__)
def test_a_loaded_checkpoint_has_its_search_choice_before_the_first_search(vectors, kind,
                                                                          tmp_path):
    index = trained_with_int8(kind, vectors)
    index.add(np.arange(2000, dtype=np.int64), vectors[:2000])
    write_checkpoint(tmp_path / "index.ckpt", index.snapshot(1, "model"))
    loaded, _ = load_index(tmp_path / "index.ckpt", 512, "model")
    assert loaded._search_choice_made and loaded._search_choice is not None


@pytest.mark.parametrize("kind", PARTITIONED, ids=lambda kind: kind.__name__)
@pytest.mark.parametrize("cpu", ["inexact int8 products", "no onnxruntime session"])
def test_without_the_int8_choice_a_search_scans_the_float_choice(vectors, kind, cpu,
                                                                 monkeypatch, caplog):
    if cpu == "inexact int8 products":
        monkeypatch.setattr(list_assignment, "_products_exact", lambda session, codes: False)
    else:
        def no_session_for_searches(centroids, threads=1, fallback=""):
            if "search" in fallback:  # the fill's assignment is made as ever
                raise RuntimeError("onnxruntime could not make the session")
            return int8_assignment(centroids, threads, fallback)
        monkeypatch.setattr(index_module, "int8_assignment", no_session_for_searches)
    index = kind(512, NLIST)
    index.train(vectors[: training_size(index.kind, 512)])
    assert index._search_choice_made and index._search_choice is None
    assert "a search chooses its lists by the float product" in caplog.text
    index.add(np.arange(SIZE, dtype=np.int64), vectors)
    home = index._lists_of(vectors, 1)[:, 0]
    queries = normalize_rows(vectors[:200] + 0.5 * uneven(200, 5))
    lists = index._lists_of(queries, 4)
    assert np.array_equal(index._probed_lists(queries, 4), lists)
    assert in_lists(index.search(queries, 10, SearchOptions(nprobe=4)), lists, home)
