"""Timestamps in requests: one outside google.protobuf.Timestamp's range (nanos outside
0..999,999,999, seconds outside 0001-01-01..9999-12-31) is INVALID_ARGUMENT naming its field,
and the refused call changes nothing and writes no audit record."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import RunningServer, face, registration
from google.protobuf.timestamp_pb2 import Timestamp
from trail import records

from dedup import FaceGenerator, ServerConfig, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

SECONDS_MIN = -62_135_596_800  # 0001-01-01T00:00:00Z
SECONDS_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z
INT64_MAX = 2**63 - 1

OUT_OF_RANGE = [
    pytest.param(Timestamp(nanos=-1), "nanos must be 0..999,999,999, got -1", id="nanos=-1"),
    pytest.param(Timestamp(nanos=2**31 - 1), "nanos must be 0..999,999,999, got 2147483647",
                 id="nanos=int32-max"),
    pytest.param(Timestamp(nanos=-(2**31)), "got -2147483648", id="nanos=int32-min"),
    pytest.param(Timestamp(seconds=100, nanos=1_000_000_000), "got 1000000000",
                 id="nanos=1e9"),
    pytest.param(Timestamp(seconds=SECONDS_MAX + 1), f"seconds must be {SECONDS_MIN:,}..",
                 id="seconds=year-10000"),
    pytest.param(Timestamp(seconds=SECONDS_MIN - 1), f"got {SECONDS_MIN - 1}",
                 id="seconds=year-0"),
    pytest.param(Timestamp(seconds=INT64_MAX), f"got {INT64_MAX}", id="seconds=int64-max"),
    pytest.param(Timestamp(seconds=-INT64_MAX - 1), f"got {-INT64_MAX - 1}",
                 id="seconds=int64-min"),
]


def start(data_dir: Path) -> RunningServer:
    server = RunningServer(ServerConfig(store=StoreConfig(data_dir=data_dir)))
    for i, person in enumerate(FaceGenerator(5).persons(3)):
        server.stub.Enroll(pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"),
                                            face=face(person)))
    return server


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start(tmp_path_factory.mktemp("timestamps") / "data")
    yield server
    server.stop()


def search(field: str, stamp: Timestamp) -> pb.SearchRequest:
    request = pb.SearchRequest(case_id="case-1", purpose="fraud review", registration_id="r0")
    getattr(request, field).CopyFrom(stamp)
    return request


def state(server: RunningServer) -> tuple[int, int]:
    stats = server.stub.Stats(pb.StatsRequest())
    return stats.registrations, stats.store_sequence


@pytest.mark.parametrize("field", ["enrolled_from", "enrolled_until"])
@pytest.mark.parametrize(("stamp", "problem"), OUT_OF_RANGE)
def test_search_with_an_out_of_range_timestamp_is_invalid_argument(running, field, stamp,
                                                                   problem):
    before = state(running)
    with pytest.raises(grpc.RpcError) as caught:
        pb_grpc.InvestigateStub(running.channel).Search(search(field, stamp), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith(f"{field}: ")
    assert problem in caught.value.details()
    assert state(running) == before


def test_search_accepts_the_first_and_last_instants(running):
    request = search("enrolled_from", Timestamp(seconds=SECONDS_MIN))
    request.enrolled_until.CopyFrom(Timestamp(seconds=SECONDS_MAX, nanos=999_999_999))
    found = pb_grpc.InvestigateStub(running.channel).Search(request, timeout=30)
    assert {m.registration.registration_id for m in found.matches} == {"r1", "r2"}


def test_a_refused_search_is_audited_as_refused_and_returns_nothing(tmp_path):
    # Every investigator read is audited, refusals included (issue 13, finding 3).
    server = start(tmp_path / "data")
    investigate = pb_grpc.InvestigateStub(server.channel)
    refused = 0
    for field in ("enrolled_from", "enrolled_until"):
        for case in OUT_OF_RANGE:
            with pytest.raises(grpc.RpcError):
                investigate.Search(search(field, case.values[0]), timeout=30)
            refused += 1
    server.stop()
    searches = [r for r in records(tmp_path / "data") if r["method"] == "Investigate.Search"]
    assert len(searches) == refused
    assert all(r["query"]["outcome"] == "INVALID_ARGUMENT" and r["returned"] == []
               for r in searches)


@pytest.mark.parametrize(("stamp", "problem"), OUT_OF_RANGE)
def test_enroll_with_an_out_of_range_enrolled_at_is_invalid_argument(running, stamp, problem):
    request = pb.EnrollRequest(registration=registration("new", "ID-new"),
                               face=face(FaceGenerator(9).persons(1)[0]))
    request.registration.enrolled_at.CopyFrom(stamp)
    before = state(running)
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.Enroll(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith("registration.enrolled_at: ")
    assert problem in caught.value.details()
    [reply] = running.stub.EnrollStream(iter([request]), timeout=30)
    assert not reply.enrolled
    assert reply.error.code == "INVALID_ARGUMENT"
    assert reply.error.message.startswith("registration.enrolled_at: ")
    assert state(running) == before


def test_a_valid_enrolled_at_from_the_client_is_ignored(running):
    request = pb.EnrollRequest(registration=registration("own-time", "ID-own"),
                               face=face(FaceGenerator(11).persons(1)[0]))
    request.registration.enrolled_at.CopyFrom(Timestamp(seconds=SECONDS_MIN))
    reply = running.stub.Enroll(request, timeout=30)
    assert reply.enrolled
    assert reply.registration.enrolled_at.seconds > 1_600_000_000  # the server's clock
    running.stub.Delete(pb.DeleteRequest(registration_id="own-time"))
