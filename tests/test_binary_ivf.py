"""The index types of codes in inverted lists on real FAISS (BinaryIVF: sign codes, binary
k-means; SignIVF: sign codes, a float k-means partition; FastScanIVF: 4-bit PQ codes in that
partition): training, per-call nprobe from concurrent threads, deletions (an erased code in no
checkpoint), and checkpoints that round-trip or are refused when damaged or mismatched."""

from __future__ import annotations

import threading
import tracemalloc

import faiss
import numpy as np
import pytest

from dedup import FaceGenerator
from dedup.core.errors import CheckpointError, FailedPrecondition, InvalidArgument
from dedup.gallery.embedded.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from dedup.gallery.embedded.index import (
    BinaryIVFIndex,
    FastScanIVFIndex,
    SearchOptions,
    SignIVFIndex,
    load_index,
    new_index,
    training_size,
    validate_kind,
)

NLIST = 16
SIZE = 2000
CLASSES = {"BinaryIVF": BinaryIVFIndex, "SignIVF": SignIVFIndex,
           "FastScanIVF": FastScanIVFIndex}
SIGN_CODED = ("BinaryIVF", "SignIVF")


@pytest.fixture(params=sorted(CLASSES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return FaceGenerator(5).persons(SIZE)


@pytest.fixture
def index(vectors, family) -> BinaryIVFIndex | SignIVFIndex | FastScanIVFIndex:
    built = new_index(f"{family}{NLIST}", 512)
    assert isinstance(built, CLASSES[family])
    built.train(vectors[: training_size(built.kind, 512)])
    built.add(np.arange(SIZE, dtype=np.int64) * 10 + 3, vectors)  # ids are not positions
    return built


def ids_of(index, queries, k=5, nprobe=NLIST) -> list[list[int]]:
    return [ids.tolist() for ids, _ in index.search(queries, k, SearchOptions(nprobe=nprobe))]


def test_names_and_training_size(family):
    assert validate_kind(f"{family}4096") == f"{family}4096"
    assert training_size(f"{family}4096", 512) == 39 * 4096
    for bad in ("", "0", "-4", "12x"):
        with pytest.raises(InvalidArgument, match="not a supported index type"):
            validate_kind(family + bad)
    with pytest.raises(InvalidArgument, match="at most 1,048,576 lists"):
        validate_kind(f"{family}2000000")


def test_training_needs_enough_vectors(vectors, family):
    index = new_index(f"{family}64", 512)
    assert isinstance(index, CLASSES[family])
    with pytest.raises(FailedPrecondition, match="needs at least 2,496 training vectors"):
        index.train(vectors[:100])


def test_every_list_searched_finds_each_vector_first_with_its_own_id(index, vectors):
    assert len(index) == SIZE and not index.exact
    found = ids_of(index, vectors[:200], k=1)
    assert found == [[i * 10 + 3] for i in range(200)]


def test_every_list_searched_ranks_as_the_flat_scan_of_the_same_codes(vectors):
    index = new_index(f"SignIVF{NLIST}", 512)
    assert isinstance(index, SignIVFIndex)
    index.train(vectors[: training_size(index.kind, 512)])
    index.add(np.arange(SIZE, dtype=np.int64) * 10 + 3, vectors)
    flat = new_index("BinarySign512", 512)
    flat.add(np.arange(SIZE, dtype=np.int64) * 10 + 3, vectors)
    queries = FaceGenerator(7).persons(40)
    every_list = SearchOptions(nprobe=NLIST)
    for (_, got), (_, expected) in zip(index.search(queries, 10, every_list),
                                       flat.search(queries, 10, every_list), strict=True):
        assert got.tolist() == expected.tolist()  # the same Hamming distances, best first


def test_nprobe_is_per_call_and_concurrent_searches_keep_their_own(index, vectors):
    queries = FaceGenerator(6).persons(64)
    narrow, wide = ids_of(index, queries, 20, nprobe=1), ids_of(index, queries, 20)
    assert narrow != wide  # one list holds about 1/16 of the gallery
    results: dict[tuple[int, int], list[list[int]]] = {}
    errors: list[BaseException] = []

    def search(worker: int, nprobe: int) -> None:
        try:
            for round_ in range(20):
                results[(worker, round_)] = ids_of(index, queries, 20, nprobe)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=search, args=(w, 1 if w % 2 else NLIST))
               for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for (worker, _), got in results.items():
        assert got == (narrow if worker % 2 else wide)


def test_removed_ids_are_never_returned(index, vectors):
    gone = np.array([3, 13, 23, 99999], np.int64)  # the last was never added
    assert index.remove(gone) == 3
    assert len(index) == SIZE - 3
    found = ids_of(index, vectors[:10], k=3)
    assert all(not set(row) & {3, 13, 23} for row in found)
    assert found[3][0] == 33
    assert index.remove(np.array([3], np.int64)) == 0


def test_checkpoint_round_trip_keeps_lists_ids_and_deletions(tmp_path, index, vectors,
                                                            family):
    index.remove(np.array([43], np.int64))
    path = tmp_path / "index.ckpt"
    write_checkpoint(path, index.snapshot(sequence=7, model_id="m"))
    loaded, sequence = load_index(path, 512, "m")
    assert sequence == 7 and isinstance(loaded, CLASSES[family])
    assert loaded.kind == f"{family}{NLIST}" and len(loaded) == SIZE - 1
    queries = FaceGenerator(8).persons(50)
    for nprobe in (1, 4, NLIST):
        assert ids_of(loaded, queries, 10, nprobe) == ids_of(index, queries, 10, nprobe)
    loaded.add(np.array([7], np.int64), queries[:1])  # the loaded one takes changes too
    assert ids_of(loaded, queries[:1], 1, NLIST) == [[7]]
    assert read_checkpoint(path).kind == f"{family}{NLIST}"


def rewritten(path, **changes) -> None:
    """The checkpoint at `path` written again (valid checksum) with some fields changed."""
    old = read_checkpoint(path)
    fields = {"sequence": old.sequence, "vectors": old.vectors, "model_id": old.model_id,
              "parts": old.parts, "kind": old.kind, **changes}
    write_checkpoint(path, Checkpoint(**fields))


def refusals(family: str) -> dict[str, str]:
    """What load_index says of a payload that is not of the labelled type."""
    if family == "FastScanIVF":
        return {"damaged": f"holds no FastScanIVF{NLIST} index FAISS can read",
                "other lists": "holds no FastScanIVF32 index FAISS can read",
                "read as BinarySign512": "FAISS cannot read the index",
                "flat sign codes": f"holds no FastScanIVF{NLIST} index"}
    if family == "SignIVF":
        return {"damaged": f"holds no SignIVF{NLIST} index FAISS can read",
                "other lists": "holds no SignIVF32 index FAISS can read",
                "read as BinarySign512": "FAISS cannot read the index",
                "flat sign codes": f"holds no SignIVF{NLIST} index"}
    return {"damaged": "FAISS cannot read the index",
            "other lists": "not a BinaryIVF32 index",
            "read as BinarySign512": "not a BinarySign512 index",
            "flat sign codes": f"not a BinaryIVF{NLIST} index"}


def test_damaged_and_mismatched_checkpoints_are_refused(tmp_path, index, family):
    path = tmp_path / "index.ckpt"
    write_checkpoint(path, index.snapshot(sequence=1, model_id="m"))
    good = path.read_bytes()
    refused = refusals(family)

    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_index(path, 512, "m")

    cases = [
        ({"parts": (memoryview(good)[200:len(good) // 2],)}, refused["damaged"]),
        ({"kind": f"{family}32"}, refused["other lists"]),
        ({"kind": "BinarySign512"}, refused["read as BinarySign512"]),
        ({"kind": "Flat"}, "FAISS cannot read the index"),
        ({"vectors": SIZE + 1}, f"holds {SIZE} vectors, its header says {SIZE + 1}"),
        ({"model_id": "other"}, "model 'other'"),
    ]
    for changes, message in cases:
        path.write_bytes(good)
        rewritten(path, **changes)
        with pytest.raises(CheckpointError, match=message):
            load_index(path, 512, "m")

    flat_sign = new_index("BinarySign512", 512)
    flat_sign.add(np.arange(3, dtype=np.int64), FaceGenerator(9).persons(3))
    write_checkpoint(path, flat_sign.snapshot(sequence=1, model_id="m"))
    rewritten(path, kind=f"{family}{NLIST}")
    with pytest.raises(CheckpointError, match=refused["flat sign codes"]):
        load_index(path, 512, "m")


def test_a_snapshot_holds_one_copy_of_the_codes(index):
    """A checkpoint's snapshot is taken with writes held: joining its parts into one buffer
    copied every code again (2 s of the 3.1 s writes were held at 10,000,000)."""
    tracemalloc.start()
    try:
        snapshot = index.snapshot(1, "m")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    payload = np.frombuffer(snapshot.payload, np.uint8)
    assert peak < 1.5 * payload.nbytes
    if isinstance(index, SignIVFIndex | FastScanIVFIndex):
        assert len(type(index).deserialize(payload, 512, NLIST)) == len(index)


def test_fast_scan_finds_a_fresh_capture_of_each_person_first(vectors):
    """FastScanIVF's PQ scores are rough (re-ranked before any verdict) but rank a capture's
    person above everyone else: every list searched, its top 5 hold it."""
    index = new_index(f"FastScanIVF{NLIST}", 512)
    index.train(vectors[: training_size(index.kind, 512)])
    index.add(np.arange(SIZE, dtype=np.int64), vectors)
    captures = FaceGenerator(11).captures(vectors[:200])
    found = ids_of(index, captures, k=5)
    assert sum(i in row for i, row in enumerate(found)) >= 198


def test_fast_scan_leaves_no_code_of_an_erased_vector_in_its_checkpoint(vectors):
    """FAISS shortens a list on removal and keeps its blocks: a vector erased when it was
    the last of its list stayed in the checkpoint. Adding one and erasing it must give the
    checkpoint of the index that never held it."""
    index = new_index(f"FastScanIVF{NLIST}", 512)
    index.train(vectors[: training_size(index.kind, 512)])
    index.add(np.arange(SIZE - 1, dtype=np.int64), vectors[:-1])
    never_held = index.snapshot(sequence=1, model_id="m").payload
    index.add(np.array([SIZE - 1], np.int64), vectors[-1:])
    assert ids_of(index, vectors[-1:], k=1) == [[SIZE - 1]]
    assert index.remove(np.array([SIZE - 1], np.int64)) == 1
    assert index.snapshot(sequence=1, model_id="m").payload == never_held


def test_fast_scan_needs_a_dimension_of_whole_sub_vectors():
    assert validate_kind("FastScanIVF64", dimension=128) == "FastScanIVF64"
    with pytest.raises(InvalidArgument, match="divisible by 8, not 100"):
        validate_kind("FastScanIVF64", dimension=100)


def stale_codes(index: FastScanIVFIndex) -> list[tuple[int, int]]:
    """(list, slot) of every non-zero code past a list's end in the blocks FAISS keeps (and
    writes to a checkpoint)."""
    lists = faiss.downcast_InvertedLists(index._index.invlists)
    packer, stale = lists.packer, []
    for list_no in range(index.nlist):
        size = lists.list_size(list_no)
        blocks = -(-size // packer.nvec)
        if blocks == 0:
            continue
        codes = faiss.rev_swig_ptr(lists.get_codes(list_no), blocks * packer.block_size)
        codes = codes.reshape(blocks, packer.block_size)
        stale += [(list_no, slot) for slot in range(size, blocks * packer.nvec)
                  if packer.unpack_1(codes, slot).any()]
    return stale


def list_ids(index: FastScanIVFIndex, list_no: int) -> list[int]:
    lists = index._index.invlists
    return faiss.rev_swig_ptr(lists.get_ids(list_no), lists.list_size(list_no)).tolist()


def test_fast_scan_removals_that_drop_blocks_or_empty_lists_leave_no_code_behind(
        tmp_path, vectors):
    """The zeroing of freed slots wrote past a list's buffer once FAISS had moved a list
    that lost blocks to a smaller one (glibc aborted the process), and an emptied list (no
    buffer) failed the removal half-way, its erased codes and later lists' left in the
    checkpoint. One removal here shrinks one list to a block, empties another, and takes
    one code from every other list."""
    index = new_index(f"FastScanIVF{NLIST}", 512)
    index.train(vectors[: training_size(index.kind, 512)])
    index.add(np.arange(SIZE, dtype=np.int64), vectors)
    by_list = {list_no: list_ids(index, list_no) for list_no in range(NLIST)}
    shrunk, emptied = sorted(by_list, key=lambda list_no: -len(by_list[list_no]))[:2]
    assert len(by_list[shrunk]) > 64 and by_list[emptied]
    gone = (by_list[shrunk][32:] + by_list[emptied]
            + [ids[0] for list_no, ids in by_list.items() if list_no not in (shrunk, emptied)])
    assert index.remove(np.array(gone, np.int64)) == len(gone)
    assert stale_codes(index) == []
    assert len(list_ids(index, shrunk)) == 32 and list_ids(index, emptied) == []
    path = tmp_path / "index.ckpt"
    write_checkpoint(path, index.snapshot(sequence=1, model_id="m"))
    loaded, _ = load_index(path, 512, "m")
    assert isinstance(loaded, FastScanIVFIndex) and stale_codes(loaded) == []
    found = {i for row in ids_of(loaded, vectors[:300], k=5) for i in row}
    assert not found & set(gone)


@pytest.mark.parametrize("damage", ["implem", "direct map"])
def test_fast_scan_checkpoints_faiss_reads_but_no_search_or_removal_could_use_are_refused(
        tmp_path, vectors, damage):
    """FAISS loaded them: with another implem every search failed, with a direct map every
    removal (an erasure) did."""
    index = new_index(f"FastScanIVF{NLIST}", 512)
    index.train(vectors[: training_size(index.kind, 512)])
    index.add(np.arange(SIZE, dtype=np.int64), vectors)
    if damage == "implem":
        index._index.implem = 1
    else:
        index._index.set_direct_map_type(faiss.DirectMap.Hashtable)
    path = tmp_path / "index.ckpt"
    write_checkpoint(path, index.snapshot(sequence=1, model_id="m"))
    with pytest.raises(CheckpointError, match=f"holds no FastScanIVF{NLIST} index"):
        load_index(path, 512, "m")


@pytest.mark.parametrize("kind", ["BinarySign512\n", "BinaryIVF64\n", "SignIVF64\n",
                                  "FastScanIVF64\n", "IVF16,Flat\n"])
def test_a_kind_with_a_trailing_newline_is_refused(kind):
    """'$' matched before a final newline: the kind was accepted, never equal to the
    index's own name (a rebuild every time the switch looked)."""
    with pytest.raises(InvalidArgument, match="not a supported index type"):
        validate_kind(kind)
