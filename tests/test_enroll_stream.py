"""EnrollStream stores the requests already read together (api/bridge.py: RequestFeed), and
answers each as if they had been enrolled one after another."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import enroll, face, registration
from photos import YAOMING

from dedup import FaceGenerator
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.gallery.embedded.layout import store_dir


def request(registration_id: str, id_number: str, vector, msisdn: str = "",
            check_first: bool = False) -> pb.EnrollRequest:
    return pb.EnrollRequest(registration=registration(registration_id, id_number, msisdn),
                            face=face(vector), check_first=check_first)


def outcome(reply: pb.EnrollResponse) -> str:
    return "enrolled" if reply.enrolled else reply.error.code or pb.Verdict.Name(
        reply.check.verdict)


def test_a_stream_sent_at_once_is_answered_as_if_enrolled_one_after_another(server):
    faces = FaceGenerator(seed=31)
    persons = faces.persons(6)
    enroll(server.stub, "old", "ID-OLD", persons[5], msisdn="13800000099")
    stream = [
        request("r0", "ID0", persons[0], "13800000000"),
        request("r1", "ID1", persons[1], "13800000001"),
        request("r0", "ID9", persons[2]),  # r0 is taken, by the first of the stream
        request("r2", "ID2", persons[3], "13800000001"),  # so is M1
        request("", "ID3", persons[3]),  # invalid: answered in its place
        request("r3", "ID3", persons[3], "13800000099"),  # taken before the stream
        # Judged after r0 is stored: r0's face under another ID number.
        request("r4", "ID4", faces.capture(persons[0]), check_first=True),
        request("r5", "ID5", persons[4], "13800000005"),
    ]
    replies = list(server.stub.EnrollStream(iter(stream), timeout=60))
    assert [outcome(reply) for reply in replies] == [
        "enrolled", "enrolled", "ALREADY_EXISTS", "ALREADY_EXISTS", "INVALID_ARGUMENT",
        "ALREADY_EXISTS", "DUPLICATE_IDENTITY", "enrolled"]
    assert [reply.registration.registration_id for reply in replies] == [
        r.registration.registration_id for r in stream]
    assert "registration_id" in replies[2].error.message
    assert "msisdn" in replies[3].error.message and "msisdn" in replies[5].error.message
    assert replies[4].error.message.startswith("registration.registration_id")
    assert server.stub.Stats(pb.StatsRequest(), timeout=30).registrations == 4
    for registration_id, person in (("r0", 0), ("r1", 1), ("r5", 4)):
        found = server.stub.Check(pb.CheckRequest(face=face(faces.capture(persons[person])),
                                                  claimed_id_number="ID-NEW"), timeout=30)
        assert found.matches[0].registration.registration_id == registration_id


def test_an_item_refused_takes_nothing_from_those_after_it(server):
    """X holds r-a; Y (r-a again) is refused, so the phone number Y asked for is Z's."""
    persons = FaceGenerator(seed=34).persons(3)
    stream = [request("r-a", "IDX", persons[0]),
              request("r-a", "IDY", persons[1], "13800000077"),
              request("r-c", "IDZ", persons[2], "13800000077")]
    replies = list(server.stub.EnrollStream(iter(stream), timeout=60))
    assert [outcome(reply) for reply in replies] == ["enrolled", "ALREADY_EXISTS", "enrolled"]


def test_a_registration_id_too_long_for_a_store_key_is_refused_alone(server):
    """128 characters of 4 bytes each pass the character limit but not LMDB's 511-byte key:
    that item is refused, naming its field; the others of its batch are stored."""
    persons = FaceGenerator(seed=35).persons(3)
    stream = [request("k0", "IDK0", persons[0]), request("\U0001F600" * 128, "IDK1", persons[1]),
              request("k2", "IDK2", persons[2])]
    replies = list(server.stub.EnrollStream(iter(stream), timeout=60))
    assert [outcome(reply) for reply in replies] == ["enrolled", "INVALID_ARGUMENT", "enrolled"]
    assert replies[1].error.message == ("registration.registration_id: is 512 bytes in UTF-8, "
                                        "at most 511 allowed")


def test_a_client_that_waits_for_each_answer_gets_it(server):
    """Nothing waits for a batch to fill: a client in lock-step is answered one by one."""
    persons = FaceGenerator(seed=32).persons(5)
    answered = threading.Event()

    def lock_step() -> Iterator[pb.EnrollRequest]:
        for number, person in enumerate(persons):
            answered.clear()
            yield request(f"s{number}", f"IDS{number}", person)
            assert answered.wait(timeout=30), "no answer before the next request"

    replies = []
    for reply in server.stub.EnrollStream(lock_step(), timeout=120):
        replies.append(reply)
        answered.set()
    assert [reply.enrolled for reply in replies] == [True] * 5


@pytest.mark.embedded_only(reason="counts LMDB write transactions")
def test_a_stream_sent_at_once_is_stored_in_fewer_transactions(server):
    persons = FaceGenerator(seed=33).persons(200)
    before = last_transaction(server)
    replies = list(server.stub.EnrollStream(
        (request(f"b{number}", f"IDB{number}", person) for number, person in enumerate(persons)),
        timeout=120))
    assert all(reply.enrolled for reply in replies) and len(replies) == 200
    assert last_transaction(server) - before <= 100  # 200, one each, before batching


def last_transaction(server) -> int:
    """LMDB's last transaction id (read by another process: one process opens an LMDB
    environment once)."""
    read = ("import lmdb, sys; env = lmdb.open(sys.argv[1], readonly=True, lock=False, "
            "max_dbs=16); print(env.info()['last_txnid'])")
    return int(subprocess.run([sys.executable, "-c", read, str(store_dir(server.data_dir))],
                              capture_output=True, text=True, check=True).stdout)


def test_a_stream_its_client_ended_is_answered_to_its_end_when_the_server_drains(server):
    """Stopping, the server takes no new item of an open stream after half its grace; but a
    stream whose client has ended it has every item read already (at most a read-ahead's
    worth), so it is answered to its end rather than cut."""
    photo = pb.Face(image=YAOMING.read_bytes())
    requests = [pb.EnrollRequest(registration=registration(f"y{i}", f"IDY{i}"), face=photo)
                for i in range(20)]
    replies = server.stub.EnrollStream(iter(requests), timeout=120)
    slots = server.server.service.embedder.slots
    deadline = time.monotonic() + 30
    while slots.taken == 0:  # its first batch is being embedded
        assert time.monotonic() < deadline
        time.sleep(0.001)
    server.server.grpc_server.on_loop(server.server.gate.drain_after, 0.0)
    answered = [(reply.registration.registration_id, reply.enrolled) for reply in replies]
    assert answered == [(f"y{i}", True) for i in range(20)]
