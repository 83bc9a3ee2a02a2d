"""Property-based bad input: random request fields always get a proper status, never
UNKNOWN or INTERNAL, and a refused request changes nothing. Well-known types too: every
request message holding a google.protobuf.Timestamp is fuzzed with out-of-range ones."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from conftest import RunningServer, face, registration
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, example, given, settings
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


@pytest.mark.parametrize("factory", ["IVF0,Flat", "IVF\u0664,Flat", "SignIVF1\u0660"])
def test_an_ivf_without_lists_is_refused_and_checks_go_on(fuzz_server, factory):
    """"IVF0,Flat" needed no training: it was built and served, and every later search
    failed with INTERNAL (found by test_rebuild_fuzzed's examples)."""
    admin = pb_grpc.IndexAdminStub(fuzz_server.channel)
    with pytest.raises(grpc.RpcError) as refused:
        list(admin.Rebuild(pb.RebuildRequest(index_factory=factory), timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "index_factory" in refused.value.details()
    fuzz_server.stub.Check(pb.CheckRequest(claimed_id_number="ID0", face=face(
        FaceGenerator(3).persons(1)[0])), timeout=30)


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


# -- Any request message, from its descriptor, with well-known types -----------------------

TIMESTAMP = Timestamp.DESCRIPTOR.full_name
SECONDS_MIN, SECONDS_MAX = -62_135_596_800, 253_402_300_799  # 0001-01-01 .. 9999-12-31
INT32, INT64 = 2**31, 2**63

timestamps = st.builds(
    lambda seconds, nanos: Timestamp(seconds=seconds, nanos=nanos),
    st.one_of(st.integers(SECONDS_MIN, SECONDS_MAX),
              st.sampled_from([SECONDS_MIN - 1, SECONDS_MAX + 1, -INT64, INT64 - 1]),
              st.integers(-INT64, INT64 - 1)),
    st.one_of(st.integers(0, 999_999_999),
              st.sampled_from([-1, 1_000_000_000, INT32 - 1, -INT32]),
              st.integers(-INT32, INT32 - 1)),
)
# Message types with their own strategy; any other is built field by field.
KNOWN_MESSAGES: dict[str, st.SearchStrategy[Any]] = {
    TIMESTAMP: timestamps,
    pb.Face.DESCRIPTOR.full_name: faces.filter(lambda f: f is not None),
}
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.CPPTYPE_INT32: st.integers(-INT32, INT32 - 1),
    FieldDescriptor.CPPTYPE_INT64: st.integers(-INT64, INT64 - 1),
    FieldDescriptor.CPPTYPE_UINT32: st.one_of(st.integers(0, 20), st.integers(0, 2**32 - 1)),
    FieldDescriptor.CPPTYPE_UINT64: st.one_of(st.integers(0, 20), st.integers(0, 2**64 - 1)),
    FieldDescriptor.CPPTYPE_FLOAT: floats,
    FieldDescriptor.CPPTYPE_DOUBLE: st.floats(),
    FieldDescriptor.CPPTYPE_BOOL: st.booleans(),
}


def holds_timestamp(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of this type can carry a Timestamp, at any depth."""
    if descriptor.full_name == TIMESTAMP:
        return True
    return any(field.message_type is not None and field.message_type.full_name not in seen
               and holds_timestamp(field.message_type, seen | {descriptor.full_name})
               for field in descriptor.fields)


def field_values(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        known = KNOWN_MESSAGES.get(field.message_type.full_name)
        one = known if known is not None else mutations(
            message_factory.GetMessageClass(field.message_type)())
    elif field.type == FieldDescriptor.TYPE_ENUM:
        one = st.one_of(st.sampled_from([value.number for value in field.enum_type.values]),
                        st.integers(-INT32, INT32 - 1))  # proto3 enums are open
    elif field.type == FieldDescriptor.TYPE_BYTES:
        one = st.binary(max_size=300)
    elif field.type == FieldDescriptor.TYPE_STRING:
        one = texts
    else:
        one = SCALARS[field.cpp_type]
    return st.lists(one, max_size=4) if field.is_repeated else one


def sometimes(values: st.SearchStrategy[Any], one_in: int) -> st.SearchStrategy[Any]:
    return st.integers(1, one_in).flatmap(lambda n: values if n == 1 else st.none())


def mutations(base: Message) -> st.SearchStrategy[Message]:
    """`base` with random values of their type in some fields: most examples keep a field as
    it was, except Timestamps, set in half of them at any depth (the fields around them keep
    `base`'s values, so the request gets as far as the timestamps)."""
    changes: dict[str, st.SearchStrategy[Any]] = {}
    for field in base.DESCRIPTOR.fields:
        kind = field.message_type
        if kind is not None and kind.full_name == TIMESTAMP and not field.is_repeated:
            changes[field.name] = sometimes(timestamps, 2)
        elif (kind is not None and not field.is_repeated and kind.full_name not in
              KNOWN_MESSAGES and holds_timestamp(kind)):
            changes[field.name] = mutations(getattr(base, field.name))
        else:
            changes[field.name] = sometimes(field_values(field), 4)
    return st.fixed_dictionaries(changes).map(lambda values: changed(base, values))


def changed(base: Message, values: dict[str, Any]) -> Message:
    message = type(base)()
    message.CopyFrom(base)
    for name, value in values.items():
        if value is None:
            continue
        field = base.DESCRIPTOR.fields_by_name[name]
        message.ClearField(name)
        target = getattr(message, name)
        if field.is_repeated and field.message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        elif field.is_repeated:
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def out_of_range_timestamp(message: Message) -> bool:
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for item in value if field.is_repeated else [value]:
            if field.message_type.full_name == TIMESTAMP:
                if not (0 <= item.nanos <= 999_999_999
                        and SECONDS_MIN <= item.seconds <= SECONDS_MAX):
                    return True
            elif out_of_range_timestamp(item):
                return True
    return False


# Valid requests the mutations start from, so that most get past the other fields' checks.
BASES: dict[str, Message] = {
    "dedup.v1.SearchRequest": pb.SearchRequest(case_id="case-1", purpose="fuzzing",
                                               registration_id="r0"),
    "dedup.v1.EnrollRequest": pb.EnrollRequest(
        registration=registration("fz-new", "ID-fz"), face=face(FaceGenerator(8).persons(1)[0])),
}
TIMESTAMP_METHODS = [method for _, method in METHODS if holds_timestamp(method.input_type)]


def timestamp_requests(method: MethodDescriptor) -> st.SearchStrategy[tuple[Any, Message]]:
    base = BASES.get(method.input_type.full_name) or message_factory.GetMessageClass(
        method.input_type)()
    return st.tuples(st.just(method), mutations(base))


def send(channel: grpc.Channel, method: MethodDescriptor, request: Message) -> list[Message]:
    path = f"/{method.containing_service.full_name}/{method.name}"
    codec = {"request_serializer": type(request).SerializeToString,
             "response_deserializer":
                 message_factory.GetMessageClass(method.output_type).FromString}
    if method.client_streaming:
        return list(channel.stream_stream(path, **codec)(iter([request]), timeout=60))
    if method.server_streaming:
        return list(channel.unary_stream(path, **codec)(request, timeout=60))
    return [channel.unary_unary(path, **codec)(request, timeout=60)]


def in_band_error(reply: Message) -> bool:
    """A streamed reply that reports its request's failure (EnrollStream's `error`)."""
    return "error" in reply.DESCRIPTOR.fields_by_name and reply.HasField("error")


def test_the_timestamp_fuzzing_covers_every_request_with_a_timestamp():
    assert {method.name for method in TIMESTAMP_METHODS} >= {"Search", "Enroll", "EnrollStream"}


SEARCH = pb.DESCRIPTOR.services_by_name["Investigate"].methods_by_name["Search"]
ENROLL = pb.DESCRIPTOR.services_by_name["FaceDedup"].methods_by_name["Enroll"]


@FUZZ
@given(case=st.sampled_from(TIMESTAMP_METHODS).flatmap(timestamp_requests))
@example(case=(SEARCH, changed(BASES["dedup.v1.SearchRequest"],
                               {"enrolled_from": Timestamp(nanos=-1)})))
@example(case=(SEARCH, changed(BASES["dedup.v1.SearchRequest"],
                               {"enrolled_until": Timestamp(seconds=SECONDS_MAX + 1)})))
@example(case=(ENROLL, changed(BASES["dedup.v1.EnrollRequest"], {"registration": changed(
    BASES["dedup.v1.EnrollRequest"].registration, {"enrolled_at": Timestamp(nanos=INT32 - 1)})})))
def test_out_of_range_timestamps_are_refused_and_change_nothing(fuzz_server, case):
    method, request = case
    before = fuzz_server.stub.Stats(pb.StatsRequest())
    try:
        replies: list[Message] | None = send(fuzz_server.channel, method, request)
    except grpc.RpcError as error:
        assert error.code() in PROPER, f"{method.name}: {error.code()}: {error.details()}"
        assert error.details()
        replies = None
    for reply in replies or []:
        if in_band_error(reply):
            assert reply.error.code in {code.name for code in PROPER}, reply.error
    if out_of_range_timestamp(request):
        assert replies is None or all(in_band_error(reply) for reply in replies), replies
        after = fuzz_server.stub.Stats(pb.StatsRequest())
        assert (after.registrations, after.store_sequence) == (before.registrations,
                                                               before.store_sequence)
    for reply in replies or []:
        if getattr(reply, "enrolled", False):
            fuzz_server.stub.Delete(pb.DeleteRequest(
                registration_id=reply.registration.registration_id))
