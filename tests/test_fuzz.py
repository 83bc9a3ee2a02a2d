"""Property-based bad input: random request fields always get a proper status, never
UNKNOWN or INTERNAL, and a refused request changes nothing."""

from __future__ import annotations

import grpc
import pytest
from conftest import RunningServer, face, registration
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup import FaceGenerator, ServerConfig, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

PROPER = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
          grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS}
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
embeddings = st.one_of(
    st.lists(floats, max_size=600),
    st.lists(floats, min_size=512, max_size=512),
)
faces = st.one_of(
    st.none(),
    st.builds(lambda v, m: pb.Face(embedding=pb.Embedding(values=v, model=m)), embeddings,
              st.sampled_from(["", "some-other-model"])),
    st.builds(lambda b, large: pb.Face(image=b, use_largest_face=large),
              st.one_of(st.binary(max_size=3000),
                        st.binary(max_size=200).map(lambda b: b"\xff\xd8\xff" + b),
                        st.binary(max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b)),
              st.booleans()),
)
texts = st.one_of(st.text(max_size=140), st.sampled_from(["", " ID", "ID\n1", "r0", "ID0"]),
                  st.integers(1_000, 200_000).map(lambda n: "9" * n))  # huge


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    server = RunningServer(ServerConfig(store=StoreConfig(
        data_dir=tmp_path_factory.mktemp("fuzz") / "data")))
    for i, person in enumerate(FaceGenerator(3).persons(5)):
        server.stub.Enroll(pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"),
                                            face=face(person)))
    yield server
    server.stop()


def call(method, request):
    try:
        return method(request, timeout=30), None
    except grpc.RpcError as error:
        assert error.code() in PROPER, f"{error.code()}: {error.details()}"
        assert error.details()
        return None, error


@FUZZ
@given(face_=faces, claimed=texts, limit=st.integers(0, 2**32 - 1))
def test_check_fuzzed(fuzz_server, face_, claimed, limit):
    request = pb.CheckRequest(claimed_id_number=claimed, max_candidates=limit)
    if face_ is not None:
        request.face.CopyFrom(face_)
    call(fuzz_server.stub.Check, request)


@FUZZ
@given(face_=faces, registration_id=texts, id_number=texts, msisdn=texts, label=texts,
       check_first=st.booleans())
def test_enroll_fuzzed_refusals_change_nothing(fuzz_server, face_, registration_id, id_number,
                                               msisdn, label, check_first):
    request = pb.EnrollRequest(registration=pb.Registration(
        registration_id=registration_id, id_number=id_number, msisdn=msisdn, carrier=label,
        region=label), check_first=check_first)
    if face_ is not None:
        request.face.CopyFrom(face_)
    before = fuzz_server.stub.Stats(pb.StatsRequest())
    response, error = call(fuzz_server.stub.Enroll, request)
    after = fuzz_server.stub.Stats(pb.StatsRequest())
    if error is not None or not response.enrolled:
        assert after == before
    else:
        assert after.registrations == before.registrations + 1
        fuzz_server.stub.Delete(pb.DeleteRequest(registration_id=registration_id))


@FUZZ
@given(key=st.sampled_from(["registration_id", "id_number", "msisdn", None]), value=texts)
def test_delete_and_get_fuzzed(fuzz_server, key, value):
    before = fuzz_server.stub.Stats(pb.StatsRequest())
    request = pb.DeleteRequest(**({key: value} if key else {}))
    if value in ("r0", "ID0"):
        return  # a real key: deleting it is not bad input
    _, error = call(fuzz_server.stub.Delete, request)
    assert error is not None
    assert fuzz_server.stub.Stats(pb.StatsRequest()) == before
    call(fuzz_server.stub.GetRegistration, pb.GetRegistrationRequest(registration_id=value))


@FUZZ
@given(factory=st.one_of(texts, st.sampled_from(["IVF", "IVF0,Flat", "PQ7", "BinarySign3",
                                                  "IVF99999999,Flat", "OPQ3,IVF4,PQ5"])))
def test_rebuild_fuzzed(fuzz_server, factory):
    admin = pb_grpc.IndexAdminStub(fuzz_server.channel)
    before = fuzz_server.stub.Stats(pb.StatsRequest())
    try:
        list(admin.Rebuild(pb.RebuildRequest(index_factory=factory), timeout=60))
    except grpc.RpcError as error:
        assert error.code() in PROPER, f"{error.code()}: {error.details()}"
        assert "index_factory" in error.details()
    after = fuzz_server.stub.Stats(pb.StatsRequest())
    assert (after.registrations, after.index_vectors) == (before.registrations,
                                                          before.index_vectors)


METHODS = [(service, method) for service in pb.DESCRIPTOR.services_by_name.values()
           for method in service.methods]


def send_raw(channel: grpc.Channel, service, method, data: bytes) -> None:
    path = f"/{service.full_name}/{method.name}"
    if method.client_streaming:
        list(channel.stream_stream(path)(iter([data]), timeout=60))
    elif method.server_streaming:
        list(channel.unary_stream(path)(data, timeout=60))
    else:
        channel.unary_unary(path)(data, timeout=60)


@FUZZ
@given(method=st.sampled_from(METHODS),
       data=st.one_of(st.binary(max_size=2000),
                      st.sampled_from([b"\x0a\x05\xff\xfe\xfd\xfc\xfb",  # bad UTF-8 string
                                       b"\x0a\xff\xff\xff\xff\x0f",      # length past the end
                                       b"\x08", b"\xff" * 16])))
def test_random_bytes_on_the_wire(fuzz_server, method, data):
    service, rpc = method
    before = fuzz_server.stub.Stats(pb.StatsRequest())
    try:
        send_raw(fuzz_server.channel, service, rpc, data)
    except grpc.RpcError as error:
        assert error.code() in PROPER, f"{rpc.name}: {error.code()}: {error.details()}"
        assert error.details()
    after = fuzz_server.stub.Stats(pb.StatsRequest())
    assert (after.registrations, after.store_sequence) == (before.registrations,
                                                           before.store_sequence)


def test_undecodable_request_names_the_message(fuzz_server):
    with pytest.raises(grpc.RpcError) as caught:
        send_raw(fuzz_server.channel, pb.DESCRIPTOR.services_by_name["FaceDedup"],
                 pb.DESCRIPTOR.services_by_name["FaceDedup"].methods_by_name["Check"],
                 b"\x0a\xff\xff\xff\xff\x0f")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dedup.v1.CheckRequest" in caught.value.details()


enroll_requests = st.builds(
    lambda face_, registration_id, id_number, check_first: pb.EnrollRequest(
        registration=pb.Registration(registration_id=registration_id, id_number=id_number),
        face=face_, check_first=check_first),
    st.one_of(faces.filter(lambda f: f is not None)), texts, texts, st.booleans())


@FUZZ
@given(requests=st.lists(enroll_requests, min_size=1, max_size=4))
def test_enroll_stream_fuzzed(fuzz_server, requests):
    before = fuzz_server.stub.Stats(pb.StatsRequest())
    replies = list(fuzz_server.stub.EnrollStream(iter(requests), timeout=60))
    assert len(replies) == len(requests)  # one reply per request, in order
    enrolled = [reply.registration.registration_id for reply in replies if reply.enrolled]
    for reply in replies:
        if not reply.enrolled and reply.error.code:
            assert reply.error.code in {code.name for code in PROPER}, reply.error
            assert reply.error.message
    after = fuzz_server.stub.Stats(pb.StatsRequest())
    assert after.registrations == before.registrations + len(enrolled)
    for registration_id in enrolled:
        fuzz_server.stub.Delete(pb.DeleteRequest(registration_id=registration_id))
