"""Each verdict rule, and the order in which they apply, over a real server."""

from __future__ import annotations

import pytest
from conftest import check, enroll

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.core.settings import Limits


def test_empty_gallery_is_clear(server, faces):
    response = check(server.stub, faces.persons(1)[0], claimed="ID1")
    assert response.verdict == pb.CLEAR
    assert response.best_score == 0.0
    assert list(response.matches) == []


def test_new_face_under_new_id_is_clear(server, faces):
    people = faces.persons(20)
    for i, person in enumerate(people[:19]):
        enroll(server.stub, f"r{i}", f"ID{i}", faces.capture(person))
    response = check(server.stub, faces.capture(people[19]), claimed="ID19")
    assert response.verdict == pb.CLEAR
    assert response.best_score < 0.30
    assert list(response.matches) == []


def test_same_face_under_other_id_is_duplicate_with_evidence(server, faces):
    person = faces.persons(1)[0]
    enroll(server.stub, "r-a", "ID-A", faces.capture(person))
    enroll(server.stub, "r-b", "ID-B", faces.capture(person))
    response = check(server.stub, faces.capture(person), claimed="ID-NEW")
    assert response.verdict == pb.DUPLICATE_IDENTITY
    assert response.distinct_other_id_numbers == 2
    assert {m.registration.registration_id for m in response.matches} == {"r-a", "r-b"}
    scores = [m.score for m in response.matches]
    assert scores == sorted(scores, reverse=True)
    assert response.best_score == scores[0] >= 0.40


def test_duplicate_counts_other_ids_only(server, faces):
    person = faces.persons(1)[0]
    enroll(server.stub, "own", "ID-OWN", faces.capture(person))
    enroll(server.stub, "other", "ID-OTHER", faces.capture(person))
    response = check(server.stub, faces.capture(person), claimed="ID-OWN")
    assert response.verdict == pb.DUPLICATE_IDENTITY
    assert response.distinct_other_id_numbers == 1
    assert response.same_id_registrations == 1


def test_same_person_under_claimed_id(server, faces):
    person = faces.persons(1)[0]
    enroll(server.stub, "r1", "ID1", faces.capture(person))
    response = check(server.stub, faces.capture(person), claimed="ID1")
    assert response.verdict == pb.SAME_PERSON
    assert response.same_id_registrations == 1
    assert response.matches[0].registration.registration_id == "r1"


def test_someone_elses_id_is_mismatch(server, faces):
    owner, impostor = faces.persons(2)
    enroll(server.stub, "r1", "ID1", faces.capture(owner))
    response = check(server.stub, faces.capture(impostor), claimed="ID1")
    assert response.verdict == pb.ID_FACE_MISMATCH
    assert response.same_id_registrations == 1


def test_sim_limit(make_server, faces):
    server = make_server(policy=__import__("dedup").Policy(max_sims_per_id=3))
    person = faces.persons(1)[0]
    for i in range(3):
        enroll(server.stub, f"r{i}", "ID1", faces.capture(person))
    response = check(server.stub, faces.capture(person), claimed="ID1")
    assert response.verdict == pb.SIM_LIMIT_EXCEEDED
    assert response.same_id_registrations == 3


def test_between_thresholds_is_review(server, faces):
    person = faces.persons(1)[0]
    enroll(server.stub, "r1", "ID1", person)
    response = check(server.stub, faces.at_similarity(person, 0.35), claimed="ID2")
    assert response.verdict == pb.REVIEW
    assert abs(response.best_score - 0.35) < 1e-4
    assert [m.registration.registration_id for m in response.matches] == ["r1"]


def test_review_under_claimed_id(server, faces):
    person = faces.persons(1)[0]
    enroll(server.stub, "r1", "ID1", person)
    response = check(server.stub, faces.at_similarity(person, 0.35), claimed="ID1")
    assert response.verdict == pb.REVIEW


def test_thresholds_are_inclusive_at_the_boundary_side(server, faces):
    person = faces.persons(1)[0]
    enroll(server.stub, "r1", "ID1", person)
    assert check(server.stub, faces.at_similarity(person, 0.401)).verdict == pb.DUPLICATE_IDENTITY
    assert check(server.stub, faces.at_similarity(person, 0.399)).verdict == pb.REVIEW
    assert check(server.stub, faces.at_similarity(person, 0.301)).verdict == pb.REVIEW
    assert check(server.stub, faces.at_similarity(person, 0.299)).verdict == pb.CLEAR


def test_duplicate_wins_over_mismatch_and_limit(make_server, faces):
    server = make_server(policy=__import__("dedup").Policy(max_sims_per_id=1))
    owner, fraudster = faces.persons(2)
    enroll(server.stub, "owner", "ID-OWNER", faces.capture(owner))
    enroll(server.stub, "fraud", "ID-FRAUD", faces.capture(fraudster))
    # The fraudster presents the owner's ID: their face is under another ID, the ID's face differs.
    response = check(server.stub, faces.capture(fraudster), claimed="ID-OWNER")
    assert response.verdict == pb.DUPLICATE_IDENTITY


def test_mismatch_wins_over_sim_limit(make_server, faces):
    server = make_server(policy=__import__("dedup").Policy(max_sims_per_id=1))
    owner, impostor = faces.persons(2)
    enroll(server.stub, "owner", "ID1", faces.capture(owner))
    assert check(server.stub, faces.capture(impostor), claimed="ID1").verdict == pb.ID_FACE_MISMATCH


def test_without_claimed_id_any_match_is_duplicate(server, faces):
    person = faces.persons(1)[0]
    enroll(server.stub, "r1", "ID1", faces.capture(person))
    response = check(server.stub, faces.capture(person))
    assert response.verdict == pb.DUPLICATE_IDENTITY
    assert response.same_id_registrations == 0


def test_max_candidates_limits_matches_not_the_verdict(server, faces):
    person = faces.persons(1)[0]
    for i in range(6):
        enroll(server.stub, f"r{i}", f"ID{i}", faces.capture(person))
    response = check(server.stub, faces.capture(person), claimed="ID-NEW", max_candidates=2)
    assert response.verdict == pb.DUPLICATE_IDENTITY
    assert len(response.matches) == 2
    assert response.distinct_other_id_numbers == 6


@pytest.mark.parametrize(("own", "search_k"), [(80, 64), (12, 5)])
def test_duplicate_found_behind_many_own_registrations(make_server, faces, own, search_k):
    """The claimed ID's own registrations must not crowd a duplicate out of the candidates
    (on Milvus the search runs beside the ID's lookup and asks for 16 spare candidates:
    12 own registrations fit in them, 80 make it search again)."""
    server = make_server(policy=__import__("dedup").Policy(max_sims_per_id=1000),
                         limits=Limits(min_search_k=search_k))
    person = faces.persons(1)[0]
    for i in range(own):
        enroll(server.stub, f"own{i}", "ID-OWN", faces.at_similarity(person, 0.95))
    enroll(server.stub, "other", "ID-OTHER", faces.at_similarity(person, 0.6))
    response = check(server.stub, person, claimed="ID-OWN")
    assert response.verdict == pb.DUPLICATE_IDENTITY
    assert response.distinct_other_id_numbers == 1
