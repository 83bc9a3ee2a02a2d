"""The quality gate in the server, quality in responses, quality-aware verdicts, the flags."""

from __future__ import annotations

import cv2
import grpc
import numpy as np
import pytest
from conftest import registration
from photos import YAOMING, encode

from dedup import Policy
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.cli.main import build_parser
from dedup.cli.serve import server_config
from dedup.core.policy import Scored, decide
from dedup.core.records import Registration, Verdict
from dedup.core.settings import CaptureRules, QualityGate

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
