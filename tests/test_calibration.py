"""SignIVF's nprobe, measured at its build on the gallery's own duplicates (calibration.py):
on a gallery with structure it searches few lists and still finds fresh captures' matches;
on one without, more lists; with too few pairs to tell, every list. On a real LMDB store,
built by the rebuild's own code path, and kept by the checkpoint."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from conftest import RunningServer, face

from dedup import FaceGenerator, ServerConfig, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.cli.main import build_parser
from dedup.cli.serve import server_config
from dedup.core.records import Registration
from dedup.core.settings import IndexConfig
from dedup.core.vectors import Matrix, normalize_rows
from dedup.face.model_pack import default_pack_dir, model_id_for
from dedup.gallery.embedded.calibration import (
    MAX_PAIRS,
    MIN_PAIRS,
    TARGET,
    narrowed,
    nprobes_to_try,
)
from dedup.gallery.embedded.checkpoint import write_checkpoint
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.index import (
    Calibration,
    SearchOptions,
    SignIVFIndex,
    load_index,
    search_parameters,
)
from dedup.gallery.embedded.index_plan import IndexPlan, kind_for, lists_for
from dedup.gallery.embedded.rebuild import build_in_process
from dedup.gallery.embedded.store import Store

MODEL = "m"
NLIST = 64
PERSONS = 3000
GROUPS = 12
OLDER = 2000  # persons with an older model's embedding too


def grouped(generator: FaceGenerator, count: int) -> Matrix:
    """Persons gathered around a few centres (each scores about 0.3 with its group's
    others), as real populations gather by age, sex and ancestry."""
    centres = generator.persons(GROUPS)
    members = centres[generator.rng.integers(0, GROUPS, count)]
    return normalize_rows(members + 1.5 * generator.persons(count))


def store_with(tmp_path, persons: Matrix, generator: FaceGenerator, repeated: int) -> Store:
    """Each person once under their own ID number; the first `repeated` of them twice."""
    store = Store(StoreConfig(data_dir=tmp_path / "data"))
    # An older model's embeddings first: the oldest pair of an ID number may not be
    # comparable, and the calibration must look past it.
    rows = [(Registration(f"older{i}", f"ID{i}", embedding_model="older"), capture)
            for i, capture in enumerate(generator.captures(persons[:OLDER]))]
    rows += [(Registration(f"r{i}", f"ID{i}", embedding_model=MODEL), capture)
             for i, capture in enumerate(generator.captures(persons))]
    rows += [(Registration(f"again{i}", f"ID{i}", embedding_model=MODEL), capture)
             for i, capture in enumerate(generator.captures(persons[:repeated]))]
    store.insert_many(rows)
    return store


def built(store: Store, pair_score: float = 0.30) -> SignIVFIndex:
    index = build_in_process(store, f"SignIVF{NLIST}", MODEL, MODEL, lambda *_: None,
                             pair_score).index
    assert isinstance(index, SignIVFIndex)
    return index


def share_of_fresh_captures_found(index: SignIVFIndex, persons: Matrix,
                                  generator: FaceGenerator) -> float:
    """Fresh captures of enrolled persons: how often `r<i>` is among the 64 candidates."""
    probes = generator.captures(persons[:1000])
    results = index.search(probes, 64, SearchOptions())  # nprobe 0: the calibrated one
    key_of_r = {i: OLDER + 1 + i for i in range(len(persons))}  # keys count from 1
    return float(np.mean([key_of_r[i] in ids for i, (ids, _) in enumerate(results)]))


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
    assert calibration.pairs == MAX_PAIRS  # the older model's pairs looked past
    assert calibration.nprobe < NLIST // 2  # the measured nprobe, not every list
    assert calibration.recall[calibration.nprobe] >= TARGET
    assert all(share < TARGET for nprobe, share in calibration.recall.items()
               if nprobe < calibration.nprobe)  # the smallest that reached it
    assert share_of_fresh_captures_found(index, persons, generator) >= 0.99


def test_the_nprobe_kept_is_within_a_quarter_doubling_of_the_last_that_failed(structured):
    """Not the next power of two: a search costs in proportion to its nprobe, and at
    10,000,000 the doubling from 256 to 512 lists was 0.996 -> 0.9985 of the pairs."""
    calibration = structured[0].calibration
    failed = [nprobe for nprobe in calibration.recall if nprobe < calibration.nprobe]
    assert failed, "the first nprobe tried reached the target: nothing to narrow here"
    assert calibration.nprobe <= round(max(failed) * 2 ** 0.25) + 1
    assert any(nprobe & (nprobe - 1) for nprobe in calibration.recall)  # not a power of two


@pytest.mark.parametrize(("smallest_reaching", "kept", "tried"), [
    (300, 304, [362, 304]), (400, 431, [362, 431]), (512, 512, [362, 431]),
    (257, 304, [362, 304])])
def test_narrowing_halves_the_last_doubling_twice(smallest_reaching, kept, tried):
    asked: list[int] = []

    def reached(nprobe: int) -> bool:
        asked.append(nprobe)
        return nprobe >= smallest_reaching

    assert narrowed(reached, 256, 512) == kept and asked == tried


def test_a_first_nprobe_that_reaches_the_target_is_kept_without_more_searches():
    asked: list[int] = []

    def reached(nprobe: int) -> bool:
        asked.append(nprobe)
        return True

    assert narrowed(reached, 0, 64) == 64 and asked == []


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


def test_only_pairs_scoring_the_review_threshold_count(tmp_path):
    generator = FaceGenerator(25)
    persons = grouped(generator, PERSONS)
    store = store_with(tmp_path, persons, generator, PERSONS)
    try:
        index = built(store, pair_score=0.95)  # two captures score about 0.64
    finally:
        store.close()
    assert index.calibration.pairs == 0 and index.calibration.nprobe == NLIST


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


# The calibration of FastScanIVF4096 at 10,000,000 clustered registrations (its checkpoint).
MEASURED_10M = Calibration(nprobe=1448, pairs=2000, vectors=10_000_000, recall={
    64: 0.972, 128: 0.9795, 256: 0.988, 512: 0.995, 1024: 0.9965, 2048: 0.9995, 1448: 0.9985,
    1218: 0.9975})


@pytest.mark.parametrize(("target", "nprobe"), [
    (0.0, 1448), (TARGET, 1448), (0.995, 512), (0.99, 512), (0.9966, 1218), (0.5, 64),
    (0.9999, 4096), (1.0, 4096)])
def test_a_calibration_target_searches_the_fewest_lists_measured_holding_it(target, nprobe):
    assert MEASURED_10M.nprobe_reaching(target, 4096) == nprobe


def test_a_target_no_nprobe_measured_held_searches_every_list_and_says_so():
    assert MEASURED_10M.describe(4096, 0.9999) == (
        "every list: no nprobe measured held the 0.9999 target, at most 0.9995 of 2,000 "
        "same-person pairs at 2048")
    assert MEASURED_10M.describe(512, 0.995) == (
        "calibrated for a 0.995 target: 0.9950 of 2,000 same-person pairs found")


def test_a_gallery_searches_with_its_configured_calibration_target(tmp_path):
    """From the server's settings to its searches: the gallery's status names the fewer
    lists, and the checks search them."""
    generator = FaceGenerator(29)
    persons = grouped(generator, PERSONS)
    store_with(tmp_path, persons, generator, PERSONS).close()
    (tmp_path / "data").chmod(0o700)  # as a server makes it (a bare Store does not)
    statuses = {}
    for target in (0.0, 0.5):
        gallery = EmbeddedGallery(
            StoreConfig(data_dir=tmp_path / "data"), MODEL,
            IndexConfig(index_factory=f"SignIVF{NLIST}", calibration_target=target),
            background=False)
        try:
            statuses[target] = gallery.index_status().search_parameters
            assert gallery.search_options.calibration_target == target
        finally:
            gallery.close()
    default = int(re.match(r"nprobe=(\d+) \(calibrated: ", statuses[0.0])[1])
    lowered = int(re.match(r"nprobe=(\d+) \(calibrated for a 0.5 target: ", statuses[0.5])[1])
    assert lowered < default


def test_a_calibration_target_reaches_the_search_and_the_status(structured):
    index = structured[0]
    lowest = min(index.calibration.recall.items())  # the fewest lists the build tried
    options = SearchOptions(calibration_target=lowest[1])
    assert index.nprobe_for(options) == lowest[0] < index.nprobe_for(SearchOptions())
    assert index.nprobe_for(SearchOptions(nprobe=7, calibration_target=lowest[1])) == 7
    status = search_parameters(index, options)
    assert status.startswith(f"nprobe={lowest[0]} (calibrated for a {lowest[1]} target: ")
    assert search_parameters(index, SearchOptions()).startswith(
        f"nprobe={index.calibration.nprobe} (calibrated: ")
    # too few pairs measured: every list, whatever the target
    assert Calibration(nprobe=NLIST, pairs=5, recall={}).nprobe_reaching(0.5, NLIST) == NLIST


def test_serve_takes_a_calibration_target_and_refuses_one_out_of_range():
    parser = build_parser()
    assert server_config(parser.parse_args(["serve"])).index.calibration_target == 0.0
    config = server_config(parser.parse_args(["serve", "--calibration-target", "0.995"]))
    assert config.index.calibration_target == 0.995
    with pytest.raises(ValueError, match=r"calibration_target must be within 0\.\.1, got 1\.5"):
        server_config(parser.parse_args(["serve", "--calibration-target", "1.5"]))
    with pytest.raises(ValueError, match="set it or nprobe, not both"):
        server_config(parser.parse_args(["serve", "--calibration-target", "0.99",
                                         "--nprobe", "64"]))


def test_auto_serves_fast_scan_lists_from_its_threshold_with_enough_per_list():
    assert nprobes_to_try(4096) == [64, 128, 256, 512, 1024, 2048, 4096]
    assert nprobes_to_try(16) == [1, 2, 4, 8, 16]
    assert [kind_for("auto", n, 200_000, 1_000_000) for n in (199_999, 200_000, 999_999)] \
        == ["Flat", "BinarySign512", "BinarySign512"]
    assert kind_for("auto", 1_000_000, 200_000, 1_000_000) == "FastScanIVF4096"
    assert kind_for("auto", 10**9, 200_000, 1_000_000) == "FastScanIVF4096"
    assert kind_for("Flat", 10**9, 200_000, 1_000_000) == "Flat"
    assert [lists_for(n) for n in (0, 127, 128, 1300, 262_143, 262_144)] == \
        [1, 1, 2, 16, 2048, 4096]


def test_auto_goes_back_to_a_smaller_type_only_well_below_its_threshold():
    """A gallery hovering at a threshold (enrolments and erasures taking turns) keeps the
    larger type it serves until it is 10% below; growing switches at the threshold."""
    def wanted(count: int, serving: str | None) -> str:
        return kind_for("auto", count, 200_000, 1_000_000, serving)

    assert wanted(999_999, "FastScanIVF4096") == "FastScanIVF4096"
    assert wanted(900_000, "FastScanIVF4096") == "FastScanIVF4096"
    assert wanted(899_999, "FastScanIVF4096") == "BinarySign512"
    assert wanted(180_000, "FastScanIVF4096") == "BinarySign512"
    assert wanted(179_999, "FastScanIVF4096") == "Flat"
    assert wanted(180_000, "BinarySign512") == "BinarySign512"
    assert wanted(179_999, "BinarySign512") == "Flat"
    assert wanted(200_000, "Flat") == "BinarySign512"  # growing: at the threshold
    assert wanted(1_000_000, "BinarySign512") == "FastScanIVF4096"
    assert wanted(199_999, "HNSW32") == "Flat"  # a type auto never picks is not kept
    assert kind_for("Flat", 10, 200_000, 1_000_000, "FastScanIVF4096") == "Flat"
    # fewer lists only once the smaller gallery would not call for as many again
    assert kind_for("auto", 262_143, 100, 200, "FastScanIVF4096") == "FastScanIVF4096"
    assert kind_for("auto", 235_929, 100, 200, "FastScanIVF4096") == "FastScanIVF4096"
    assert kind_for("auto", 235_928, 100, 200, "FastScanIVF4096") == "FastScanIVF2048"
    assert kind_for("auto", 262_144, 100, 200, "FastScanIVF2048") == "FastScanIVF4096"


def test_a_gallery_auto_served_with_sign_lists_moves_to_fast_scan_lists():
    """Before FastScanIVF, auto chose SignIVF: such a gallery is rebuilt once, to
    FastScanIVF of as many lists, and keeps SignIVF where it would have kept it."""
    def wanted(count: int, serving: str | None) -> str:
        return kind_for("auto", count, 200_000, 1_000_000, serving)

    assert wanted(1_000_000, "SignIVF4096") == "FastScanIVF4096"
    assert wanted(10**8, "SignIVF4096") == "FastScanIVF4096"
    assert wanted(950_000, "SignIVF4096") == "SignIVF4096"  # no rebuild just to shrink
    assert wanted(899_999, "SignIVF4096") == "BinarySign512"
    assert kind_for("SignIVF4096", 10**8, 200_000, 1_000_000, "SignIVF4096") == "SignIVF4096"


def test_a_doubled_gallery_calls_for_new_lists_and_calibration(structured):
    index = structured[0]
    assert index.calibration.vectors == len(index)
    assert not index.outgrown(2 * len(index) - 1) and index.outgrown(2 * len(index))


def test_a_start_without_checkpoint_builds_quickly_and_leaves_lists_to_a_rebuild(
        tmp_path):
    store = Store(StoreConfig(data_dir=tmp_path / "data"))
    try:
        people = FaceGenerator(26).persons(300)
        store.insert_many([(Registration(f"r{i}", f"ID{i}", embedding_model=MODEL), person)
                           for i, person in enumerate(people)])

        def plan(kind: str, lists_threshold: int = 200) -> IndexPlan:
            return IndexPlan(store, MODEL, IndexConfig(index_factory=kind, auto_threshold=100,
                                                       auto_lists_threshold=lists_threshold))

        assert plan("auto").wanted_kind() == "FastScanIVF4"  # 300 // 64 -> 4 lists
        assert plan("auto").start_kind() == "BinarySign512"
        assert plan("auto", lists_threshold=1000).start_kind() == "BinarySign512"
        assert plan("SignIVF4").start_kind() == "SignIVF4"  # asked for by name
        assert plan("SignIVF64").start_kind() == "Flat"  # cannot be trained yet
    finally:
        store.close()


def outcome(answer: pb.CheckResponse) -> tuple:
    return (answer.verdict, answer.distinct_other_id_numbers,
            [m.registration.registration_id for m in answer.matches if m.score >= 0.40])


def test_a_server_on_calibrated_sign_lists_gives_the_exact_verdicts(tmp_path):
    """Through gRPC: a server asked for SignIVF64 on a grouped gallery builds and
    calibrates it at start (at its review threshold), says so in GetIndexInfo, and answers
    fresh captures as an exact server does, duplicates under other ID numbers included."""
    generator = FaceGenerator(27)
    persons = grouped(generator, PERSONS)
    model = model_id_for(default_pack_dir() / "w600k_mbf.onnx")
    store = Store(StoreConfig(data_dir=tmp_path / "data"))
    try:
        store.insert_many(
            [(Registration(f"r{i}", f"ID{i}", embedding_model=model), capture)
             for i, capture in enumerate(generator.captures(persons))]
            + [(Registration(f"again{i}", f"ID{i}", embedding_model=model), capture)
               for i, capture in enumerate(generator.captures(persons[:1500]))]
            + [(Registration(f"fake{i}", f"OTHER{i}", embedding_model=model), capture)
               for i, capture in enumerate(generator.captures(persons[:100]))])
    finally:
        store.close()
    (tmp_path / "data").chmod(0o700)  # as a server makes it (a bare Store does not)
    shutil.copytree(tmp_path / "data", tmp_path / "exact")
    probes = [pb.CheckRequest(face=face(capture), claimed_id_number=f"ID{i}")
              for i, capture in enumerate(generator.captures(persons[:300]))]
    answers = {}
    for name, kind in (("data", f"SignIVF{NLIST}"), ("exact", "Flat")):
        server = RunningServer(ServerConfig(store=StoreConfig(data_dir=tmp_path / name),
                                            index=IndexConfig(index_factory=kind)))
        try:
            info = pb_grpc.IndexAdminStub(server.channel).GetIndexInfo(
                pb.GetIndexInfoRequest())
            answers[name] = [server.stub.Check(probe) for probe in probes]
        finally:
            server.stop()
        if kind != "Flat":
            nprobe = int(re.match(r"nprobe=(\d+) \(calibrated: ", info.search_parameters)[1])
            assert info.index_type == kind and nprobe < NLIST // 2
    # The verdicts and every match at the match threshold; group-mates of the probe's person
    # scoring 0.30-0.40 (other persons: this gallery's groups are tight) may be left out.
    verdicts = [outcome(answer) for answer in answers["exact"]]
    assert [outcome(answer) for answer in answers["data"]] == verdicts
    assert sum(verdict == pb.DUPLICATE_IDENTITY for verdict, *_ in verdicts) >= 90  # fake<i>
