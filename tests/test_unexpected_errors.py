"""A fault the code did not foresee (a bug, a library's surprise) in a call's work: the caller
gets INTERNAL with nothing of the fault's text, the log gets the traceback, and the server
serves on: the worker that ran it, the stream it happened in, the next calls."""

from __future__ import annotations

import logging

import grpc
import pytest
from conftest import enroll, face

from dedup._proto.dedup.v1 import dedup_pb2 as pb

SECRET = "a-detail-of-the-fault-no-caller-should-read"


def failing_once(real):  # type: ignore[no-untyped-def]
    calls = []

    def check(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(SECRET)
        return real(*args, **kwargs)

    return check


def test_a_check_that_fails_unexpectedly_is_internal_and_the_server_serves_on(
        server, faces, monkeypatch, caplog):
    person = faces.persons(1)[0]
    enroll(server.stub, "r0", "ID0", person)
    request = pb.CheckRequest(face=face(faces.capture(person, 0.3)), claimed_id_number="ID0")
    service = server.server.service
    monkeypatch.setattr(service, "check", failing_once(service.check))
    with caplog.at_level(logging.ERROR, logger="dedup.server"), \
            pytest.raises(grpc.RpcError) as failed:
        server.stub.Check(request, timeout=30)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details() == "Check: internal error"
    assert any(SECRET in record.getMessage() or (record.exc_info and
               SECRET in str(record.exc_info[1])) for record in caplog.records)
    # it serves on: more calls than its pool has workers
    for _ in range(server.config.max_workers + 1):
        assert server.stub.Check(request, timeout=30).verdict == pb.SAME_PERSON


def test_a_stream_item_that_fails_unexpectedly_is_answered_internal_and_the_stream_goes_on(
        server, faces, monkeypatch):
    person = faces.persons(1)[0]
    enroll(server.stub, "r0", "ID0", person)
    request = pb.CheckRequest(face=face(faces.capture(person, 0.3)), claimed_id_number="ID0")
    service = server.server.service
    monkeypatch.setattr(service, "check", failing_once(service.check))
    first, second, third = server.stub.CheckStream(iter([request] * 3), timeout=30)
    assert first == pb.CheckResponse(error=pb.StreamError(code="INTERNAL",
                                                          message="internal error"))
    assert second.verdict == third.verdict == pb.SAME_PERSON
    assert SECRET not in str(first)
