"""Enrolment, check_first atomicity, deletion, restarts, checkpoints and map growth."""

from __future__ import annotations

import logging
import subprocess
import threading
import time

import grpc
import pytest
from conftest import check, enroll, face, registration

from dedup import MIB
from dedup._proto.dedup.v1 import dedup_pb2 as pb

CHECKPOINT = "index checkpoints are the embedded backend's (Milvus keeps its own)"

MAP = "grows the LMDB map; the Milvus backend keeps no LMDB"

FULL = ("fills the LMDB map or a tmpfs under the data directory; Milvus Lite has no cap, and a "
        "cluster's quota refusals are Milvus errors, answered UNAVAILABLE")


def get(stub, registration_id):
    return stub.GetRegistration(pb.GetRegistrationRequest(registration_id=registration_id))


def stats(stub):
    return stub.Stats(pb.StatsRequest())


def test_enroll_stores_and_stamps_the_registration(server, faces):
    before = time.time()
    response = server.stub.Enroll(pb.EnrollRequest(
        registration=registration("order-1", "110101199003071234", "+8613800000001",
                                  carrier="CMCC", region="Beijing"),
        face=face(faces.persons(1)[0]),
    ))
    assert response.enrolled
    assert not response.HasField("check")
    stored = get(server.stub, "order-1")
    assert (stored.id_number, stored.msisdn, stored.carrier, stored.region) == (
        "110101199003071234", "+8613800000001", "CMCC", "Beijing")
    assert before - 1 <= stored.enrolled_at.ToMicroseconds() / 1e6 <= time.time() + 1
    assert stored == response.registration


def test_get_unknown_is_not_found(server):
    with pytest.raises(grpc.RpcError) as error:
        get(server.stub, "nope")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in error.value.details()


def test_check_first_enrolls_clear_and_same_person(server, faces):
    person = faces.persons(1)[0]
    first = enroll(server.stub, "r1", "ID1", faces.capture(person), check_first=True)
    assert first.enrolled and first.check.verdict == pb.CLEAR
    second = enroll(server.stub, "r2", "ID1", faces.capture(person), check_first=True)
    assert second.enrolled and second.check.verdict == pb.SAME_PERSON
    assert stats(server.stub).registrations == 2


def test_check_first_refuses_duplicate_and_stores_nothing(server, faces):
    person = faces.persons(1)[0]
    enroll(server.stub, "r1", "ID1", faces.capture(person))
    before = stats(server.stub)
    response = enroll(server.stub, "r2", "ID2", faces.capture(person), check_first=True)
    assert not response.enrolled
    assert response.check.verdict == pb.DUPLICATE_IDENTITY
    assert response.check.matches[0].registration.registration_id == "r1"
    assert response.registration.registration_id == "r2"
    assert stats(server.stub) == before
    with pytest.raises(grpc.RpcError):
        get(server.stub, "r2")


def test_check_first_is_atomic_under_concurrency(server, faces):
    person = faces.persons(1)[0]
    captures = [faces.capture(person) for _ in range(24)]
    barrier = threading.Barrier(len(captures))
    results: list[pb.EnrollResponse] = [None] * len(captures)  # type: ignore[list-item]

    def attempt(i: int) -> None:
        barrier.wait()
        results[i] = enroll(server.stub, f"race{i}", f"ID{i}", captures[i], check_first=True)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(captures))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    enrolled = [r for r in results if r.enrolled]
    assert len(enrolled) == 1
    assert all(r.check.verdict == pb.DUPLICATE_IDENTITY for r in results if not r.enrolled)
    assert stats(server.stub).registrations == 1


def test_registration_id_and_msisdn_are_unique(server, faces):
    a, b = faces.persons(2)
    enroll(server.stub, "r1", "ID1", a, msisdn="+8613800000001")
    for registration_id, msisdn, field in [("r1", "", "registration_id"),
                                           ("r2", "+8613800000001", "msisdn")]:
        for check_first in (False, True):
            with pytest.raises(grpc.RpcError) as error:
                enroll(server.stub, registration_id, "ID2", b, check_first=check_first,
                       msisdn=msisdn)
            assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert field in error.value.details()
    assert stats(server.stub).registrations == 1


@pytest.mark.parametrize("key", ["registration_id", "id_number", "msisdn"])
def test_delete_by_each_key_and_never_return_it_again(server, faces, key):
    person, bystander = faces.persons(2)
    enroll(server.stub, "r1", "ID1", faces.capture(person), msisdn="+8613800000001")
    enroll(server.stub, "r2", "ID1", faces.capture(person), msisdn="+8613800000002")
    enroll(server.stub, "keep", "ID9", bystander, msisdn="+8613800000009")
    value = {"registration_id": "r1", "id_number": "ID1", "msisdn": "+8613800000001"}[key]
    response = server.stub.Delete(pb.DeleteRequest(**{key: value}))
    expected = {"r1", "r2"} if key == "id_number" else {"r1"}
    assert response.deleted == len(expected)
    assert set(response.registration_ids) == expected

    def assert_gone():
        for registration_id in expected:
            with pytest.raises(grpc.RpcError) as error:
                get(server.stub, registration_id)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        returned = {m.registration.registration_id
                    for m in check(server.stub, faces.capture(person), claimed="ID1").matches}
        assert not returned & expected
        assert get(server.stub, "keep").id_number == "ID9"
        assert stats(server.stub).index_vectors == 3 - len(expected)

    assert_gone()
    server.restart()
    assert_gone()
    server.restart(crash=True)
    assert_gone()


@pytest.mark.parametrize("key", ["registration_id", "id_number", "msisdn"])
def test_delete_unknown_key_is_not_found(server, faces, key):
    enroll(server.stub, "r1", "ID1", faces.persons(1)[0], msisdn="+8613800000001")
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Delete(pb.DeleteRequest(**{key: "+8600000"}))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert key in error.value.details()
    assert stats(server.stub).registrations == 1


def test_deleted_msisdn_can_be_enrolled_again(server, faces):
    a, b = faces.persons(2)
    enroll(server.stub, "r1", "ID1", a, msisdn="+8613800000001")
    server.stub.Delete(pb.DeleteRequest(msisdn="+8613800000001"))
    assert enroll(server.stub, "r2", "ID2", b, msisdn="+8613800000001").enrolled


def _populate(server, faces, count):
    people = faces.persons(count)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", f"ID{i // 2}", person, msisdn=f"+86138{i:08d}")
    return people


def _assert_all_found(server, people, step=1):
    for i in range(0, len(people), step):
        person = people[i]
        top = check(server.stub, person, claimed=f"ID{i // 2}").matches[0]
        assert top.registration.registration_id == f"r{i}"
        assert top.score > 0.999


def test_restart_keeps_everything(server, faces):
    people = _populate(server, faces, 40)
    before = stats(server.stub)
    server.restart()
    after = stats(server.stub)
    assert (after.registrations, after.distinct_id_numbers, after.index_vectors) == (
        before.registrations, before.distinct_id_numbers, before.index_vectors)
    assert after.checkpoint_sequence == after.store_sequence == before.store_sequence
    _assert_all_found(server, people)


def test_crash_replays_the_change_log(server, faces):
    people = _populate(server, faces, 30)
    server.restart()  # checkpoint covers the first 30
    more = faces.persons(10)
    for i, person in enumerate(more):
        enroll(server.stub, f"late{i}", f"LATE{i}", person)
    server.stub.Delete(pb.DeleteRequest(registration_id="r0"))
    server.restart(crash=True)
    after = stats(server.stub)
    assert after.registrations == after.index_vectors == 39
    for i, person in list(enumerate(people))[1:]:
        assert check(server.stub, person).matches[0].registration.registration_id == f"r{i}"
    for i, person in enumerate(more):
        assert check(server.stub, person).matches[0].registration.registration_id == f"late{i}"
    assert all(m.registration.registration_id != "r0"
               for m in check(server.stub, people[0]).matches)


@pytest.mark.embedded_only(reason=CHECKPOINT)
@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_checkpoint_is_rebuilt(server, faces, damage, caplog):
    people = _populate(server, faces, 20)
    server.stop()
    path = server.data_dir / "index.ckpt"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) - 100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    else:
        path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="dedup.gallery"):
        server._start()
    assert any("checkpoint unusable" in r.getMessage() for r in caplog.records)
    assert stats(server.stub).index_vectors == 20
    _assert_all_found(server, people)


@pytest.mark.embedded_only(reason=CHECKPOINT)
def test_missing_checkpoint_is_rebuilt(server, faces):
    people = _populate(server, faces, 10)
    server.stop()
    (server.data_dir / "index.ckpt").unlink()
    server._start()
    _assert_all_found(server, people)


@pytest.mark.embedded_only(reason=MAP)
def test_map_grows_by_itself(make_server, faces):
    server = make_server(initial_map_size=1 * MIB)
    people = _populate(server, faces, 600)  # about 1.5 MiB of embeddings
    assert stats(server.stub).registrations == 600
    server.restart()
    _assert_all_found(server, people, step=50)


def _enrol_until_refused(server, people) -> tuple[int, grpc.RpcError]:
    """Enrols r0, r1, ... until a call fails; how many were acknowledged, and the failure."""
    acknowledged = 0
    with pytest.raises(grpc.RpcError) as error:
        for i, person in enumerate(people):
            enroll(server.stub, f"r{i}", f"ID{i}", person)
            acknowledged += 1
    return acknowledged, error.value


@pytest.mark.embedded_only(reason=FULL)
def test_map_cap_refuses_writes_keeps_reads(make_server, faces):
    server = make_server(initial_map_size=MIB // 4, max_map_size=MIB // 4)
    people = faces.persons(1000)
    acknowledged, refusal = _enrol_until_refused(server, people)
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 0 < acknowledged < 1000
    assert stats(server.stub).registrations == acknowledged
    assert check(server.stub, people[0]).matches[0].registration.registration_id == "r0"
    server.restart()
    assert stats(server.stub).registrations == stats(server.stub).index_vectors == acknowledged


def test_insert_many_is_all_or_nothing(tmp_path, faces):
    from dedup import AlreadyExists, StoreConfig
    from dedup.core.records import Registration
    from dedup.gallery.embedded.gallery import EmbeddedGallery

    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "bulk"), model_id="test-model")
    try:
        people = faces.persons(4)
        gallery.insert_many([(Registration("a", "ID1"), people[0]),
                             (Registration("b", "ID2"), people[1])])
        with pytest.raises(AlreadyExists, match="'b'"):
            gallery.insert_many([(Registration("c", "ID3"), people[2]),
                                 (Registration("b", "ID4"), people[3])])
        assert gallery.store.count() == len(gallery.index) == 2
        assert gallery.get("c") is None
    finally:
        gallery.close()


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs the test mounts: a disk that really fills up."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                    "test_map_cap_refuses_writes_keeps_reads covers the same refusal")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.embedded_only(reason=FULL)
def test_full_disk_refuses_writes_keeps_reads_loses_nothing(make_server, faces, small_disk):
    server = make_server(data_dir=small_disk / "data", initial_map_size=1 << 30,
                         checkpoint_every_changes=10**9)
    people = faces.persons(6000)
    acknowledged, refusal = _enrol_until_refused(server, people)
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "disk is full" in refusal.details()
    assert 0 < acknowledged < len(people)
    assert stats(server.stub).registrations == acknowledged
    assert check(server.stub, people[0]).matches[0].registration.registration_id == "r0"
    assert server.stub.GetRegistration(
        pb.GetRegistrationRequest(registration_id=f"r{acknowledged - 1}")).id_number
    server.restart()  # its shutdown checkpoint may not fit: the change log covers it
    assert stats(server.stub).registrations == stats(server.stub).index_vectors == acknowledged
    _assert_all_found(server, people[:acknowledged], step=97)
