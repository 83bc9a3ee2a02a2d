"""CheckStream answers each request as Check would, in order, on one call: the same verdicts,
the same refusals (in the item's place, the stream going on), the same masking, rate limit
and audit by role. Real TLS, keys from `dedup keys`, both backends."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from conftest import DESKS_SEND_EMBEDDINGS, enroll, face
from secure import channel, secured
from trail import records

from dedup import FaceGenerator
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.api.auth import allowed

CASE = (("x-case-id", "CASE-21"), ("x-purpose", "ring review"))


def test_a_stream_answers_what_check_answers_in_order(server, faces):
    persons = faces.persons(4)
    enroll(server.stub, "r0", "ID0", persons[0])
    enroll(server.stub, "r1", "ID1", persons[1])
    requests = [
        pb.CheckRequest(face=face(faces.capture(persons[0], 0.3)), claimed_id_number="ID0"),
        pb.CheckRequest(face=face(faces.capture(persons[1], 0.3)), claimed_id_number="ID9"),
        pb.CheckRequest(face=face(persons[2]), claimed_id_number="ID2", max_candidates=3),
        pb.CheckRequest(face=face(faces.capture(persons[0], 0.3))),
    ]
    streamed = list(server.stub.CheckStream(iter(requests), timeout=30))
    one_by_one = [server.stub.Check(request, timeout=30) for request in requests]
    assert streamed == one_by_one
    assert [reply.verdict for reply in streamed] == [
        pb.SAME_PERSON, pb.DUPLICATE_IDENTITY, pb.CLEAR, pb.DUPLICATE_IDENTITY]
    assert not any(reply.HasField("error") for reply in streamed)


def test_a_bad_request_is_answered_in_its_place_and_the_stream_goes_on(server, faces):
    person = faces.persons(1)[0]
    enroll(server.stub, "r0", "ID0", person)
    good = pb.CheckRequest(face=face(person), claimed_id_number="ID0")
    bad = [
        pb.CheckRequest(claimed_id_number="ID0"),  # no face
        pb.CheckRequest(face=face(person[:100]), claimed_id_number="ID0"),
        pb.CheckRequest(face=face(person), claimed_id_number="x" * 10_000),
        pb.CheckRequest(face=face(person), max_candidates=10_000),
    ]
    replies = list(server.stub.CheckStream(iter([good, *bad, good]), timeout=30))
    assert len(replies) == 6
    assert replies[0] == replies[5] == server.stub.Check(good, timeout=30)
    failed = [reply.error for reply in replies[1:5]]
    assert [error.code for error in failed] == ["INVALID_ARGUMENT"] * 4
    for error, field in zip(failed, ("face", "face.embedding", "claimed_id_number",
                                     "max_candidates"), strict=True):
        assert field in error.message
    for reply in replies[1:5]:  # nothing but the error
        assert reply == pb.CheckResponse(error=reply.error)
    assert server.stub.Stats(pb.StatsRequest(), timeout=30).registrations == 1


def test_desks_are_masked_and_rate_limited_item_by_item(make_server, keys, faces):
    server = secured(make_server, keys, queries=dataclasses.replace(
        DESKS_SEND_EMBEDDINGS, check_rate_per_caller=0.01, check_burst_per_caller=3))
    other, own = faces.persons(2)
    with channel(server.port, keys, role="admin") as admin:
        admin_stub = pb_grpc.FaceDedupStub(admin)
        enroll(admin_stub, "r-other", "110101199003071234", other, msisdn="+8613800000001")
        enroll(admin_stub, "r-own", "220202198805055678", own)
    probe = pb.CheckRequest(face=face(faces.capture(other, 0.3)),
                            claimed_id_number="220202198805055678")
    unclaimed = pb.CheckRequest(face=probe.face)
    with channel(server.port, keys, role="registration") as desk:
        replies = list(pb_grpc.FaceDedupStub(desk).CheckStream(
            iter([probe, unclaimed, probe, probe, probe]), timeout=30))
    assert [reply.error.code for reply in replies] == [
        "", "INVALID_ARGUMENT", "", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    assert "claimed_id_number" in replies[1].error.message
    assert "CN=registration-client" in replies[3].error.message
    assert replies[0].verdict == replies[2].verdict == pb.DUPLICATE_IDENTITY
    (match,) = [m for m in replies[0].matches if m.registration.registration_id == "r-other"]
    assert match.registration.id_number == "*" * 14 + "1234"
    assert b"110101199003071234" not in b"".join(r.SerializeToString() for r in replies)


def test_an_investigators_stream_is_audited_item_by_item(secure_server, keys):
    enrolled = FaceGenerator(seed=7).persons(1)[0]  # r0, as secure_server enrolled it
    probe = pb.CheckRequest(face=face(enrolled))
    with channel(secure_server.port, keys, role="investigator") as investigator:
        stub = pb_grpc.FaceDedupStub(investigator)
        answered = list(stub.CheckStream(iter([probe, probe]), timeout=30, metadata=CASE))
        uncased = list(stub.CheckStream(iter([probe]), timeout=30))
    assert [reply.error.code for reply in answered] == ["", ""]
    assert answered[0].matches[0].registration.id_number == "ID0"  # whole records
    assert uncased[0].error.code == "INVALID_ARGUMENT"
    assert "x-case-id" in uncased[0].error.message
    secure_server.stop()
    trail = [r for r in records(secure_server) if r["method"] == "FaceDedup.CheckStream"]
    assert [(r["case_id"], r["query"].get("outcome"), r["returned"]) for r in trail] == [
        ("CASE-21", None, ["r0"]), ("CASE-21", None, ["r0"]), ("", "INVALID_ARGUMENT", [])]


def test_a_stream_of_checks_is_granted_as_check_is():
    for role in ("registration", "investigator", "admin", "nobody"):
        assert allowed(role, "FaceDedup", "CheckStream") == allowed(role, "FaceDedup", "Check")


def test_an_unauthenticated_stream_is_refused(secure_server, keys, faces):
    with channel(secure_server.server.token_port, keys, token="not-a-token") as stranger:
        responses = pb_grpc.FaceDedupStub(stranger).CheckStream(
            iter([pb.CheckRequest(face=face(faces.persons(1)[0]))]), timeout=30)
        with pytest.raises(grpc.RpcError) as error:
            list(responses)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
