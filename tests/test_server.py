"""Health, reflection, Stats and graceful shutdown of a real server."""

from __future__ import annotations

import grpc
import pytest
from conftest import enroll
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dedup import Policy
from dedup._proto.dedup.v1 import dedup_pb2 as pb


def health_status(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service)).status


def list_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))
    return {s.name for r in responses for s in r.list_services_response.service}


def test_health_serving(server):
    assert health_status(server.channel) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(server.channel, "dedup.v1.FaceDedup") == \
        health_pb2.HealthCheckResponse.SERVING


def test_reflection_on_by_default_and_can_be_turned_off(make_server, tmp_path):
    assert "dedup.v1.FaceDedup" in list_services(make_server().channel)
    quiet = make_server(reflection=False, data_dir=tmp_path / "other")
    with pytest.raises(grpc.RpcError) as error:
        list_services(quiet.channel)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_stats_reports_gallery_and_policy(make_server, faces, backend):
    server = make_server(policy=Policy(0.5, 0.25, 3))
    people = faces.persons(3)
    enroll(server.stub, "a", "ID1", people[0])
    enroll(server.stub, "b", "ID1", people[1])
    enroll(server.stub, "c", "ID2", people[2])
    stats = server.stub.Stats(pb.StatsRequest())
    assert (stats.registrations, stats.distinct_id_numbers, stats.index_vectors) == (3, 2, 3)
    assert stats.dimension == 512
    if backend == "embedded":
        assert stats.index_type == "Flat" and stats.data_dir == str(server.data_dir)
        assert stats.store_sequence == 3
    else:
        milvus = server.config.milvus
        assert stats.index_type == "milvus:FLAT" and stats.data_dir == milvus.uri
    assert stats.policy.max_sims_per_id == 3
    assert stats.policy.match_threshold == pytest.approx(0.5)
    assert stats.policy.review_threshold == pytest.approx(0.25)
    server.stub.Delete(pb.DeleteRequest(id_number="ID1"))
    stats = server.stub.Stats(pb.StatsRequest())
    assert (stats.registrations, stats.distinct_id_numbers, stats.index_vectors) == (1, 1, 1)


@pytest.mark.embedded_only(reason="the shutdown checkpoint is the embedded backend's")
def test_stop_checkpoints_and_refuses_new_calls(server, faces):
    enroll(server.stub, "a", "ID1", faces.persons(1)[0])
    server.server.stop(grace=1.0)
    assert (server.data_dir / "index.ckpt").exists()
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Stats(pb.StatsRequest(), timeout=2)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_second_server_on_same_directory_after_stop(server, faces):
    enroll(server.stub, "a", "ID1", faces.persons(1)[0])
    server.restart()
    assert server.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="a")).id_number \
        == "ID1"
