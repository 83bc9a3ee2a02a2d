"""Deadlines, the concurrent-call limit and message size limits, on a real server."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import check, enroll
from metrics import scrape, value
from photos import YAOMING

from dedup._proto.dedup.v1 import dedup_pb2 as pb


def photo_check(stub, data: bytes, timeout: float) -> grpc.StatusCode:
    try:
        stub.Check(pb.CheckRequest(face=pb.Face(image=data)), timeout=timeout)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def samples_counting(server, answered: int) -> dict:
    """The metrics once the embedding worker has counted the `answered` photos (it counts a
    photo just after answering it), or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(server.server.metrics_port)
        if (value(samples, "dedup_photos_embedded_total") >= answered
                or time.monotonic() > deadline):
            return samples
        time.sleep(0.05)


def test_deadline_passed_while_queued_abandons_the_work(make_server):
    # One worker embedding one photo at a time: a queue forms, deadlines pass in it.
    server = make_server(embed_workers=1, embed_batch=1, metrics_address="127.0.0.1:0")
    data = YAOMING.read_bytes()
    assert photo_check(server.stub, data, timeout=60) == grpc.StatusCode.OK  # warm
    started = time.monotonic()
    assert photo_check(server.stub, data, timeout=60) == grpc.StatusCode.OK
    # Deadlines of four photos' time: long enough for each call to queue its photo on a
    # loaded machine (at 0.1 s most of them did not get so far), short for the 12 queued.
    deadline = max(0.1, 4 * (time.monotonic() - started))
    calls = 12
    with ThreadPoolExecutor(calls) as pool:
        codes = list(pool.map(lambda _: photo_check(server.stub, data, deadline), range(calls)))
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) >= 1
    assert photo_check(server.stub, data, timeout=60) == grpc.StatusCode.OK  # still serving
    alone = 3  # the warm, timed and last checks, each sent on its own with 60 s
    answered = codes.count(grpc.StatusCode.OK) + alone
    samples = samples_counting(server, answered)
    embedded = value(samples, "dedup_photos_embedded_total")
    abandoned = value(samples, "dedup_photos_abandoned_total")
    assert abandoned >= 1, "no queued photo was skipped after its deadline"
    # Every answered photo was embedded, and no photo was counted twice. A call whose
    # deadline passed before its photo was queued (on a loaded machine) is in neither count.
    assert answered <= embedded and embedded + abandoned <= calls + alone
    assert value(samples, "dedup_requests_total", method="Check",
                 status="DEADLINE_EXCEEDED") >= 1


def test_full_concurrency_limit_refuses_at_once(make_server, faces):
    server = make_server(max_concurrent_rpcs=2)
    release = threading.Event()

    def held_open():
        yield pb.EnrollRequest()  # answered with an error item: proof the call is running
        release.wait(30)

    streams = [server.stub.EnrollStream(held_open()) for _ in range(2)]
    for stream in streams:
        assert next(stream).error.code == "INVALID_ARGUMENT"
    try:
        with pytest.raises(grpc.RpcError) as refused:
            # A deadline far away: queued, the call would wait; refused, it fails at once.
            server.stub.Stats(pb.StatsRequest(), timeout=20)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release.set()
        for stream in streams:
            assert list(stream) == []
    first, second = faces.persons(2)
    enroll(server.stub, "r1", "ID1", first)
    assert check(server.stub, second).verdict == pb.CLEAR


def test_message_size_limit_enforced(make_server):
    server = make_server(max_message_bytes=1 << 20)
    with pytest.raises(grpc.RpcError) as too_big:
        server.stub.Check(pb.CheckRequest(face=pb.Face(image=b"\xff\xd8\xff" + bytes(2 << 20))))
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in too_big.value.details()
    assert server.stub.Stats(pb.StatsRequest()).registrations == 0


def test_default_message_limit_admits_the_largest_photo(server):
    # An 8 MiB photo (the capture limit) must reach the capture rules, not be cut off by gRPC.
    limit = server.config.capture.max_image_bytes
    assert server.config.max_message_bytes > limit
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Check(pb.CheckRequest(face=pb.Face(image=b"\xff\xd8\xff" + bytes(limit))))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "face.image" in refused.value.details()
