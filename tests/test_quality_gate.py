"""The quality gate in the server, quality in responses, quality-aware verdicts, the flags."""

from __future__ import annotations

from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from conftest import face, registration
from photos import YAOMING, encode

from dedup import Policy
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.cli.main import build_parser
from dedup.cli.serve import server_config
from dedup.core.policy import Scored, decide
from dedup.core.records import Registration, Verdict
from dedup.core.settings import CaptureRules, QualityGate
from dedup.gallery.embedded.store_format import decode_registration, encode_registration

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def blurred_yao() -> bytes:
    image = cv2.imread(str(YAOMING))
    assert image is not None
    return encode(cv2.GaussianBlur(image, (0, 0), 4.6), ".png")


def test_a_blurred_capture_is_refused_naming_component_value_and_minimum(server):
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Check(pb.CheckRequest(face=pb.Face(image=blurred_yao())))
    assert error.value.code() == INVALID
    details = error.value.details()
    assert details.startswith("face.image: sharpness ")
    assert "is below the minimum 35: retake the photo without motion" in details
    value = int(details.split("sharpness ")[1].split(" ")[0])
    assert 0 <= value < 35


def test_a_refused_capture_changes_nothing(server):
    before = server.stub.Stats(pb.StatsRequest()).registrations
    for check_first in (False, True):
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Enroll(pb.EnrollRequest(registration=registration("blurred", "ID-B"),
                                                face=pb.Face(image=blurred_yao()),
                                                check_first=check_first))
        assert error.value.code() == INVALID
        assert "sharpness" in error.value.details()
    assert server.stub.Stats(pb.StatsRequest()).registrations == before
    with pytest.raises(grpc.RpcError) as missing:
        server.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="blurred"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_image_responses_carry_the_quality(server):
    data = YAOMING.read_bytes()
    checked = server.stub.Check(pb.CheckRequest(face=pb.Face(image=data)))
    assert checked.HasField("quality")
    assert 75 <= checked.quality.unified <= 100
    assert checked.quality.sharpness >= 35 and checked.quality.face_size > 50
    enrolled = server.stub.Enroll(pb.EnrollRequest(registration=registration("y", "ID-Y"),
                                                   face=pb.Face(image=data), check_first=True))
    assert enrolled.HasField("quality") and enrolled.check.HasField("quality")
    assert enrolled.quality.unified == pytest.approx(checked.quality.unified)


def test_the_gate_can_be_turned_off(make_server):
    server = make_server(capture=CaptureRules(quality_gate=None))
    response = server.stub.Check(pb.CheckRequest(face=pb.Face(image=blurred_yao())))
    assert response.quality.sharpness < 35


def test_embedding_quality_is_accepted_but_checked_for_range(server):
    vector = (np.ones(512, np.float32) / np.sqrt(512)).tolist()
    quality = pb.Quality(unified=40, sharpness=10)
    response = server.stub.Check(pb.CheckRequest(face=pb.Face(
        embedding=pb.Embedding(values=vector, quality=quality))))
    assert response.verdict == pb.CLEAR  # never gated on: the gate is for photos
    assert not response.HasField("quality")
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Check(pb.CheckRequest(face=pb.Face(
            embedding=pb.Embedding(values=vector, quality=pb.Quality(unified=140)))))
    assert error.value.code() == INVALID
    assert "face.embedding.quality.unified" in error.value.details()


def scored(score: float) -> Scored:
    return Scored(1, Registration("r1", "OTHER"), score)


@pytest.mark.parametrize(("quality", "score", "verdict"), [
    (None, 0.25, Verdict.CLEAR),  # an embedding: no quality, the usual rules
    (95.0, 0.25, Verdict.CLEAR),  # a good photo
    (80.0, 0.25, Verdict.REVIEW),  # marginal, with weak evidence of a match
    (80.0, 0.10, Verdict.CLEAR),  # marginal, but nobody comes close
    (80.0, 0.45, Verdict.DUPLICATE_IDENTITY),  # the other rules come first
])
def test_a_marginal_photo_with_weak_evidence_is_reviewed(quality, score, verdict):
    result = decide(Policy(), "", [scored(score)], [], 10, quality=quality)
    assert result.verdict is verdict
    assert bool(result.matches) == (score >= (0.20 if verdict is Verdict.REVIEW else 0.30))


def test_review_quality_zero_turns_the_rule_off():
    assert decide(Policy(review_quality=0), "", [scored(0.25)], [], 10,
                  quality=1.0).verdict is Verdict.CLEAR


def test_serve_quality_flags():
    parser = build_parser()
    defaults = server_config(parser.parse_args(["serve"]))
    assert defaults.capture.quality_gate == QualityGate()
    assert defaults.policy.review_quality == 85.0
    args = parser.parse_args(["serve", "--min-quality", "60", "--quality-min", "sharpness=20",
                              "--quality-min", "embedding-norm=10", "--review-quality", "0"])
    config = server_config(args)
    assert config.capture.quality_gate == QualityGate(unified=60, sharpness=20,
                                                      embedding_norm=10)
    assert config.policy.review_quality == 0
    off = server_config(parser.parse_args(["serve", "--no-quality-gate"]))
    assert off.capture.quality_gate is None
    assert not defaults.queries.desk_embeddings
    assert not defaults.queries.desk_unchecked_enrolments
    allowed = server_config(parser.parse_args(["serve", "--allow-desk-embeddings",
                                               "--allow-unchecked-desk-enrolments"]))
    assert allowed.queries.desk_embeddings and allowed.queries.desk_unchecked_enrolments
    for bad in ("blur=3", "sharpness=x", "sharpness=120"):
        with pytest.raises(SystemExit, match="dedup: "):
            server_config(parser.parse_args(["serve", "--quality-min", bad]))


def test_dedup_quality_prints_components_and_the_gates_verdict(tmp_path, capsys):
    from dedup.cli.main import main

    blurred = tmp_path / "blurred.png"
    blurred.write_bytes(blurred_yao())
    assert main(["quality", str(YAOMING)]) == 0
    assert main(["quality", str(YAOMING), str(blurred)]) == 1
    out = capsys.readouterr().out
    assert "gate: passes" in out and "unified" in out and "sharpness" in out
    assert "gate: refused: sharpness " in out and "is below the minimum 35" in out
    assert main(["quality", "--no-quality-gate", str(blurred)]) == 0
    assert "gate: off" in capsys.readouterr().out


def test_evaluate_takes_largest_face():
    args = build_parser().parse_args(["evaluate", "--packaged-photos", "--out", "x",
                                      "--largest-face"])
    assert args.largest_face


def test_search_with_a_photo_carries_its_quality(server):
    from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

    stub = pb_grpc.InvestigateStub(server.channel)
    case = {"case_id": "CASE-1", "purpose": "quality in search"}
    found = stub.Search(pb.SearchRequest(**case, face=pb.Face(image=YAOMING.read_bytes())))
    assert found.HasField("quality") and found.quality.unified >= 75
    server.stub.Enroll(pb.EnrollRequest(registration=registration("y", "ID-Y"),
                                        face=pb.Face(image=YAOMING.read_bytes())))
    by_id = stub.Search(pb.SearchRequest(**case, registration_id="y"))
    assert not by_id.HasField("quality")


CASE = {"case_id": "CASE-Q", "purpose": "enrolment quality"}


def quality_of(message: pb.Registration) -> tuple[float | None, float | None]:
    """(quality, client_quality) of a registration, None where absent."""
    return (message.quality if message.HasField("quality") else None,
            message.client_quality if message.HasField("client_quality") else None)


def test_enrolment_quality_is_stored_and_reported(server, faces):
    """A photo's registration keeps the server's unified quality, an embedding's the
    client's word; GetRegistration, Check and Search report them, after a restart too."""
    from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

    photo = server.stub.Enroll(pb.EnrollRequest(registration=registration("photo", "ID-P"),
                                                face=pb.Face(image=YAOMING.read_bytes())))
    measured = photo.quality.unified
    assert quality_of(photo.registration) == (pytest.approx(measured), None)
    person, stranger = faces.persons(2)
    said = server.stub.Enroll(pb.EnrollRequest(
        registration=registration("said", "ID-S"), face=pb.Face(embedding=pb.Embedding(
            values=person.tolist(), quality=pb.Quality(unified=42.5, sharpness=10)))))
    assert quality_of(said.registration) == (None, 42.5)
    server.stub.Enroll(pb.EnrollRequest(registration=registration("plain", "ID-N"),
                                        face=face(stranger)))
    server.restart()  # read back from the store, not from memory
    stored = {rid: quality_of(server.stub.GetRegistration(
        pb.GetRegistrationRequest(registration_id=rid))) for rid in ("photo", "said", "plain")}
    assert stored == {"photo": (pytest.approx(measured), None), "said": (None, 42.5),
                      "plain": (None, None)}
    checked = server.stub.Check(pb.CheckRequest(face=pb.Face(image=YAOMING.read_bytes())))
    assert checked.matches[0].registration.registration_id == "photo"
    assert quality_of(checked.matches[0].registration) == (pytest.approx(measured), None)
    found = pb_grpc.InvestigateStub(server.channel).Search(
        pb.SearchRequest(**CASE, face=face(person)))
    assert found.matches[0].registration.registration_id == "said"
    assert quality_of(found.matches[0].registration) == (None, 42.5)


def test_a_client_cannot_set_the_stored_quality(server, faces):
    """Registration.quality and client_quality are the server's to set: sent in a request,
    they are ignored."""
    sent = registration("forged", "ID-F")
    sent.quality, sent.client_quality = 99.0, 98.0
    enrolled = server.stub.Enroll(pb.EnrollRequest(registration=sent,
                                                   face=face(faces.persons(1)[0])))
    assert quality_of(enrolled.registration) == (None, None)
    stored = server.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="forged"))
    assert quality_of(stored) == (None, None)


def test_store_reads_records_written_before_the_quality():
    old = b'{"r":"r1","i":"ID1","m":"","c":"","g":"","t":5,"e":"m","b":"CN=desk"}'
    assert decode_registration(old) == Registration("r1", "ID1", enrolled_at_us=5,
                                                    embedding_model="m", enrolled_by="CN=desk")
    # Without a quality a record is written exactly as before; with one it round-trips.
    assert encode_registration(decode_registration(old)) == old
    for stored in (Registration("r1", "ID1", quality=88.25),
                   Registration("r1", "ID1", client_quality=40.0),
                   Registration("r1", "ID1", quality=91.5, client_quality=12.0)):
        assert decode_registration(encode_registration(stored)) == stored


@pytest.mark.parametrize("backend", ["milvus"])
def test_milvus_collection_made_before_the_quality(make_server, faces, tmp_path, backend):
    """Milvus Lite cannot add a field: the node serves a collection made before the quality
    fields, and its registrations report no quality."""
    _make_registrations_without_quality(tmp_path / "milvus.db")
    server = make_server()
    person = faces.persons(1)[0]
    enrolled = server.stub.Enroll(pb.EnrollRequest(
        registration=registration("r-old", "ID-OLD"), face=pb.Face(embedding=pb.Embedding(
            values=person.tolist(), quality=pb.Quality(unified=42.5)))))
    assert enrolled.enrolled
    stored = server.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="r-old"))
    assert (stored.id_number, quality_of(stored)) == ("ID-OLD", (None, None))
    checked = server.stub.Check(pb.CheckRequest(face=face(person), claimed_id_number="ID-OLD"))
    assert checked.verdict == pb.SAME_PERSON


def _make_registrations_without_quality(lite: Path) -> None:
    """The registrations collection as the release before the quality fields made it."""
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri=str(lite))
    schema = client.create_schema(auto_id=False)
    schema.add_field("key", DataType.INT64, is_primary=True)
    for name, size in {"registration_id": 512, "id_number": 256, "msisdn": 128,
                       "carrier": 256, "region": 256, "embedding_model": 256,
                       "enrolled_by": 1024}.items():
        schema.add_field(name, DataType.VARCHAR, max_length=size)
    schema.add_field("enrolled_at_us", DataType.INT64)
    schema.add_field("state", DataType.INT8)
    schema.add_field("claimed_at_us", DataType.INT64)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=512)
    client.create_collection("dedup_registrations", schema=schema, consistency_level="Strong")
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="FLAT", metric_type="IP")
    client.create_index("dedup_registrations", index)
    client.close()
