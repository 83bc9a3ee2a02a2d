"""Photos in: real captures through the real face model, over a real server."""

from __future__ import annotations

import hashlib

import cv2
import grpc
import numpy as np
import pytest
from conftest import registration
from photos import GDP, PLAYERS, T1, YAO_IN_PLAYERS, YAOMING, encode

from dedup import Policy
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.core.settings import CaptureRules

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def photo(data: bytes, largest: bool = False) -> pb.Face:
    return pb.Face(image=data, use_largest_face=largest)


def enroll_photo(stub, registration_id, id_number, data, check_first=False):
    return stub.Enroll(pb.EnrollRequest(registration=registration(registration_id, id_number),
                                        face=photo(data), check_first=check_first))


def expect_invalid(stub, data, message, largest=False):
    with pytest.raises(grpc.RpcError) as error:
        stub.Check(pb.CheckRequest(face=photo(data, largest)))
    assert error.value.code() == INVALID
    assert message in error.value.details()
    return error.value.details()


@pytest.fixture
def players_gallery(server, crops):
    """Every usable player's face enrolled from its crop, under the player's own ID number."""
    enrolled = {}
    for i, crop in enumerate(crops["players"]):
        try:
            response = enroll_photo(server.stub, f"player-{i}", f"P{i:02d}", crop.path.read_bytes())
        except grpc.RpcError as error:
            assert error.code() == INVALID  # too small or too unclear a face: a capture rule
            continue
        assert response.detected_face.faces_in_image == 1
        enrolled[f"player-{i}"] = crop
    return server, enrolled


def test_yaoming_under_someone_elses_id_is_duplicate_naming_him(players_gallery):
    server, enrolled = players_gallery
    yao = [rid for rid, crop in enrolled.items() if crop.contains(YAO_IN_PLAYERS)]
    assert len(yao) == 1, "Yao Ming's face in players.jpg must be enrolled"
    assert len(enrolled) >= 10
    someone_else = next(f"P{rid.split('-')[1]:0>2}" for rid in enrolled if rid != yao[0])
    response = server.stub.Check(pb.CheckRequest(face=photo(YAOMING.read_bytes()),
                                                 claimed_id_number=someone_else))
    assert response.verdict == pb.DUPLICATE_IDENTITY
    assert response.matches[0].registration.registration_id == yao[0]
    assert response.matches[0].score >= 0.40
    assert response.distinct_other_id_numbers == 1
    assert response.detected_face.faces_in_image == 1
    assert response.detected_face.detection_score >= 0.6
    x1, y1, x2, y2 = (response.detected_face.x1, response.detected_face.y1,
                      response.detected_face.x2, response.detected_face.y2)
    height, width = cv2.imread(str(YAOMING)).shape[:2]
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


def test_different_people_in_t1_do_not_match(server, crops):
    assert len(crops["t1"]) == 6
    for i, crop in enumerate(crops["t1"]):
        response = enroll_photo(server.stub, f"t1-{i}", f"T{i}", crop.path.read_bytes(),
                                check_first=True)
        assert response.enrolled, f"face {i} matched another person in t1.jpg"
        assert response.check.verdict == pb.CLEAR
        assert response.check.best_score < 0.30
    assert server.stub.Stats(pb.StatsRequest()).registrations == 6


def test_same_face_again_is_same_person(server, crops):
    data = crops["t1"][0].path.read_bytes()
    enroll_photo(server.stub, "a", "ID-A", data)
    flipped = encode(cv2.flip(cv2.imread(str(crops["t1"][0].path)), 1))  # a mirrored capture
    response = server.stub.Check(pb.CheckRequest(face=photo(flipped), claimed_id_number="ID-A"))
    assert response.verdict == pb.SAME_PERSON
    assert response.matches[0].score > 0.7


def test_image_and_its_embedding_give_the_same_verdict(players_gallery):
    server, _ = players_gallery
    data = YAOMING.read_bytes()
    embedded = server.server.service.embedder.embed(data, False, "face.image")
    by_image = server.stub.Check(pb.CheckRequest(face=photo(data), claimed_id_number="X"))
    by_embedding = server.stub.Check(pb.CheckRequest(
        face=pb.Face(embedding=pb.Embedding(values=embedded.vector.tolist())),
        claimed_id_number="X"))
    assert by_image.verdict == by_embedding.verdict == pb.DUPLICATE_IDENTITY
    assert [m.registration.registration_id for m in by_image.matches] == \
        [m.registration.registration_id for m in by_embedding.matches]
    assert by_image.best_score == pytest.approx(by_embedding.best_score, abs=1e-5)
    assert not by_embedding.HasField("detected_face")


def test_group_photo_is_refused_unless_largest_face_is_asked_for(server):
    data = T1.read_bytes()
    before = server.stub.Stats(pb.StatsRequest())
    with pytest.raises(grpc.RpcError) as error:
        enroll_photo(server.stub, "group", "ID1", data)
    assert error.value.code() == INVALID
    assert "face.image: 6 faces detected" in error.value.details()
    assert server.stub.Stats(pb.StatsRequest()) == before
    response = server.stub.Enroll(pb.EnrollRequest(registration=registration("group", "ID1"),
                                                   face=photo(data, largest=True)))
    assert response.enrolled
    assert response.detected_face.faces_in_image == 6
    face = response.detected_face
    assert (face.x2 - face.x1) * (face.y2 - face.y1) > 90 * 90


def test_no_face(server):
    blank = np.full((480, 640, 3), 200, np.uint8)
    cv2.putText(blank, "no face here", (50, 240), cv2.FONT_HERSHEY_SIMPLEX, 2, (0, 0, 0), 3)
    expect_invalid(server.stub, encode(blank, ".png"), "face.image: no face detected")


def test_undecodable_and_unsupported(server):
    good = YAOMING.read_bytes()
    expect_invalid(server.stub, good[:4] + bytes(200), "face.image: undecodable JPEG")
    expect_invalid(server.stub, good[: len(good) // 3], "face.image: undecodable JPEG")
    expect_invalid(server.stub, encode(cv2.imread(str(YAOMING)), ".bmp"),
                   "face.image: unsupported format")
    expect_invalid(server.stub, b"\x89PNG\r\n\x1a\n" + bytes(10), "face.image: undecodable PNG")


def test_byte_and_pixel_limits(make_server):
    server = make_server(capture=CaptureRules(max_image_bytes=20_000, max_pixels=1_000_000))
    expect_invalid(server.stub, PLAYERS.read_bytes(),
                   "face.image: is 374,610 bytes, the limit is 20,000")
    huge = encode(np.zeros((1200, 1000, 3), np.uint8), ".png")  # compresses to a few KB
    assert len(huge) < 20_000
    expect_invalid(server.stub, huge, "face.image: is 1000x1200 = 1,200,000 pixels, the limit "
                   "is 1,000,000")


def test_small_face_says_by_how_much(make_server):
    server = make_server(capture=CaptureRules(min_face_pixels=400))
    details = expect_invalid(server.stub, YAOMING.read_bytes(), "px, below the minimum 400 px by")
    size = int(details.split("face is ")[1].split(" px")[0])
    assert 80 < size < 400


def test_low_detection_score_says_by_how_much(make_server):
    server = make_server(capture=CaptureRules(min_detection_score=0.99))
    expect_invalid(server.stub, YAOMING.read_bytes(), "is below the minimum 0.99 by 0.")


def test_stats_reports_the_model_and_registrations_record_it(server, crops):
    stats = server.stub.Stats(pb.StatsRequest())
    assert {f.name for f in stats.model.files} == {"det_500m.onnx", "w600k_mbf.onnx"}
    for file in stats.model.files:
        path = server.server.service.embedder.pack.directory / file.name
        assert file.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stats.model.model_id.startswith("w600k_mbf-")
    response = enroll_photo(server.stub, "a", "ID-A", crops["t1"][1].path.read_bytes())
    assert response.registration.embedding_model == stats.model.model_id
    stored = server.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="a"))
    assert stored.embedding_model == stats.model.model_id
    assert dict(server.stub.Stats(pb.StatsRequest()).registrations_by_model) == \
        {stats.model.model_id: 1}


def test_embedding_of_another_model_is_refused(server):
    stats = server.stub.Stats(pb.StatsRequest())
    vector = np.ones(512, np.float32).tolist()
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Check(pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(
            values=vector, model="arcface-r100-commercial"))))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    named = server.stub.Check(pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(
        values=vector, model=stats.model.model_id))))
    assert named.verdict == pb.CLEAR


def test_gdp_group_photo_with_largest_face(server):
    response = server.stub.Check(pb.CheckRequest(face=photo(GDP.read_bytes(), largest=True)))
    assert response.verdict == pb.CLEAR
    assert response.detected_face.faces_in_image >= 2


def test_policy_applies_to_photos(make_server, crops):
    server = make_server(policy=Policy(max_sims_per_id=1))
    enroll_photo(server.stub, "a", "ID-A", crops["t1"][2].path.read_bytes())
    response = server.stub.Check(pb.CheckRequest(face=photo(crops["t1"][3].path.read_bytes()),
                                                 claimed_id_number="ID-A"))
    assert response.verdict == pb.ID_FACE_MISMATCH


def test_a_photo_is_refused_before_it_is_decoded_while_the_pool_is_full(server):
    """A photo was decoded (up to 25 megapixels, 75 MB) before it was refused for want of a
    slot: a flood of large photos held that much memory each, and cost the server their
    decoding. With every slot taken, a photo whose header is good but whose pixels are
    damaged is refused for want of a slot (its pixels never decoded); one whose header is
    bad is still INVALID_ARGUMENT, whatever the load."""
    embedder = server.server.service.embedder
    good = YAOMING.read_bytes()
    undecoded = good[:len(good) // 3]  # its header whole: only decoding finds the damage
    for _ in range(embedder.slots.total):
        embedder.slots.take(None, "test")
    try:
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Check(pb.CheckRequest(face=photo(undecoded)))
        expect_invalid(server.stub, good[:4] + bytes(200), "face.image: undecodable JPEG")
    finally:
        for _ in range(embedder.slots.total):
            embedder.slots.give_back(None)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "photos are already being embedded" in refused.value.details()


def test_an_enrolment_already_made_is_refused_before_its_photo(server, crops):
    """Enroll without check_first of a registration_id already enrolled decoded and embedded
    the photo before the store refused it: a caller repeating it spent the server's photo
    capacity for nothing, unlimited. It is refused first, with the store's own answer."""
    enroll_photo(server.stub, "p1", "ID-P1", crops["t1"][0].path.read_bytes())
    for check_first in (False, True):
        with pytest.raises(grpc.RpcError) as taken:
            enroll_photo(server.stub, "p1", "ID-P2", b"\xff\xd8" + bytes(200), check_first)
        assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "'p1' is already enrolled" in taken.value.details()
    # Not the phone number: a junk photo must not tell a desk whether one is held.
    server.stub.Enroll(pb.EnrollRequest(registration=registration("p2", "ID-P2",
                                                                  "+8613900000002"),
                                        face=photo(crops["t1"][1].path.read_bytes())))
    with pytest.raises(grpc.RpcError) as junk:
        server.stub.Enroll(pb.EnrollRequest(registration=registration("p3", "ID-P3",
                                                                      "+8613900000002"),
                                            face=photo(b"\xff\xd8" + bytes(200))))
    assert junk.value.code() == grpc.StatusCode.INVALID_ARGUMENT
