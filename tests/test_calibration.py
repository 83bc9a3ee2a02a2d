"""SignIVF's nprobe, measured at its build on the gallery's own duplicates (calibration.py):
on a gallery with structure it searches few lists and still finds fresh captures' matches;
on one without, more lists; with too few pairs to tell, every list. On a real LMDB store,
built by the rebuild's own code path, and kept by the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from dedup import FaceGenerator, StoreConfig
from dedup.core.records import Registration
from dedup.core.vectors import Matrix, normalize_rows
from dedup.gallery.embedded.calibration import MIN_PAIRS, TARGET, nprobes_to_try
from dedup.gallery.embedded.checkpoint import write_checkpoint
from dedup.gallery.embedded.index import SearchOptions, SignIVFIndex, load_index
from dedup.gallery.embedded.index_plan import kind_for, lists_for
from dedup.gallery.embedded.rebuild import build_in_process
from dedup.gallery.embedded.store import Store

MODEL = "m"
NLIST = 64
PERSONS = 3000
GROUPS = 12


def grouped(generator: FaceGenerator, count: int) -> Matrix:
    """Persons gathered around a few centres (each scores about 0.3 with its group's
    others), as real populations gather by age, sex and ancestry."""
    centres = generator.persons(GROUPS)
    members = centres[generator.rng.integers(0, GROUPS, count)]
    return normalize_rows(members + 1.5 * generator.persons(count))


def store_with(tmp_path, persons: Matrix, generator: FaceGenerator, repeated: int) -> Store:
    """Each person once under their own ID number; the first `repeated` of them twice."""
    store = Store(StoreConfig(data_dir=tmp_path / "data"))
    rows = [(Registration(f"r{i}", f"ID{i}", embedding_model=MODEL), capture)
            for i, capture in enumerate(generator.captures(persons))]
    rows += [(Registration(f"again{i}", f"ID{i}", embedding_model=MODEL), capture)
             for i, capture in enumerate(generator.captures(persons[:repeated]))]
    rows += [(Registration(f"other-model{i}", f"ID{i}", embedding_model="older"), capture)
             for i, capture in enumerate(generator.captures(persons[:50]))]
    store.insert_many(rows)
    return store


def built(store: Store) -> SignIVFIndex:
    index = build_in_process(store, f"SignIVF{NLIST}", MODEL, MODEL, lambda *_: None).index
    assert isinstance(index, SignIVFIndex)
    return index


def share_of_fresh_captures_found(index: SignIVFIndex, persons: Matrix,
                                  generator: FaceGenerator) -> float:
    """Fresh captures of enrolled persons: how often `r<i>` is among the 64 candidates."""
    probes = generator.captures(persons[:1000])
    results = index.search(probes, 64, SearchOptions())  # nprobe 0: the calibrated one
    keys = {i: key for i, key in enumerate(range(1, len(persons) + 1))}  # r<i> has key i+1
    return float(np.mean([keys[i] in ids for i, (ids, _) in enumerate(results)]))


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    generator = FaceGenerator(21)
    persons = grouped(generator, PERSONS)
    store = store_with(tmp_path_factory.mktemp("structured"), persons, generator, PERSONS)
    try:
        yield built(store), persons, generator
    finally:
        store.close()


def test_on_a_structured_gallery_few_lists_are_searched_and_captures_still_found(
        structured):
    index, persons, generator = structured
    calibration = index.calibration
    assert calibration.pairs >= MIN_PAIRS
    assert calibration.nprobe < NLIST // 2  # the measured nprobe, not every list
    assert calibration.recall[calibration.nprobe] >= TARGET
    assert all(share < TARGET for nprobe, share in calibration.recall.items()
               if nprobe < calibration.nprobe)  # the smallest that reached it
    assert share_of_fresh_captures_found(index, persons, generator) >= 0.99


def test_on_an_isotropic_gallery_more_lists_are_searched(tmp_path, structured):
    generator = FaceGenerator(22)
    persons = generator.persons(PERSONS)
    store = store_with(tmp_path, persons, generator, PERSONS)
    try:
        index = built(store)
    finally:
        store.close()
    assert index.calibration.nprobe > structured[0].calibration.nprobe
    assert index.calibration.recall[index.calibration.nprobe] >= TARGET
    assert share_of_fresh_captures_found(index, persons, generator) >= 0.99


def test_too_few_pairs_to_tell_searches_every_list(tmp_path):
    generator = FaceGenerator(23)
    persons = grouped(generator, PERSONS)
    store = store_with(tmp_path, persons, generator, MIN_PAIRS // 2)
    try:
        index = built(store)
    finally:
        store.close()
    assert index.calibration.nprobe == NLIST and index.calibration.recall == {}
    assert 0 < index.calibration.pairs < MIN_PAIRS
    assert "every list" in index.calibration.describe()


def test_the_checkpoint_keeps_the_calibration(tmp_path, structured):
    index = structured[0]
    path = tmp_path / "index.ckpt"
    write_checkpoint(path, index.snapshot(sequence=3, model_id=MODEL))
    loaded, _ = load_index(path, 512, MODEL)
    assert isinstance(loaded, SignIVFIndex) and loaded.calibration == index.calibration
    queries = FaceGenerator(24).persons(30)
    assert [ids.tolist() for ids, _ in loaded.search(queries, 10, SearchOptions())] == \
        [ids.tolist() for ids, _ in index.search(queries, 10, SearchOptions())]


def test_a_configured_nprobe_overrides_the_calibrated_one(structured):
    index = structured[0]
    assert index.nprobe_for(SearchOptions()) == index.calibration.nprobe
    assert index.nprobe_for(SearchOptions(nprobe=7)) == 7
    assert index.nprobe_for(SearchOptions(nprobe=10**6)) == NLIST


def test_auto_serves_sign_lists_from_its_threshold_with_enough_per_list():
    assert nprobes_to_try(4096) == [64, 128, 256, 512, 1024, 2048, 4096]
    assert nprobes_to_try(16) == [1, 2, 4, 8, 16]
    assert [kind_for("auto", n, 200_000, 1_000_000) for n in (199_999, 200_000, 999_999)] \
        == ["Flat", "BinarySign512", "BinarySign512"]
    assert kind_for("auto", 1_000_000, 200_000, 1_000_000) == "SignIVF4096"
    assert kind_for("auto", 10**9, 200_000, 1_000_000) == "SignIVF4096"
    assert kind_for("Flat", 10**9, 200_000, 1_000_000) == "Flat"
    assert [lists_for(n) for n in (0, 127, 128, 1300, 262_143, 262_144)] == \
        [1, 1, 2, 16, 2048, 4096]
