"""Every index type gives exact search's verdicts; deletion, rebuilds and streams on them."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import RunningServer, face, registration

from dedup import FaceGenerator, ServerConfig, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.errors import InvalidArgument
from dedup.core.settings import IndexConfig
from dedup.core.vectors import normalize_rows
from dedup.gallery.embedded.index import (
    AUTO,
    SearchOptions,
    new_index,
    training_size,
    validate_kind,
)
from dedup.gallery.embedded.index_plan import kind_for

KINDS = ["BinarySign512", "BinarySign256", "BinaryIVF16", "SignIVF16", "FastScanIVF16",
         "IVF16,Flat", "IVF16,SQ8", "IVF16,PQ8", "OPQ8,IVF16,PQ8"]
# Every type "auto" can choose, from an empty gallery to a very large one.
PERSONS = 1200
PLANTED = 40  # persons also registered under a second ID number
AUTO_KINDS = sorted({kind_for(AUTO, size, 1000, 1100)
                     for size in (0, 999, 1000, 1100, PERSONS + PLANTED)})

FAISS_ONLY = ("FAISS index types, live rebuilds and checkpoints are the embedded backend's; "
              "Milvus builds and maintains its own index")


def gallery_requests(generator: FaceGenerator, persons: np.ndarray) -> list[pb.EnrollRequest]:
    requests = []
    for i, person in enumerate(persons):
        requests.append(pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"),
                                         face=face(generator.capture(person))))
        if i < PLANTED:
            requests.append(pb.EnrollRequest(registration=registration(f"dup{i}", f"FAKE{i}"),
                                             face=face(generator.capture(person))))
    return requests


def probes(generator: FaceGenerator, persons: np.ndarray) -> list[pb.CheckRequest]:
    newcomers = generator.persons(20)
    checks = [pb.CheckRequest(face=face(generator.capture(persons[i])), claimed_id_number=f"ID{i}")
              for i in range(0, 2 * PLANTED)]  # half of them planted duplicates
    checks += [pb.CheckRequest(face=face(generator.capture(persons[i])), claimed_id_number="NEW")
               for i in range(500, 520)]
    checks += [pb.CheckRequest(face=face(v), claimed_id_number=f"NEWC{i}" if i < 10
                               else f"ID{800 + i}") for i, v in enumerate(newcomers)]
    checks += [pb.CheckRequest(face=face(generator.at_similarity(
        np.asarray(persons[700 + i], np.float32), 0.5)), claimed_id_number="NEW2")
        for i in range(10)]
    return checks


def outcome(response: pb.CheckResponse) -> tuple:
    return (response.verdict, response.distinct_other_id_numbers,
            tuple(m.registration.registration_id for m in response.matches))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A data directory enrolled through EnrollStream on an exact index, and exact answers."""
    generator = FaceGenerator(11)
    persons = generator.persons(PERSONS)
    data_dir = tmp_path_factory.mktemp("base") / "data"
    server = RunningServer(ServerConfig(store=StoreConfig(data_dir=data_dir)))
    try:
        responses = list(server.stub.EnrollStream(iter(gallery_requests(generator, persons))))
        assert all(r.enrolled for r in responses)
        checks = probes(generator, persons)
        exact = [server.stub.Check(c) for c in checks]
    finally:
        server.stop()
    verdicts = {outcome(r)[0] for r in exact}
    assert {pb.DUPLICATE_IDENTITY, pb.SAME_PERSON, pb.CLEAR, pb.ID_FACE_MISMATCH} <= verdicts
    return data_dir, checks, exact


def start_with(tmp_path, base_dir, kind, **index):
    data_dir = tmp_path / "data"
    shutil.copytree(base_dir, data_dir)
    (data_dir / "index.ckpt").unlink()  # start-up builds the configured type
    return RunningServer(ServerConfig(store=StoreConfig(data_dir=data_dir),
                                      index=IndexConfig(index_factory=kind, **index)))


def admin(server) -> pb_grpc.IndexAdminStub:
    return pb_grpc.IndexAdminStub(server.channel)


@pytest.mark.parametrize("kind", ["Flat", *KINDS])
def test_every_type_gives_exact_verdicts_and_takes_deletes_and_reinsertions(tmp_path, base,
                                                                            kind):
    """One server per type (trained once: OPQ and PQ training are the slow part)."""
    base_dir, checks, exact = base
    # nprobe covers every list: on isotropic synthetic faces IVF recall needs it (the
    # benchmarks measure lower settings); what is tested here is the exact re-ranking.
    server = start_with(tmp_path, base_dir, kind, nprobe=16, rerank_candidates=512)
    try:
        info = admin(server).GetIndexInfo(pb.GetIndexInfoRequest())
        assert info.index_type == kind and info.vectors == PERSONS + PLANTED
        assert info.exact == (kind == "Flat")
        for check, expected in zip(checks, exact, strict=True):
            got = server.stub.Check(check)
            assert outcome(got) == outcome(expected)
            assert [m.score for m in got.matches] == pytest.approx(
                [m.score for m in expected.matches], abs=1e-5)
        deletes_and_reinserts(server, checks[0], kind)
    finally:
        server.stop()


def deletes_and_reinserts(server: RunningServer, duplicate_probe: pb.CheckRequest,
                          kind: str) -> None:
    """`duplicate_probe` is person 0, planted under FAKE0 too."""
    assert {m.registration.registration_id
            for m in server.stub.Check(duplicate_probe).matches} >= {"r0", "dup0"}
    server.stub.Delete(pb.DeleteRequest(registration_id="dup0"))
    after = server.stub.Check(duplicate_probe)
    assert "dup0" not in {m.registration.registration_id for m in after.matches}
    assert after.verdict == pb.SAME_PERSON
    vector = np.asarray(duplicate_probe.face.embedding.values, np.float32)
    server.stub.Enroll(pb.EnrollRequest(registration=registration("dup0-again", "FAKE0"),
                                        face=face(vector)))
    again = server.stub.Check(duplicate_probe)
    assert again.verdict == pb.DUPLICATE_IDENTITY
    assert again.matches[0].registration.registration_id == "dup0-again"
    server.restart()  # the checkpoint keeps the type, the deletion and the re-insertion
    info = admin(server).GetIndexInfo(pb.GetIndexInfoRequest())
    assert info.index_type == kind
    assert outcome(server.stub.Check(duplicate_probe)) == outcome(again)


@pytest.mark.parametrize("kind", AUTO_KINDS)
def test_auto_types_with_default_parameters_give_exact_verdicts_after_deletes_and_restart(
        tmp_path, base, kind):
    """With the defaults a server runs (nprobe, re-rank depth), not widened for the test."""
    base_dir, checks, _ = base
    exact = start_with(tmp_path / "exact", base_dir, "Flat")
    served = start_with(tmp_path / "served", base_dir, kind)
    try:
        assert admin(served).GetIndexInfo(pb.GetIndexInfoRequest()).index_type == kind
        for registration_id in ("dup1", "dup2", "r3", "r41", "r505", "r700"):
            for server in (exact, served):
                server.stub.Delete(pb.DeleteRequest(registration_id=registration_id))
        expected = [exact.stub.Check(check) for check in checks]
        assert {outcome(e)[0] for e in expected} >= {pb.DUPLICATE_IDENTITY, pb.CLEAR}
        for round_ in ("live", "after restart"):
            for check, wanted in zip(checks, expected, strict=True):
                got = served.stub.Check(check)
                assert outcome(got) == outcome(wanted), round_
                assert [m.score for m in got.matches] == pytest.approx(
                    [m.score for m in wanted.matches], abs=1e-5)
            served.restart()  # the checkpoint round trip
            assert admin(served).GetIndexInfo(pb.GetIndexInfoRequest()).index_type == kind
    finally:
        exact.stop()
        served.stop()


@pytest.mark.embedded_only(reason=FAISS_ONLY)
def test_a_damaged_binary_ivf_checkpoint_is_refused_and_rebuilt_at_start(tmp_path, base):
    base_dir, checks, exact = base
    server = start_with(tmp_path, base_dir, "BinaryIVF16", nprobe=16)
    server.stop()
    checkpoint = server.data_dir / "index.ckpt"
    damaged = bytearray(checkpoint.read_bytes())
    damaged[-100] ^= 0xFF
    checkpoint.write_bytes(bytes(damaged))
    server = RunningServer(server.config)
    try:
        info = admin(server).GetIndexInfo(pb.GetIndexInfoRequest())
        assert info.index_type == "BinaryIVF16" and info.vectors == PERSONS + PLANTED
        assert info.search_parameters == "nprobe=16"  # was empty for binary lists
        assert outcome(server.stub.Check(checks[0])) == outcome(exact[0])
    finally:
        server.stop()


def test_enroll_stream_answers_each_request_in_order(server, faces):
    people = faces.persons(30)
    requests = []
    for i, person in enumerate(people):
        requests.append(pb.EnrollRequest(registration=registration(f"s{i}", f"ID{i}"),
                                         face=face(person)))
    requests[5] = pb.EnrollRequest(registration=registration("bad", "ID5"),
                                   face=pb.Face(embedding=pb.Embedding(values=[1.0, 2.0])))
    requests[9] = pb.EnrollRequest(registration=registration("s3", "ID-X"), face=face(people[9]))
    requests[12] = pb.EnrollRequest(registration=registration("twin", "ID-OTHER"),
                                    face=face(people[0]), check_first=True)
    requests[20] = pb.EnrollRequest(face=face(people[20]))
    responses = list(server.stub.EnrollStream(iter(requests)))
    assert len(responses) == len(requests)
    for request, response in zip(requests, responses, strict=True):
        assert response.registration.registration_id == request.registration.registration_id
    assert responses[5].error.code == "INVALID_ARGUMENT"
    assert "face.embedding.values: expected 512 values, got 2" in responses[5].error.message
    assert responses[9].error.code == "ALREADY_EXISTS"
    assert not responses[12].enrolled and not responses[12].HasField("error")
    assert responses[12].check.verdict == pb.DUPLICATE_IDENTITY
    assert responses[20].error.code == "INVALID_ARGUMENT"
    assert "registration: is required" in responses[20].error.message
    good = [i for i in range(30) if i not in (5, 9, 12, 20)]
    assert all(responses[i].enrolled and not responses[i].HasField("error") for i in good)
    assert server.stub.Stats(pb.StatsRequest()).registrations == len(good)


@pytest.mark.embedded_only(reason=FAISS_ONLY)
def test_a_type_rebuilt_by_name_is_not_switched_back_by_auto(make_server, faces):
    """Under `auto`, an operator's Rebuild to a named type stays (the automatic switch
    undid it within seconds before); a Rebuild to the configured type hands back to auto."""
    server = make_server(checkpoint_interval_s=0.2)  # the switch looks every 0.2 s
    list(server.stub.EnrollStream(iter(
        pb.EnrollRequest(registration=registration(f"p{i}", f"IDP{i}"), face=face(p))
        for i, p in enumerate(faces.persons(50)))))
    list(admin(server).Rebuild(pb.RebuildRequest(index_factory="BinarySign512")))
    time.sleep(2.0)
    info = admin(server).GetIndexInfo(pb.GetIndexInfoRequest())
    assert (info.index_type, info.rebuilding) == ("BinarySign512", False)
    list(admin(server).Rebuild(pb.RebuildRequest()))
    info = admin(server).GetIndexInfo(pb.GetIndexInfoRequest())
    assert (info.configured_index_type, info.index_type) == ("auto", "Flat")


@pytest.mark.embedded_only(reason=FAISS_ONLY)
def test_rebuild_racing_enrolments_and_deletes_loses_nothing(make_server, faces):
    server = make_server()
    people = faces.persons(2500)
    list(server.stub.EnrollStream(iter(
        pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"), face=face(p))
        for i, p in enumerate(people[:2000]))))
    stop = threading.Event()
    deleted: list[str] = []
    added: list[int] = []
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for i in range(2000, 2500):
                if stop.is_set():
                    return
                server.stub.Enroll(pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"),
                                                    face=face(people[i])))
                added.append(i)
                victim = f"r{(i - 2000) * 3}"
                server.stub.Delete(pb.DeleteRequest(registration_id=victim))
                deleted.append(victim)
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=churn)
    worker.start()
    phases = [p.phase for p in admin(server).Rebuild(
        pb.RebuildRequest(index_factory="BinarySign512"))]
    time.sleep(0.2)
    stop.set()
    worker.join()
    assert not errors
    assert phases[0] == "starting" and phases[-1] == "done" and "adding" in phases
    assert deleted and added
    info = admin(server).GetIndexInfo(pb.GetIndexInfoRequest())
    stats = server.stub.Stats(pb.StatsRequest())
    assert info.index_type == "BinarySign512" and not info.rebuilding
    assert info.vectors == stats.registrations == 2000 + len(added) - len(deleted)
    gone = set(deleted)
    for i in list(range(0, 2000, 7)) + added:
        top = server.stub.Check(pb.CheckRequest(face=face(people[i]))).matches
        if f"r{i}" in gone:
            assert all(m.registration.registration_id != f"r{i}" for m in top)
        else:
            assert top[0].registration.registration_id == f"r{i}"
    server.restart()
    assert admin(server).GetIndexInfo(pb.GetIndexInfoRequest()).vectors == stats.registrations


@pytest.mark.embedded_only(reason=FAISS_ONLY)
def test_rebuild_refusals(server, faces):
    with pytest.raises(grpc.RpcError) as error:
        list(admin(server).Rebuild(pb.RebuildRequest(index_factory="HNSW32,Flat")))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "HNSW is not supported" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        list(admin(server).Rebuild(pb.RebuildRequest(index_factory="IVF4096,SQ8")))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs at least 159,744 registrations" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        list(admin(server).Rebuild(pb.RebuildRequest(index_factory="LSH")))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.embedded_only(reason=FAISS_ONLY)
def test_rebuild_refuses_a_pq_that_does_not_fit_or_cannot_be_trained_yet(server):
    with pytest.raises(grpc.RpcError) as error:
        list(admin(server).Rebuild(pb.RebuildRequest(index_factory="IVF1,PQ7")))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PQ's 7 sub-quantizers do not divide the 512 dimensions" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:  # 256 centroids a sub-quantizer
        list(admin(server).Rebuild(pb.RebuildRequest(index_factory="IVF1,PQ16")))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs at least 256 registrations" in error.value.details()


@pytest.mark.embedded_only(reason=FAISS_ONLY)
def test_checkpoint_rpc(server, faces):
    server.stub.Enroll(pb.EnrollRequest(registration=registration("a", "ID1"),
                                        face=face(faces.persons(1)[0])))
    response = admin(server).Checkpoint(pb.CheckpointRequest())
    assert response.sequence == 1 and response.path.endswith("index.ckpt")
    assert server.stub.Stats(pb.StatsRequest()).checkpoint_sequence == 1


@pytest.mark.embedded_only(reason=FAISS_ONLY)
def test_auto_switches_to_binary_when_the_gallery_grows(make_server, faces):
    server = make_server(index=IndexConfig(auto_threshold=300), checkpoint_interval_s=0.2)
    assert admin(server).GetIndexInfo(pb.GetIndexInfoRequest()).index_type == "Flat"
    list(server.stub.EnrollStream(iter(
        pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"), face=face(p))
        for i, p in enumerate(faces.persons(320)))))
    info = wait_for_index(server, "BinarySign512")
    assert info.wanted_index_type == "BinarySign512" and info.configured_index_type == "auto"
    assert info.vectors == 320


@pytest.mark.embedded_only(reason=FAISS_ONLY)
def test_auto_goes_back_to_flat_only_well_below_its_threshold(make_server, faces):
    """Erasures taking a gallery just under the threshold leave the larger type serving
    (no rebuild back and forth at the threshold); 10% under it, auto switches back."""
    server = make_server(index=IndexConfig(auto_threshold=300), checkpoint_interval_s=0.2)
    list(server.stub.EnrollStream(iter(
        pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"), face=face(p))
        for i, p in enumerate(faces.persons(300)))))
    wait_for_index(server, "BinarySign512")
    for i in range(30):  # 270 left: 90% of the threshold
        server.stub.Delete(pb.DeleteRequest(registration_id=f"r{i}"))
    time.sleep(2.0)  # ten looks of the automatic switch
    info = admin(server).GetIndexInfo(pb.GetIndexInfoRequest())
    assert (info.index_type, info.wanted_index_type, info.vectors) == (
        "BinarySign512", "BinarySign512", 270)
    server.stub.Delete(pb.DeleteRequest(registration_id="r30"))
    assert wait_for_index(server, "Flat").vectors == 269


@pytest.mark.embedded_only(reason=FAISS_ONLY)
def test_a_gallery_auto_served_with_sign_lists_is_rebuilt_to_fast_scan_lists(tmp_path, base):
    """Upgrading: before FastScanIVF, auto served SignIVF. Such a gallery starts from its
    SignIVF checkpoint, a live rebuild moves it to FastScanIVF, and the verdicts stay."""
    base_dir, checks, exact = base
    fast_scan = kind_for(AUTO, PERSONS + PLANTED, 1000, 1100)
    assert fast_scan.startswith("FastScanIVF")
    sign = start_with(tmp_path, base_dir, fast_scan.replace("FastScanIVF", "SignIVF"))
    sign.stop()  # leaves its checkpoint
    server = RunningServer(ServerConfig(
        store=StoreConfig(data_dir=tmp_path / "data", checkpoint_interval_s=0.2),
        index=IndexConfig(auto_threshold=1000, auto_lists_threshold=1100)))
    try:
        info = admin(server).GetIndexInfo(pb.GetIndexInfoRequest())
        assert info.index_type.startswith("SignIVF") and info.wanted_index_type == fast_scan
        assert wait_for_index(server, fast_scan).vectors == PERSONS + PLANTED
        for check, expected in zip(checks, exact, strict=True):
            assert outcome(server.stub.Check(check)) == outcome(expected)
    finally:
        server.stop()


def wait_for_index(server, kind: str, seconds: float = 90) -> pb.GetIndexInfoResponse:
    deadline = time.monotonic() + seconds
    while True:
        info = admin(server).GetIndexInfo(pb.GetIndexInfoRequest())
        if (info.index_type == kind and not info.rebuilding) or time.monotonic() > deadline:
            assert (info.index_type, info.rebuilding) == (kind, False)
            return info
        time.sleep(0.2)


@pytest.mark.parametrize(("kind", "problem"), [
    ("IVF1,PQ8x0", "PQ codes of 1 to 16 bits a sub-quantizer, not 0"),  # SIGFPE in FAISS
    ("IVF1,PQ8x25", "PQ codes of 1 to 16 bits a sub-quantizer, not 25"),
    ("IVF2,PQ0", "PQ needs at least one sub-quantizer"),
    ("OPQ0,IVF2,Flat", "OPQ needs at least one sub-quantizer"),
    ("OPQ4_0,IVF1,Flat", "OPQ's output needs at least one dimension"),  # SIGFPE in FAISS
    ("OPQ4_6,IVF1,Flat", "OPQ's 4 sub-quantizers do not divide the 6 dimensions"),
    ("OPQ4_64,IVF1,PQ5", "PQ's 5 sub-quantizers do not divide the 64 dimensions"),
    ("IVF2000000,Flat", "at most 1,048,576 lists"),
])
def test_ivf_kinds_faiss_cannot_build_are_refused_naming_the_field(kind, problem):
    """The kind alone shows it: refused without the vectors' dimension, before FAISS."""
    with pytest.raises(InvalidArgument, match="index_factory") as refused:
        validate_kind(kind)
    assert problem in str(refused.value)


@pytest.mark.parametrize(("kind", "problem"), [
    ("IVF2,PQ7", "PQ's 7 sub-quantizers do not divide the 512 dimensions"),
    ("OPQ3,IVF4,PQ8", "OPQ's 3 sub-quantizers do not divide the 512 dimensions"),
    ("OPQ4_600,IVF1,Flat", "OPQ's output of 600 dimensions is wider than the vectors' 512"),
])
def test_ivf_kinds_that_do_not_fit_the_dimension_are_refused_where_it_is_known(kind, problem):
    assert validate_kind(kind) == kind  # the dimension decides
    for refuse in (lambda: validate_kind(kind, dimension=512), lambda: new_index(kind, 512)):
        with pytest.raises(InvalidArgument, match="index_factory") as refused:
            refuse()
        assert problem in str(refused.value)


# (kind, dimension, vectors its training needs): 39 a list, one a centroid of each PQ or
# OPQ sub-quantizer (2**bits; OPQ's are 8 bits), and for an OPQ one a dimension of its output.
TRAINING = [("IVF2,PQ16", 64, 256), ("IVF1,PQ8x4", 64, 39), ("IVF1,PQ16x6", 64, 64),
            ("IVF64,PQ8", 64, 39 * 64), ("OPQ8,IVF2,Flat", 64, 256),
            ("OPQ8,IVF2,Flat", 288, 288), ("OPQ8_32,IVF2,PQ16", 288, 256),
            ("OPQ16_32,IVF16,PQ8x6", 64, 16 * 39)]


@pytest.mark.parametrize(("kind", "dimension", "needed"), TRAINING)
def test_every_accepted_ivf_kind_trains_on_its_training_size(kind, dimension, needed):
    """'IVF2,PQ16' and 'OPQ8,IVF2,Flat' counted 78 vectors, FAISS refused fewer than 256;
    an OPQ trained on fewer vectors than its output's dimensions corrupted FAISS's heap."""
    assert validate_kind(kind, dimension=dimension) == kind
    assert training_size(kind, dimension) == needed
    vectors = normalize_rows(np.random.default_rng(3).standard_normal((needed, dimension),
                                                                      dtype=np.float32))
    index = new_index(kind, dimension)
    index.train(vectors)
    index.add(np.arange(needed, dtype=np.int64), vectors)
    found = index.search(vectors[:4], 1, SearchOptions(nprobe=64))
    assert len(found) == 4 and all(len(ids) == 1 for ids, _ in found)


def test_a_sixteen_bit_pq_needs_its_65536_centroids_trained():
    assert training_size("IVF64,PQ32x16", 512) == 1 << 16


def test_search_dispatchers_times_threads_is_bounded():
    with pytest.raises(ValueError, match="index: search_dispatchers x search_threads"):
        IndexConfig(search_dispatchers=64, search_threads=32)


@pytest.mark.parametrize(("field", "value"), [
    ("nprobe", -1), ("auto_threshold", -1), ("auto_lists_threshold", -1),
    ("rerank_candidates", 0), ("max_batch", 0), ("search_threads", 0),
    ("max_batch_wait_s", -0.001), ("calibration_min_score", 1.5),
    ("nprobe", 2**63), ("nprobe", 2**64), ("nprobe", (1 << 20) + 1),
    ("rerank_candidates", 100_001), ("max_batch", 100_001),
    ("search_dispatchers", 0), ("search_dispatchers", 1025), ("search_threads", 1025),
    ("rebuild_niceness", -1), ("rebuild_niceness", 20),
    ("calibration_target", -0.1), ("calibration_target", 1.5),
])
def test_index_settings_out_of_range_are_refused_naming_the_field(field, value):
    """nprobe=-1 was taken: every IVF search failed (OverflowError), and SignIVF and
    BinaryIVF searched a single list; so was nprobe=2**63 (every IVF search failed in FAISS)
    and 2**64 (OverflowError)."""
    with pytest.raises(ValueError, match=f"index: {field} must be"):
        IndexConfig(**{field: value})
