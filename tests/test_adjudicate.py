"""Adjudication: an investigator settles a pair; it is stored, audited, changes the verdict,
and feeds `dedup calibrate`."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from conftest import enroll, face, registration
from trail import records

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

CASE = {"case_id": "CASE-31", "purpose": "desk escalation"}
# 128 characters, 509 bytes in UTF-8: a registration_id within LMDB's 511-byte key, but an
# application's settlement key holds it and the matched registration's key.
TOO_LONG_FOR_AN_APPLICATION = "\U0001F600" * 127 + "x"


def test_different_people_settled_no_longer_duplicate(server, faces):
    person = faces.persons(1)[0]
    lookalike = faces.at_similarity(person, 0.55)  # above the match threshold
    enroll(server.stub, "a", "ID-A", person)
    application = pb.EnrollRequest(registration=registration("b", "ID-B"), face=face(lookalike),
                                   check_first=True)
    first = server.stub.Enroll(application)
    assert first.check.verdict == pb.DUPLICATE_IDENTITY and not first.enrolled
    score = first.check.matches[0].score
    investigate = pb_grpc.InvestigateStub(server.channel)
    settled = investigate.Adjudicate(pb.AdjudicateRequest(
        **CASE, registration_id="b", matched_registration_id="a",
        decision=pb.DIFFERENT_PEOPLE, score=score, note="twins, documents checked"))
    assert settled.score == pytest.approx(score) and len(settled.audit_record_hash) == 64

    check = server.stub.Check(pb.CheckRequest(face=face(lookalike), claimed_id_number="ID-B",
                                              registration_id="b"))
    assert check.verdict == pb.CLEAR
    assert check.matches[0].registration.registration_id == "a"
    assert check.matches[0].settled_different  # still shown as evidence
    unsettled = server.stub.Check(pb.CheckRequest(face=face(lookalike), claimed_id_number="ID-B"))
    assert unsettled.verdict == pb.DUPLICATE_IDENTITY  # for any other application
    second = server.stub.Enroll(application)
    assert second.enrolled and second.check.verdict == pb.CLEAR

    # Both enrolled now: the server scores the pair itself; SAME_PERSON leaves verdicts alone.
    confirmed = investigate.Adjudicate(pb.AdjudicateRequest(
        **CASE, registration_id="b", matched_registration_id="a",
        decision=pb.SAME_PERSON_CONFIRMED))
    assert confirmed.score == pytest.approx(score, abs=1e-5)
    assert server.stub.Check(pb.CheckRequest(face=face(lookalike), claimed_id_number="ID-B",
                                             registration_id="b")).verdict != pb.CLEAR
    server.stop()
    adjudications = [r for r in records(server) if r["method"] ==
                     "Investigate.Adjudicate"]
    assert [r["query"]["decision"] for r in adjudications] == ["DIFFERENT_PEOPLE",
                                                              "SAME_PERSON"]
    assert adjudications[0]["returned"] == ["b", "a"]
    assert adjudications[0]["hash"] == settled.audit_record_hash


@pytest.mark.parametrize("fields, field", [
    ({"registration_id": "b", "matched_registration_id": "a"}, "decision"),
    ({"registration_id": "a", "matched_registration_id": "a",
      "decision": pb.DIFFERENT_PEOPLE}, "matched_registration_id"),
    ({"registration_id": "new", "matched_registration_id": "a",
      "decision": pb.DIFFERENT_PEOPLE}, "score"),
    ({"registration_id": "new", "matched_registration_id": "a", "score": 3.0,
      "decision": pb.DIFFERENT_PEOPLE}, "score"),
    ({"registration_id": TOO_LONG_FOR_AN_APPLICATION, "matched_registration_id": "a",
      "score": 0.5, "decision": pb.DIFFERENT_PEOPLE}, "registration_id"),
])
def test_adjudicate_bad_input(server, faces, fields, field):
    enroll(server.stub, "a", "ID-A", faces.persons(1)[0])
    with pytest.raises(grpc.RpcError) as refused:
        pb_grpc.InvestigateStub(server.channel).Adjudicate(pb.AdjudicateRequest(**CASE, **fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(field)


def test_the_longest_application_id_is_settled(server, faces):
    enroll(server.stub, "a", "ID-A", faces.persons(1)[0])
    longest = "\U0001F600" * 124 + "abcd"  # 128 characters, 500 bytes in UTF-8
    settled = pb_grpc.InvestigateStub(server.channel).Adjudicate(pb.AdjudicateRequest(
        **CASE, registration_id=longest, matched_registration_id="a", score=0.5,
        decision=pb.DIFFERENT_PEOPLE))
    assert len(settled.audit_record_hash) == 64


def test_adjudicate_unknown_match_is_not_found(server):
    with pytest.raises(grpc.RpcError) as missing:
        pb_grpc.InvestigateStub(server.channel).Adjudicate(pb.AdjudicateRequest(
            **CASE, registration_id="x", matched_registration_id="nobody", score=0.5,
            decision=pb.DIFFERENT_PEOPLE))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.embedded_only(
    reason="dedup calibrate --data-dir reads adjudications from an LMDB store")
def test_settled_pairs_feed_calibrate(server, faces):
    people = faces.persons(4)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    investigate = pb_grpc.InvestigateStub(server.channel)
    for other in ("r1", "r2", "r3"):
        investigate.Adjudicate(pb.AdjudicateRequest(
            **CASE, registration_id="r0", matched_registration_id=other,
            decision=pb.DIFFERENT_PEOPLE))
    server.stop()
    result = subprocess.run([sys.executable, "-m", "dedup", "calibrate", "--target-fpir",
                             "0.01", "--gallery-size", "1000", "--data-dir",
                             str(server.data_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "3 comparisons" in result.stdout
    assert "3 pairs settled as different people" in result.stdout
