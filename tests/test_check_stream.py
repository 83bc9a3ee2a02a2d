"""CheckStream answers each request as Check would, in order, on one call: the same verdicts,
the same refusals (in the item's place, the stream going on), the same masking, rate limit
and audit by role. Real TLS, keys from `dedup keys`, both backends."""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from conftest import DESKS_SEND_EMBEDDINGS, enroll, face, registration
from metrics import scrape, value
from secure import channel, secured
from trail import records

from dedup import FaceGenerator
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.api.auth import allowed
from dedup.core.security import Token, load_security
from dedup.core.settings import QueryLimits

CASE = (("x-case-id", "CASE-21"), ("x-purpose", "ring review"))
SHUTDOWN = ("a stream's end at a stop is the gRPC layer's, between two items; the enrolment "
            "stream's test below shows what each backend stored")


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


def test_items_are_counted_by_their_status(make_server, faces):
    server = make_server(metrics_address="127.0.0.1:0")
    person = faces.persons(1)[0]
    good = pb.CheckRequest(face=face(person), claimed_id_number="ID0")
    replies = list(server.stub.CheckStream(iter([good, pb.CheckRequest(), good]), timeout=30))
    assert [reply.error.code for reply in replies] == ["", "INVALID_ARGUMENT", ""]
    samples = scrape(server.server.metrics_port)
    assert value(samples, "dedup_stream_items_total", method="CheckStream", status="OK") == 2
    assert value(samples, "dedup_stream_items_total", method="CheckStream",
                 status="INVALID_ARGUMENT") == 1
    assert value(samples, "dedup_verdicts_total", verdict="CLEAR") == 2


def test_desks_stream_photos_and_not_embeddings_by_default(make_server, keys, faces, crops):
    server = secured(make_server, keys, queries=QueryLimits())  # the defaults
    photo = pb.Face(image=crops["t1"][0].path.read_bytes())
    with channel(server.port, keys, role="registration") as desk:
        by_photo, by_embedding = pb_grpc.FaceDedupStub(desk).CheckStream(iter([
            pb.CheckRequest(face=photo, claimed_id_number="ID-1"),
            pb.CheckRequest(face=face(faces.persons(1)[0]), claimed_id_number="ID-1")]),
            timeout=60)
    assert by_photo.verdict == pb.CLEAR and by_photo.quality.unified > 0
    assert by_photo.detected_face.detection_score > 0.5
    assert by_embedding.error.code == "PERMISSION_DENIED"
    assert "face.embedding" in by_embedding.error.message


def test_a_token_that_expires_mid_stream_ends_it(make_server, keys, faces, monkeypatch):
    """Every item is a request: one taken after its caller's token expired is refused, as a
    new call with that token would be, and the stream ends."""
    security = load_security(keys / "security.toml")
    secret = "brief-desk-secret"
    expires = datetime.now(UTC) + timedelta(hours=1)
    brief = Token("brief", "registration", hashlib.sha256(secret.encode()).digest(), expires)
    server = make_server(security=dataclasses.replace(security,
                                                      tokens=(*security.tokens, brief)))
    request = pb.CheckRequest(face=face(faces.persons(1)[0]), claimed_id_number="ID-1")
    outbox: queue.SimpleQueue[pb.CheckRequest | None] = queue.SimpleQueue()
    with channel(server.server.token_port, keys, token=secret) as desk:
        responses = pb_grpc.FaceDedupStub(desk).CheckStream(iter(outbox.get, None),
                                                            timeout=30)
        outbox.put(request)
        assert next(responses).verdict == pb.CLEAR
        monkeypatch.setattr("dedup.api.calls.datetime", _TwoHoursOn)  # the server's clock
        outbox.put(request)
        with pytest.raises(grpc.RpcError) as error:
            next(responses)
        outbox.put(None)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token:brief" in error.value.details() and "expired" in error.value.details()


@pytest.mark.embedded_only(reason="the write's bound lives in the gRPC layer; Milvus Lite checks "
                            "too slowly to fill the client's window in the test's time")
def test_a_client_that_reads_no_answers_is_cut_off(make_server, faces):
    """A stream's answers wait in the client's flow-control window; one that reads none for
    stream_idle_timeout_s ends, rather than hold its call and its read-ahead for ever."""
    server = make_server(stream_idle_timeout_s=1.0, metrics_address="127.0.0.1:0")
    person = faces.persons(1)[0]
    list(server.stub.EnrollStream(iter([pb.EnrollRequest(
        registration=registration(f"r{i}", f"ID{i}"), face=face(person)) for i in range(100)]),
        timeout=60))
    request = pb.CheckRequest(face=face(person), claimed_id_number="ID-X", max_candidates=100)
    assert server.stub.Check(request, timeout=30).ByteSize() > 8000
    responses = server.stub.CheckStream(iter([request] * 3000), timeout=120)
    # Reading nothing until the server gives up: 3,000 answers of 8 KB overflow the window.
    deadline = time.monotonic() + 100
    while value(scrape(server.server.metrics_port), "dedup_calls_refused_total",
                reason="stream_unread") < 1:
        assert time.monotonic() < deadline, "the server still waits for the client to read"
        time.sleep(0.5)
    read = 0
    with pytest.raises(grpc.RpcError) as error:
        for _ in responses:
            read += 1
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "read no response" in error.value.details()
    assert read < 3000
    assert server.stub.Check(request, timeout=30).matches  # served on


@pytest.mark.one_backend(reason=SHUTDOWN)
def test_a_stream_open_at_shutdown_ends_unavailable_after_half_the_grace(make_server, faces):
    """A registration service's stream never ends on its own. Stopping, the server takes its
    items for the first half of the grace period, then ends it between two items with
    UNAVAILABLE: every item answered is done and the client knows which to send again
    elsewhere, instead of the whole stream cancelled when the grace runs out."""
    server = make_server(shutdown_grace_s=12.0)
    person = faces.persons(1)[0]
    enroll(server.stub, "r0", "ID0", person)
    request = pb.CheckRequest(face=face(faces.capture(person, 0.3)), claimed_id_number="ID0")
    outbox: queue.SimpleQueue[pb.CheckRequest | None] = queue.SimpleQueue()
    responses = server.stub.CheckStream(iter(outbox.get, None), timeout=60)
    outbox.put(request)
    assert next(responses).verdict == pb.SAME_PERSON
    stopping = threading.Thread(target=server.server.stop)
    started = time.monotonic()
    stopping.start()
    answered = 0
    with pytest.raises(grpc.RpcError) as ended:
        while True:
            outbox.put(request)  # one item at a time, each answered before the next
            assert next(responses).verdict == pb.SAME_PERSON
            answered += 1
            time.sleep(0.1)
    ended_after = time.monotonic() - started
    outbox.put(None)
    stopping.join(30)
    assert not stopping.is_alive()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in ended.value.details()
    assert answered >= 5  # items were still taken in the first half
    assert ended_after < 10.0  # not cut off when the grace ran out


def test_an_enrolment_stream_cut_by_a_stop_stored_exactly_what_it_acknowledged(
        make_server, faces):
    """An import still streaming when the server stops: the stream ends between two items,
    so the registrations acknowledged are the ones stored, and the client sends the rest
    again (items read ahead but not taken are not enrolled)."""
    server = make_server(shutdown_grace_s=6.0)
    people = faces.persons(400)

    def paced() -> Iterator[pb.EnrollRequest]:
        for i, person in enumerate(people):
            yield pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"),
                                   face=face(person))
            time.sleep(0.02)

    replies = server.stub.EnrollStream(paced(), timeout=60)
    acknowledged = [next(replies).registration.registration_id]
    stopping = threading.Thread(target=server.server.stop)
    stopping.start()
    with pytest.raises(grpc.RpcError) as ended:
        for reply in replies:
            assert reply.enrolled
            acknowledged.append(reply.registration.registration_id)
    stopping.join(30)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"after {len(acknowledged)} answered" in ended.value.details()
    assert len(acknowledged) < len(people)
    server.restart()
    stored = [server.stub.GetRegistration(pb.GetRegistrationRequest(registration_id=f"r{i}"),
                                          timeout=30).registration_id
              for i in range(len(acknowledged))]
    assert stored == acknowledged == [f"r{i}" for i in range(len(acknowledged))]
    assert server.stub.Stats(pb.StatsRequest(), timeout=30).registrations == len(acknowledged)


@pytest.mark.one_backend(reason=SHUTDOWN)
def test_an_idle_stream_ends_at_half_the_grace_of_a_stop(make_server, faces):
    """A stream waiting for its client's next item is ended too, not waited for."""
    server = make_server(shutdown_grace_s=12.0)
    outbox: queue.SimpleQueue[pb.CheckRequest | None] = queue.SimpleQueue()
    responses = server.stub.CheckStream(iter(outbox.get, None), timeout=60)
    outbox.put(pb.CheckRequest(face=face(faces.persons(1)[0]), claimed_id_number="ID0"))
    assert next(responses).verdict == pb.CLEAR
    started = time.monotonic()
    server.server.stop()
    stopped_after = time.monotonic() - started
    with pytest.raises(grpc.RpcError) as ended:
        next(responses)
    outbox.put(None)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in ended.value.details()
    assert stopped_after < 10.0


class _TwoHoursOn(datetime):
    """A clock two hours ahead, for what the server reads of it."""

    @classmethod
    def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
        return datetime.now(tz) + timedelta(hours=2)
