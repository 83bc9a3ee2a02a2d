"""Denial of service: what callers without credentials, stalled callers and one greedy caller
can hold, on a real secured server (mutual TLS and bearer tokens from `dedup keys`)."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import DESKS_SEND_EMBEDDINGS, face, registration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from metrics import scrape, value
from photos import YAOMING
from processes import ServerProcess
from secure import channel, secured, tokens

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

TRANSPORT_ONLY = pytest.mark.embedded_only(
    reason="admission, limits and timeouts live in the gRPC layer: the backend plays no part")
CHECK = "/dedup.v1.FaceDedup/Check"
MIB = 1 << 20


def stalled(release: threading.Event) -> Iterator[bytes]:
    """A request stream that sends nothing until released: the call's headers go out, its
    request body never does."""
    release.wait(120)
    return
    yield b""  # makes this a generator


def idle_stream(release: threading.Event) -> Iterator[pb.EnrollRequest]:
    """One request (answered with an error item: proof the stream runs), then nothing."""
    yield pb.EnrollRequest()
    release.wait(120)


def desk_check(ch: grpc.Channel, faces, timeout: float) -> pb.CheckResponse:
    """A registration desk's Check: a face and the ID number it claims."""
    return pb_grpc.FaceDedupStub(ch).Check(
        pb.CheckRequest(face=face(faces.persons(1)[0]), claimed_id_number="ID-DESK-1"),
        timeout=timeout)


def healthy(ch: grpc.Channel, timeout: float) -> bool:
    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                timeout=timeout)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def open_idle_streams(ch: grpc.Channel, count: int, release: threading.Event) -> list:
    """`count` EnrollStreams of one caller, each answered once and then left idle."""
    stub = pb_grpc.FaceDedupStub(ch)
    streams = [stub.EnrollStream(idle_stream(release), timeout=120) for _ in range(count)]
    with ThreadPoolExecutor(count) as pool:
        firsts = pool.map(lambda stream: next(stream).error.code, streams, timeout=30)
        assert set(firsts) == {"INVALID_ARGUMENT"}
    return streams


@TRANSPORT_ONLY
@pytest.mark.timeout(180)
def test_stalled_unauthenticated_calls_and_idle_streams_starve_nobody(make_server, keys, faces):
    server = secured(make_server, keys)
    token_port = server.server.token_port
    release = threading.Event()
    anonymous = channel(token_port, keys)  # TLS, no token
    desk = channel(server.port, keys, role="registration")
    other_desk = channel(token_port, keys, token=tokens(keys)["registration"])
    try:
        desk_check(other_desk, faces, timeout=30)  # warm
        open_idle_streams(desk, 32, release)
        stall = anonymous.stream_stream(CHECK)
        stalls = [stall(stalled(release), timeout=120) for _ in range(64)]
        time.sleep(0.5)  # every stalled call has reached the server
        started = time.monotonic()
        assert desk_check(other_desk, faces, timeout=1.0).verdict == pb.CLEAR
        assert healthy(anonymous, timeout=1.0)
        assert healthy(desk, timeout=1.0)
        assert time.monotonic() - started < 3.0
        # Refused at the call's start, before any request body was read.
        assert {call.code() for call in stalls} == {grpc.StatusCode.UNAUTHENTICATED}
    finally:
        release.set()
        for ch in (anonymous, desk, other_desk):
            ch.close()


@TRANSPORT_ONLY
@pytest.mark.timeout(60)
def test_idle_streams_hold_no_worker(make_server, faces):
    """An EnrollStream whose requests are all answered waits for its next one on the event
    loop: four times as many idle streams as workers leave a Check its worker."""
    server = make_server(max_workers=2)
    release = threading.Event()
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        open_idle_streams(ch, 8, release)
        time.sleep(0.5)  # each stream is waiting for its next request
        assert desk_check(ch, faces, timeout=2.0).verdict == pb.CLEAR
    finally:
        release.set()
        ch.close()


def _logged_port(server: ServerProcess, pattern: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in list(server.lines):
            if match := re.search(pattern, line):
                return int(match.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(server.lines))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """The highest resident set size of a process, sampled every 10 ms while in use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = _rss_mib(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, _rss_mib(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


@pytest.mark.timeout(180)
def test_unauthenticated_large_requests_are_refused_unread(tmp_path, keys):
    server = ServerProcess(tmp_path / "data", "--security", str(keys / "security.toml"),
                           "--metrics-address", "127.0.0.1:0")
    try:
        token_port = _logged_port(server, r"bearer tokens accepted over TLS on port (\d+)")
        metrics_port = _logged_port(server, r"metrics on http://[\d.]+:(\d+)/metrics")
        request = pb.CheckRequest(face=pb.Face(image=b"\xff\xd8\xff" + bytes(15 * MIB)),
                                  claimed_id_number="ID-1").SerializeToString()
        with channel(token_port, keys) as anonymous:
            call = anonymous.unary_unary(CHECK)

            def refused(_: int) -> grpc.StatusCode:
                try:
                    call(request, timeout=60)
                except grpc.RpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            before = _rss_mib(server.process.pid)
            with PeakRss(server.process.pid) as rss, ThreadPoolExecutor(32) as pool:
                codes = list(pool.map(refused, range(32)))
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 32
        assert rss.peak - before < 100, f"server grew {rss.peak - before:.0f} MiB"
        samples = scrape(metrics_port)
        assert value(samples, "dedup_calls_refused_total", reason="unauthenticated") == 32
        assert value(samples, "dedup_requests_total", method="Check",
                     status="UNAUTHENTICATED") == 32
    finally:
        server.process.terminate()
        server.wait()


@TRANSPORT_ONLY
def test_one_caller_beyond_its_limit_is_refused_while_others_are_served(make_server, keys,
                                                                         faces):
    server = secured(make_server, keys, max_calls_per_caller=4, metrics_address="127.0.0.1:0")
    release = threading.Event()
    desk = channel(server.port, keys, role="registration")
    other_desk = channel(server.server.token_port, keys, token=tokens(keys)["registration"])
    try:
        streams = open_idle_streams(desk, 4, release)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            desk_check(desk, faces, timeout=30)
        assert time.monotonic() - started < 2.0  # refused at once, not queued
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CN=registration-client" in refused.value.details()
        assert "max_calls_per_caller" in refused.value.details()
        assert desk_check(other_desk, faces, timeout=5).verdict == pb.CLEAR
        release.set()
        for stream in streams:
            assert list(stream) == []
        assert desk_check(desk, faces, timeout=5).verdict == pb.CLEAR  # slots given back
    finally:
        release.set()
        desk.close()
        other_desk.close()
    samples = scrape(server.server.metrics_port)
    assert value(samples, "dedup_calls_refused_total", reason="caller_limit") == 1
    assert value(samples, "dedup_requests_total", method="Check",
                 status="RESOURCE_EXHAUSTED") == 1


@TRANSPORT_ONLY
def test_one_callers_photos_take_no_more_than_its_share_of_the_photo_slots(make_server, keys):
    """The 16 photo slots were the server's only: one desk's photos in flight could take them
    all and leave every other desk refused. A caller now has its share (here 2 of 4)."""
    server = secured(make_server, keys, max_pending_images=4, max_pending_images_per_caller=2)
    slots = server.server.service.embedder.slots
    desk = channel(server.port, keys, role="registration")
    other_desk = channel(server.server.token_port, keys, token=tokens(keys)["registration"])
    photo = pb.CheckRequest(face=pb.Face(image=YAOMING.read_bytes()),
                            claimed_id_number="ID-YAO")
    held = 2
    for _ in range(held):  # two of this desk's photos being embedded
        slots.take("CN=registration-client", "face.image")
    try:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.FaceDedupStub(desk).Check(photo, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "face.image: CN=registration-client has 2 photos being embedded" in \
            refused.value.details()
        assert "max_pending_images_per_caller" in refused.value.details()
        assert pb_grpc.FaceDedupStub(other_desk).Check(photo, timeout=30).verdict == pb.CLEAR
    finally:
        for _ in range(held):
            slots.give_back("CN=registration-client")
        desk.close()
        other_desk.close()
    desk = channel(server.port, keys, role="registration")
    try:  # its share given back
        assert pb_grpc.FaceDedupStub(desk).Check(photo, timeout=30).verdict == pb.CLEAR
    finally:
        desk.close()
    assert slots.taken == 0


@TRANSPORT_ONLY
def test_a_desks_photo_refused_for_want_of_a_slot_keeps_its_check_rate(make_server, keys):
    """A desk's checks are rate limited. One refused because the server had no photo slot
    did nothing, so it is not charged: after the rush the desk still has its burst (it was
    rate refused on its next check)."""
    server = secured(make_server, keys, max_pending_images=4, max_pending_images_per_caller=2,
                     queries=dataclasses.replace(DESKS_SEND_EMBEDDINGS,
                                                 check_rate_per_caller=0.01,
                                                 check_burst_per_caller=2))
    slots = server.server.service.embedder.slots
    desk = channel(server.port, keys, role="registration")
    stub = pb_grpc.FaceDedupStub(desk)
    photo = pb.CheckRequest(face=pb.Face(image=YAOMING.read_bytes()),
                            claimed_id_number="ID-YAO")
    enrolment = pb.EnrollRequest(registration=registration("r-yao", "ID-YAO"),
                                 face=pb.Face(image=YAOMING.read_bytes()), check_first=True)
    for holder in ("desk-a", "desk-a", "desk-b", "desk-b"):  # every slot taken
        slots.take(holder, "face.image")
    try:
        refusals = []
        for _ in range(3):
            for call in (lambda: stub.Check(photo, timeout=30),
                         lambda: stub.Enroll(enrolment, timeout=30)):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                refusals.append(refused.value)
        assert {error.code() for error in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("photos are already being embedded" in error.details()
                   for error in refusals)
    finally:
        for holder in ("desk-a", "desk-a", "desk-b", "desk-b"):
            slots.give_back(holder)
    try:
        assert [stub.Check(photo, timeout=30).verdict for _ in range(2)] == [pb.CLEAR] * 2
        with pytest.raises(grpc.RpcError) as over:
            stub.Check(photo, timeout=30)
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "checks a second" in over.value.details()
    finally:
        desk.close()


@TRANSPORT_ONLY
def test_without_a_security_file_photo_slots_are_the_servers_only(make_server):
    server = make_server(max_pending_images=4, max_pending_images_per_caller=1)
    slots = server.server.service.embedder.slots
    assert (slots.total, slots.per_holder) == (4, None)  # every call is the one loopback caller


@TRANSPORT_ONLY
def test_stalled_request_and_idle_stream_end_deadline_exceeded(make_server, keys):
    server = secured(make_server, keys, request_read_timeout_s=0.5, stream_idle_timeout_s=1.0,
                     metrics_address="127.0.0.1:0")
    release = threading.Event()
    desk = channel(server.port, keys, role="registration")
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as stalled_call:
            next(desk.stream_stream(CHECK)(stalled(release), timeout=30))
        waited = time.monotonic() - started
        assert stalled_call.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "request_read_timeout_s" in stalled_call.value.details()
        assert 0.4 < waited < 5

        (stream,) = open_idle_streams(desk, 1, release)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as idle:
            next(stream)
        waited = time.monotonic() - started
        assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "stream_idle_timeout_s" in idle.value.details()
        assert 0.5 < waited < 5
    finally:
        release.set()
        desk.close()
    samples = scrape(server.server.metrics_port)
    assert value(samples, "dedup_calls_refused_total", reason="request_timeout") == 1
    assert value(samples, "dedup_calls_refused_total", reason="stream_idle") == 1
