"""Every bad request gets its status, a message naming the field, and changes nothing."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from conftest import DESKS_SEND_EMBEDDINGS, RunningServer, face, registration

from dedup import FaceGenerator, ServerConfig, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
GOOD = np.full(512, 1 / math.sqrt(512), dtype=np.float32)


def embedding(values) -> pb.Face:
    return pb.Face(embedding=pb.Embedding(values=list(values)))


def with_value(index: int, value: float) -> pb.Face:
    values = [float(v) for v in GOOD]
    values[index] = value
    return embedding(values)


BAD_FACES = [
    (None, INVALID, "face: is required"),
    (pb.Face(), INVALID, "face: set either embedding or image"),
    (pb.Face(image=b"\xff\xd8\xff"), INVALID, "face.image: undecodable JPEG: damaged header"),
    (pb.Face(image=b"GIF89a" + bytes(100)), INVALID, "face.image: unsupported format"),
    (pb.Face(image=b""), INVALID, "face.image: is empty"),
    (embedding([]), INVALID, "face.embedding.values: expected 512 values, got 0"),
    (pb.Face(embedding=pb.Embedding(values=list(GOOD), model="other-model")),
     grpc.StatusCode.FAILED_PRECONDITION, "face.embedding.model: 'other-model' is not"),
    (embedding([0.1] * 3), INVALID, "face.embedding.values: expected 512 values, got 3"),
    (embedding([0.1] * 513), INVALID, "face.embedding.values: expected 512 values, got 513"),
    (with_value(7, math.nan), INVALID, "face.embedding.values: value 7 is nan"),
    (with_value(0, math.inf), INVALID, "face.embedding.values: value 0 is inf"),
    (with_value(511, -math.inf), INVALID, "face.embedding.values: value 511 is -inf"),
    (embedding([0.0] * 512), INVALID, "face.embedding.values: the vector is all zeros"),
    (embedding([1e-30] * 512), INVALID, "face.embedding.values: the vector is all zeros"),
]


def good_registration(**changes: str) -> pb.Registration:
    message = registration("new-1", "ID-NEW", "+8613900000001", carrier="CMCC", region="Beijing")
    for name, value in changes.items():
        setattr(message, name, value)
    return message


BAD_REGISTRATIONS = [
    ("registration_id", "", "registration.registration_id: is required"),
    ("registration_id", "x" * 129, "registration.registration_id: is 129 characters"),
    ("registration_id", " padded", "registration.registration_id: has leading or trailing"),
    ("registration_id", "a\x00b", "registration.registration_id: contains control characters"),
    ("id_number", "", "registration.id_number: is required"),
    ("id_number", "9" * 65, "registration.id_number: is 65 characters"),
    ("id_number", "ID\n1", "registration.id_number: contains control characters"),
    ("msisdn", "call me", "registration.msisdn: must be 3 to 31 digits, optionally after one '+'"),
    # Digits, but too short: the message says the length rule, not only "digits".
    ("msisdn", "12", "registration.msisdn: must be 3 to 31 digits"),
    ("msisdn", "+" + "1" * 32, "registration.msisdn: is 33 characters"),
    ("msisdn", "++123456", "registration.msisdn: must be 3 to 31 digits"),
    ("carrier", "c" * 65, "registration.carrier: is 65 characters"),
    ("region", "r\tx", "registration.region: contains control characters"),
]


def enroll_people(server, faces):
    people = faces.persons(5)
    for i, person in enumerate(people):
        server.stub.Enroll(pb.EnrollRequest(
            registration=registration(f"r{i}", f"ID{i}", f"+8613800000{i:03d}"),
            face=face(person)))
    return server, people


@pytest.fixture
def populated(server, faces):
    """A server on each backend, for refusals that reach the gallery (a lookup, a claim)."""
    return enroll_people(server, faces)


@pytest.fixture(scope="module")
def refusing(tmp_path_factory):
    """One embedded server for the module's refusals of malformed fields: they are made before
    anything is written or searched (dedup.core.validation, dedup.api.convert, the service's
    model check), so the backend plays no part and one server serves them all; each test
    snapshots what a client sees before and after its request. (An enrolment with a photo
    looks its registration_id up before decoding the photo: test_photos.py's
    test_an_enrolment_already_made_is_refused_before_its_photo runs that on every backend.)"""
    data_dir = tmp_path_factory.mktemp("refusing") / "data"
    server = RunningServer(ServerConfig(store=StoreConfig(data_dir=data_dir),
                                        queries=DESKS_SEND_EMBEDDINGS))
    try:
        yield enroll_people(server, FaceGenerator(seed=7))
    finally:
        server.stop()


def snapshot(server, people):
    """Everything a bad request could have changed, as seen by clients."""
    stats = server.stub.Stats(pb.StatsRequest())
    checks = [server.stub.Check(pb.CheckRequest(face=face(p), claimed_id_number=f"ID{i}"))
              for i, p in enumerate(people)]
    records = [server.stub.GetRegistration(pb.GetRegistrationRequest(registration_id=f"r{i}"))
               for i in range(len(people))]
    return stats, checks, records


def expect(call, request, code, message):
    with pytest.raises(grpc.RpcError) as error:
        call(request)
    assert error.value.code() == code
    assert message in error.value.details()


@pytest.mark.parametrize(("bad_face", "code", "message"), BAD_FACES)
def test_check_bad_face(refusing, bad_face, code, message):
    server, _ = refusing
    request = pb.CheckRequest(claimed_id_number="ID1")
    if bad_face is not None:
        request.face.CopyFrom(bad_face)
    expect(server.stub.Check, request, code, message)


@pytest.mark.parametrize(("bad_face", "code", "message"), BAD_FACES)
@pytest.mark.parametrize("check_first", [False, True])
def test_enroll_bad_face_changes_nothing(refusing, bad_face, code, message, check_first):
    server, people = refusing
    before = snapshot(server, people)
    request = pb.EnrollRequest(registration=good_registration(), check_first=check_first)
    if bad_face is not None:
        request.face.CopyFrom(bad_face)
    expect(server.stub.Enroll, request, code, message)
    assert snapshot(server, people) == before


@pytest.mark.parametrize(("field", "value", "message"), BAD_REGISTRATIONS)
@pytest.mark.parametrize("check_first", [False, True])
def test_enroll_bad_registration_changes_nothing(refusing, field, value, message, check_first):
    server, people = refusing
    before = snapshot(server, people)
    request = pb.EnrollRequest(registration=good_registration(**{field: value}),
                               face=face(GOOD), check_first=check_first)
    expect(server.stub.Enroll, request, INVALID, message)
    assert snapshot(server, people) == before


def test_enroll_without_registration(refusing):
    server, people = refusing
    before = snapshot(server, people)
    expect(server.stub.Enroll, pb.EnrollRequest(face=face(GOOD)), INVALID,
           "registration: is required")
    assert snapshot(server, people) == before


def test_enroll_existing_registration_id_changes_nothing(populated, faces):
    server, people = populated
    before = snapshot(server, people)
    request = pb.EnrollRequest(registration=registration("r1", "ID-OTHER"),
                               face=face(faces.persons(1)[0]))
    expect(server.stub.Enroll, request, grpc.StatusCode.ALREADY_EXISTS,
           "registration.registration_id: 'r1' is already enrolled")
    assert snapshot(server, people) == before


@pytest.mark.parametrize(("claimed", "max_candidates", "message"), [
    ("9" * 65, 0, "claimed_id_number: is 65 characters"),
    ("ID\x07", 0, "claimed_id_number: contains control characters"),
    ("ID1", 101, "max_candidates: is 101, at most 100"),
    ("ID1", 2**32 - 1, "max_candidates: is 4294967295"),
])
def test_check_bad_fields(refusing, claimed, max_candidates, message):
    server, _ = refusing
    request = pb.CheckRequest(face=face(GOOD), claimed_id_number=claimed,
                              max_candidates=max_candidates)
    expect(server.stub.Check, request, INVALID, message)


@pytest.mark.parametrize(("request_", "code", "message"), [
    (pb.DeleteRequest(), INVALID, "key: set one of registration_id, id_number or msisdn"),
    (pb.DeleteRequest(registration_id=""), INVALID, "registration_id: is required"),
    (pb.DeleteRequest(id_number="x" * 65), INVALID, "id_number: is 65 characters"),
    (pb.DeleteRequest(msisdn="\x00"), INVALID, "msisdn: contains control characters"),
    (pb.DeleteRequest(registration_id="unknown"), grpc.StatusCode.NOT_FOUND,
     "registration_id: no registration with registration_id 'unknown'"),
    (pb.DeleteRequest(id_number="ID-UNKNOWN"), grpc.StatusCode.NOT_FOUND, "id_number"),
    (pb.DeleteRequest(msisdn="+8600"), grpc.StatusCode.NOT_FOUND, "msisdn"),
])
def test_delete_bad_key_changes_nothing(populated, request_, code, message):
    server, people = populated
    before = snapshot(server, people)
    expect(server.stub.Delete, request_, code, message)
    assert snapshot(server, people) == before


def test_get_registration_requires_an_id(refusing):
    server, _ = refusing
    expect(server.stub.GetRegistration, pb.GetRegistrationRequest(), INVALID,
           "registration_id: is required")


def test_client_enrolled_at_is_ignored(server):
    message = good_registration()
    message.enrolled_at.FromSeconds(1)
    response = server.stub.Enroll(pb.EnrollRequest(registration=message, face=face(GOOD)))
    assert response.registration.enrolled_at.seconds > 1_700_000_000


# 128 characters pass the character limit, but in UTF-8 they are 512 bytes: over LMDB's
# 511-byte key.
TOO_LONG_FOR_A_KEY = "\U0001d4b3" * 128


@pytest.mark.parametrize(("call", "request_"), [
    ("Check", pb.CheckRequest(face=face(GOOD), registration_id=TOO_LONG_FOR_A_KEY)),
    ("GetRegistration", pb.GetRegistrationRequest(registration_id=TOO_LONG_FOR_A_KEY)),
    ("Delete", pb.DeleteRequest(registration_id=TOO_LONG_FOR_A_KEY)),
])
def test_a_registration_id_too_long_for_a_store_key_is_refused_naming_it(refusing, call,
                                                                           request_):
    server, people = refusing
    before = snapshot(server, people)
    expect(getattr(server.stub, call), request_, INVALID,
           "registration_id: is 512 bytes in UTF-8, at most 511 allowed")
    assert snapshot(server, people) == before


def test_an_embedding_of_huge_finite_values_keeps_its_direction(populated, faces):
    """Finite float32 values whose norm overflows float32 (3e38 twice): normalised in float32
    they became all zeros, were enrolled, and the face then matched nobody (a CLEAR for the
    same face under another ID number)."""
    server, _ = populated
    person = faces.persons(1)[0]
    huge = person / float(np.abs(person).max()) * np.float32(3.0e38)
    server.stub.Enroll(pb.EnrollRequest(
        registration=registration("huge-1", "ID-HUGE", "+8613900000009"),
        face=embedding(float(v) for v in huge)))
    answer = server.stub.Check(pb.CheckRequest(face=face(person), claimed_id_number="ID-OTHER"))
    assert answer.verdict == pb.DUPLICATE_IDENTITY
    assert answer.best_score == pytest.approx(1.0, abs=1e-5)
