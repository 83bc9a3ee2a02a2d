"""`dedup serve --processes N`: a primary and read replicas in real processes over one real
LMDB store, on one loopback port shared with SO_REUSEPORT.

Every test opens a new connection per call (a channel of its own subchannel pool), so the
kernel spreads the calls over the processes; each answer names the process that served it
(x-dedup-process), and the tests insist that every process answered: a replica from its own
index, not by relaying the call to the primary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import DESKS_SEND_EMBEDDINGS, face, registration
from metrics import scrape, value
from processes import ServerProcess

from dedup import FaceGenerator, ServerConfig, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.api.rate_limit import SharedCallerRate
from dedup.core.errors import ConfigError
from dedup.gallery.embedded.layout import store_dir
from dedup.replicas import MultiProcessServer, create_servers

PROCESSES = {"primary", "replica-1"}
TRIES = 64  # new connections until every process has answered: 2**-63 to miss one of two


def fresh_channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own (channels otherwise share subchannels)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def served_by(call: Any) -> list[str]:
    """The processes that served a call, from its trailing metadata (replica, then primary
    for a relayed one)."""
    return [value for key, value in call.trailing_metadata() or () if key == "x-dedup-process"]


def on_every_process(address: str, call: Callable[[grpc.Channel], Any],
                     channel: Callable[[str], grpc.Channel] = fresh_channel,
                     expected: frozenset[str] = frozenset(PROCESSES)) -> Counter[str]:
    """Runs `call` on new connections until each of `expected` has served one; every answer
    must pass the assertions in `call`. Returns how many each path served ("primary",
    "replica-1" answering itself, "replica-1>primary" relayed)."""
    seen: Counter[str] = Counter()
    for _ in range(TRIES):
        with channel(address) as ch:
            seen[">".join(served_by(call(ch)))] += 1
        if expected <= set(seen) and sum(seen.values()) >= 4:
            return seen
    raise AssertionError(f"not every process answered in {TRIES} connections: {seen}")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., MultiProcessServer]]:
    started: list[MultiProcessServer] = []

    def make(**overrides: Any) -> MultiProcessServer:
        store = StoreConfig(data_dir=tmp_path / "data",
                            **{key: overrides.pop(key) for key in list(overrides)
                               if key in StoreConfig.__dataclass_fields__})
        overrides.setdefault("queries", DESKS_SEND_EMBEDDINGS)
        server, port = create_servers(ServerConfig(store=store, **overrides), "127.0.0.1:0", 2)
        assert isinstance(server, MultiProcessServer)
        server.start()
        server.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(grace=1.0)


def enroll(ch: grpc.Channel, registration_id: str, id_number: str, vector: Any) -> Any:
    response, call = pb_grpc.FaceDedupStub(ch).Enroll.with_call(pb.EnrollRequest(
        registration=registration(registration_id, id_number), face=face(vector)), timeout=30)
    assert response.enrolled
    return call


def check(ch: grpc.Channel, vector: Any, claimed: str = "ID-OTHER") -> tuple[Any, Any]:
    return pb_grpc.FaceDedupStub(ch).Check.with_call(pb.CheckRequest(
        face=face(vector), claimed_id_number=claimed), timeout=30)


def finds(registration_id: str, vector: Any) -> Callable[[grpc.Channel], Any]:
    def call(ch: grpc.Channel) -> Any:
        response, answered = check(ch, vector)
        assert [m.registration.registration_id for m in response.matches][:1] == \
            [registration_id], f"{served_by(answered)} missed {registration_id}"
        return answered

    return call


def finds_nothing(vector: Any) -> Callable[[grpc.Channel], Any]:
    def call(ch: grpc.Channel) -> Any:
        response, answered = check(ch, vector)
        assert not response.matches, f"{served_by(answered)} still finds {response.matches}"
        return answered

    return call


def test_a_check_on_any_process_finds_what_was_just_enrolled(start):
    """At least 8 enrolments, and on until one went through the replica: the kernel puts
    each connection on either process, and once in CI all 8 landed on the primary."""
    server = start()
    faces = FaceGenerator(seed=11)
    persons = faces.persons(64)
    relayed = 0
    for number, person in enumerate(persons):
        if number >= 8 and relayed:
            break
        # Enrolled through whichever process the connection lands on (a replica relays it),
        # then checked at once, on new connections, until both processes have found it.
        with fresh_channel(server.address) as ch:
            relayed += served_by(enroll(ch, f"r{number}", f"ID{number}", person)) == [
                "replica-1", "primary"]
        on_every_process(server.address, finds(f"r{number}", faces.capture(person)))
    assert relayed, "no enrolment went through the replica: 64 connections all on the primary"


def test_a_delete_is_seen_by_the_next_check_on_every_process(start):
    server = start()
    faces = FaceGenerator(seed=12)
    person = faces.persons(1)[0]
    with fresh_channel(server.address) as ch:
        enroll(ch, "gone", "ID-GONE", person)
    on_every_process(server.address, finds("gone", faces.capture(person)))
    with fresh_channel(server.address) as ch:
        deleted = pb_grpc.FaceDedupStub(ch).Delete(
            pb.DeleteRequest(registration_id="gone"), timeout=30)
    assert deleted.deleted == 1
    on_every_process(server.address, finds_nothing(faces.capture(person)))


def test_replicas_serve_on_after_a_compaction(start):
    """The replica closes its store around the swap (LMDB's writer would otherwise lose its
    last transaction in the new file) and catches up after it."""
    server = start()
    faces = FaceGenerator(seed=13)
    persons = faces.persons(6)
    with fresh_channel(server.address) as ch:
        for number, person in enumerate(persons[:4]):
            enroll(ch, f"c{number}", f"IDC{number}", person)
        pb_grpc.FaceDedupStub(ch).Delete(pb.DeleteRequest(registration_id="c0"), timeout=30)
    on_every_process(server.address, finds("c1", faces.capture(persons[1])))
    with fresh_channel(server.address) as ch:
        compacted = pb_grpc.IndexAdminStub(ch).Compact(pb.CompactRequest(), timeout=60)
    assert compacted.bytes_after > 0
    with fresh_channel(server.address) as ch:
        enroll(ch, "c4", "IDC4", persons[4])
    for number in (1, 2, 3, 4):
        on_every_process(server.address, finds(f"c{number}", faces.capture(persons[number])))
    on_every_process(server.address, finds_nothing(faces.capture(persons[0])))
    with fresh_channel(server.address) as ch:
        enroll(ch, "c5", "IDC5", persons[5])
        stats = pb_grpc.FaceDedupStub(ch).Stats(pb.StatsRequest(), timeout=30)
    assert stats.registrations == 5
    assert server.gallery.store.verify() == []


def test_replicas_follow_the_map_as_it_grows(start):
    server = start(initial_map_size=64 * 1024)
    faces = FaceGenerator(seed=14)
    persons = faces.persons(300)
    on_every_process(server.address, finds_nothing(persons[0]))  # the replica has it open
    with fresh_channel(server.address) as ch:
        stub = pb_grpc.FaceDedupStub(ch)
        requests = (pb.EnrollRequest(registration=registration(f"m{i}", f"IDM{i}"),
                                     face=face(person)) for i, person in enumerate(persons))
        assert all(response.enrolled for response in stub.EnrollStream(requests, timeout=120))
    assert server.gallery.store.usage().map_bytes >= 4 * 64 * 1024  # it grew, twice or more
    for number in (0, 150, 299):
        on_every_process(server.address, finds(f"m{number}", faces.capture(persons[number])))


def test_no_process_outlives_the_server(tmp_path):
    served = ServerProcess(tmp_path / "data", "--processes", "2")
    replicas = children(served.process.pid)
    assert replicas, "no replica process"
    faces = FaceGenerator(seed=15)
    person = faces.persons(1)[0]
    with fresh_channel(served.address) as ch:
        enroll(ch, "p1", "IDP1", person)
    on_every_process(served.address, finds("p1", faces.capture(person)))
    served.process.send_signal(signal.SIGTERM)
    assert served.wait() == 0
    assert any("replica 1 stopped" in line for line in served.lines)
    wait_until_gone(replicas)


def test_replicas_stop_when_the_primary_is_killed(tmp_path):
    served = ServerProcess(tmp_path / "data", "--processes", "2")
    replicas = children(served.process.pid)
    served.process.kill()
    served.wait()
    wait_until_gone(replicas)
    assert (tmp_path / "data" / "forward.sock").exists()  # left by the kill
    again = ServerProcess(tmp_path / "data", "--processes", "2")
    again.process.send_signal(signal.SIGTERM)
    assert again.wait() == 0
    assert not (tmp_path / "data" / "forward.sock").exists()


def test_a_killed_replica_is_started_again(tmp_path):
    served = ServerProcess(tmp_path / "data", "--processes", "2")
    faces = FaceGenerator(seed=16)
    person = faces.persons(1)[0]
    try:
        with fresh_channel(served.address) as ch:
            enroll(ch, "k1", "IDK1", person)
        (replica,) = replica_pids(served.process.pid)
        os.kill(replica, signal.SIGKILL)
        # Serving from its own index once it said it opened the store (until then it relays).
        deadline = time.monotonic() + 60
        while not any("replica 1 (pid" in line and f"(pid {replica})" not in line
                      and "serves from the store" in line for line in served.lines):
            assert time.monotonic() < deadline, "the replica was not started again"
            time.sleep(0.2)
        assert any(f"replica 1 (pid {replica}) exited with code -9" in line
                   for line in served.lines)
        with fresh_channel(served.address) as ch:
            enroll(ch, "k2", "IDK2", faces.persons(1)[0])
        on_every_process(served.address, finds("k1", faces.capture(person)))
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert served.wait() == 0


# Takes every free slot of the store's LMDB reader table, and each slot freed later within a
# millisecond (the primary's own reads end, a dead replica's are cleared), until stdin closes.
HOLD_READERS = """
import sys
import threading
import time
import lmdb
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=16)
held = []
released = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), released.set()), daemon=True).start()
reported = False
while not released.is_set():
    try:
        held.append(env.begin())
        continue
    except lmdb.ReadersFullError:
        pass
    if not reported:
        print(len(held), flush=True)
        reported = True
    time.sleep(0.001)
"""


def test_a_replica_that_could_not_open_the_store_is_asked_again(start, caplog):
    """A replica started again while LMDB's reader table is full cannot open the store: it
    relays every call meanwhile, and opens the store once slots are free again."""
    caplog.set_level(logging.INFO, logger="dedup")
    server = start(max_readers=16)
    faces = FaceGenerator(seed=20)
    person = faces.persons(1)[0]
    with fresh_channel(server.address) as ch:
        enroll(ch, "o1", "IDO1", person)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_READERS, str(store_dir(tmp_data(server)))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and int(holder.stdout.readline()) > 0
        (replica,) = server.replicas.pids
        os.kill(replica, signal.SIGKILL)
        logged(caplog, "replica 1 could not open the store (asked again in 2 s)")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    (restarted,) = server.replicas.pids
    logged(caplog, f"replica 1 (pid {restarted}) serves from the store")
    on_every_process(server.address, finds("o1", faces.capture(person)))


def tmp_data(server: MultiProcessServer) -> Path:
    return Path(server.config.store.data_dir)


def logged(caplog: Any, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in record.getMessage() for record in caplog.records):
        assert time.monotonic() < deadline, f"not logged in {timeout} s: {text}"
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                            text=True, check=False).stdout
    return [int(line) for line in listed.split()]


def replica_pids(pid: int) -> list[int]:
    """The server's replica processes (not multiprocessing's resource tracker)."""
    return [child for child in children(pid)
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes().decode(
                errors="replace")]


def wait_until_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while alive := [pid for pid in pids if Path(f"/proc/{pid}").exists()
                    and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]:
        assert time.monotonic() < deadline, f"still running after the server: {alive}"
        time.sleep(0.1)


def secure_channel(keys: Path, role: str | None = None, token: str | None = None
                   ) -> Callable[[str], grpc.Channel]:
    """Like secure.channel, with a connection of its own per channel."""
    def make(address: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(keys / "ca.crt").read_bytes(),
            private_key=(keys / f"{role}.key").read_bytes() if role else None,
            certificate_chain=(keys / f"{role}.crt").read_bytes() if role else None)
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(address, credentials,
                                   options=[("grpc.use_local_subchannel_pool", 1)])

    return make


def refused(code: grpc.StatusCode, details: str, method: str, request: Any,
            metadata: tuple[tuple[str, str], ...] = ()) -> Callable[[grpc.Channel], Any]:
    def call(ch: grpc.Channel) -> Any:
        with pytest.raises(grpc.RpcError) as error:
            getattr(pb_grpc.FaceDedupStub(ch), method)(request, timeout=30, metadata=metadata)
        assert (error.value.code(), error.value.details()) == (code, details), \
            served_by(error.value)
        return error.value

    return call


def test_relayed_calls_keep_their_caller_and_its_rights(start, keys):
    from secure import tokens

    from dedup.core.security import load_security

    server = start(security=load_security(keys / "security.toml"))
    tokens_port = f"127.0.0.1:{server.token_port}"
    faces = FaceGenerator(seed=17)
    enrolment = pb.EnrollRequest(registration=registration("e0", "IDE0"),
                                 face=face(faces.persons(1)[0]))
    # Refused alike by either process, before any request byte is read.
    on_every_process(tokens_port, refused(
        grpc.StatusCode.UNAUTHENTICATED, "no credential: present a client certificate, or "
        "`authorization: Bearer <token>` metadata", "Enroll", enrolment),
        secure_channel(keys))
    desk_token = secure_channel(keys, token=tokens(keys)["registration"])
    on_every_process(tokens_port, refused(
        grpc.StatusCode.PERMISSION_DENIED, "role 'registration' (token:registration-token) "
        "may not call FaceDedup.Delete", "Delete", pb.DeleteRequest(registration_id="e0")),
        desk_token)
    # A caller cannot name itself: a replica drops such metadata, the primary refuses it.
    forged = (("x-dedup-forward-secret", "0" * 64),
              ("x-dedup-forwarded-caller", '["CN=admin-client", "admin", "mtls"]'))
    desk = secure_channel(keys, role="registration")
    outcomes = {}
    for ch in (desk(server.address) for _ in range(TRIES)):
        with ch, pytest.raises(grpc.RpcError) as error:
            pb_grpc.FaceDedupStub(ch).Delete(pb.DeleteRequest(registration_id="e0"),
                                             timeout=30, metadata=forged)
        outcomes[">".join(served_by(error.value))] = (error.value.code(), error.value.details())
        if set(outcomes) == PROCESSES:
            break
    assert outcomes == {
        "primary": (grpc.StatusCode.UNAUTHENTICATED,
                    "a forwarded call must come from a replica of this server"),
        "replica-1": (grpc.StatusCode.PERMISSION_DENIED,
                      "role 'registration' (CN=registration-client) may not call "
                      "FaceDedup.Delete")}
    # Enrolments relayed by the replica are the desk's, by its certificate.
    relayed = []
    for number in range(TRIES):
        with desk(server.address) as ch:
            response, call = pb_grpc.FaceDedupStub(ch).Enroll.with_call(pb.EnrollRequest(
                registration=registration(f"d{number}", f"IDD{number}"),
                face=face(faces.persons(1)[0])), timeout=30)
        assert response.registration.enrolled_by == "CN=registration-client"
        if served_by(call) == ["replica-1", "primary"]:
            relayed.append(f"d{number}")
            break
    assert relayed, "no enrolment went through the replica"


def test_a_desk_checks_at_its_rate_whichever_process_its_connections_reach(start, keys):
    """The kernel spreads a desk's connections over the processes: buckets per process let
    it check as many times faster as there are processes."""
    from dedup.core.security import load_security

    server = start(security=load_security(keys / "security.toml"),
                   queries=dataclasses.replace(DESKS_SEND_EMBEDDINGS, check_rate_per_caller=0.001,
                                               check_burst_per_caller=6))
    desk = secure_channel(keys, role="registration")
    probe = pb.CheckRequest(face=face(FaceGenerator(seed=5).persons(1)[0]),
                            claimed_id_number="ID-X")
    admitted: Counter[str] = Counter()
    refused_by: set[str] = set()
    for _ in range(TRIES):
        with desk(server.address) as ch:
            try:
                _, call = pb_grpc.FaceDedupStub(ch).Check.with_call(probe, timeout=30)
                admitted[served_by(call)[0]] += 1
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                refused_by.add(served_by(error)[0])
        if refused_by == PROCESSES:
            break
    assert refused_by == PROCESSES, (admitted, refused_by)
    assert sum(admitted.values()) == 6, admitted


@contextlib.contextmanager
def rates_of_two_processes(path: Path, rate: float
                           ) -> Iterator[tuple[SharedCallerRate, SharedCallerRate, list[float]]]:
    """Two processes' views of one check-rate file (bursts of 2), on a clock the test moves."""
    now = [100.0]
    first, second = (SharedCallerRate(path, rate, 2, create=create) for create in (True, False))
    for rates in (first, second):
        rates.clock = lambda: now[0]
    try:
        yield first, second, now
    finally:
        first.close()
        second.close()


def test_shared_check_rates_refill_and_outlast_a_full_table(tmp_path, monkeypatch):
    monkeypatch.setattr(SharedCallerRate, "SLOTS", 2)
    with rates_of_two_processes(tmp_path / "rates", 2.0) as (first, second, now):
        assert [first.admit("a"), second.admit("a"), first.admit("a")] == [True, True, False]
        now[0] += 0.5  # one call's worth at 2 a second
        assert [second.admit("a"), first.admit("a")] == [True, False]
        assert first.admit("b")  # the second and last slot
        # An identity past a full table is limited per process, as without the file.
        assert [first.admit("c"), first.admit("c"), first.admit("c")] == [True, True, False]
        assert second.admit("c")


def test_a_refund_gives_back_one_call_in_every_process_up_to_the_burst(tmp_path, monkeypatch):
    """A check refused before any of its work was done is given back to the desk's shared
    bucket, seen by every process; never past the burst; per process past a full table."""
    monkeypatch.setattr(SharedCallerRate, "SLOTS", 1)
    with rates_of_two_processes(tmp_path / "rates", 0.001) as (first, second, _):
        assert [first.admit("a"), second.admit("a"), first.admit("a")] == [True, True, False]
        second.refund("a")
        assert [first.admit("a"), second.admit("a")] == [True, False]
        for _ in range(5):
            first.refund("a")
        assert [second.admit("a"), first.admit("a"), second.admit("a")] == [True, True, False]
        # past the full table: in its process
        assert [first.admit("c"), first.admit("c"), first.admit("c")] == [True, True, False]
        first.refund("c")
        assert [first.admit("c"), first.admit("c")] == [True, False]


def test_audited_checks_are_relayed_and_recorded_once(start, keys):
    from secure import tokens
    from trail import records

    from dedup.core.security import load_security

    server = start(security=load_security(keys / "security.toml"))
    faces = FaceGenerator(seed=18)
    probe = faces.persons(1)[0]
    case = (("x-case-id", "C-7"), ("x-purpose", "replicas"))
    paths: list[list[str]] = []

    def investigate(ch: grpc.Channel) -> Any:
        _, call = pb_grpc.FaceDedupStub(ch).Check.with_call(
            pb.CheckRequest(face=face(probe)), timeout=30, metadata=case)
        paths.append(served_by(call))
        return call

    on_every_process(f"127.0.0.1:{server.token_port}", investigate,
                     secure_channel(keys, token=tokens(keys)["investigator"]),
                     expected=frozenset({"primary", "replica-1>primary"}))
    assert all(path[-1] == "primary" for path in paths)  # audited: never by a replica
    # A desk's check is answered by the replica itself (on_every_process insists).
    on_every_process(server.address, lambda ch: check(ch, probe, "ID9")[1],
                     secure_channel(keys, role="registration"))
    server.stop(grace=1.0)
    audited = [record for record in records(Path(server.config.store.data_dir))
               if record["method"] == "FaceDedup.Check"]
    assert len(audited) == len(paths)
    assert {(r["caller"], r["case_id"]) for r in audited} == {
        ("token:investigator-token", "C-7")}


def test_replicas_take_up_the_index_type_the_primary_switches_to(tmp_path):
    """The primary switches to BinarySign512 as the gallery passes --auto-threshold and
    checkpoints it; the replica loads that checkpoint and serves it. A Rebuild (a response
    stream) relayed by the replica keeps it."""
    served = ServerProcess(tmp_path / "data", "--processes", "2", "--auto-threshold", "3")
    faces = FaceGenerator(seed=19)
    persons = faces.persons(5)
    try:
        with fresh_channel(served.address) as ch:
            for number, person in enumerate(persons):
                enroll(ch, f"t{number}", f"IDT{number}", person)
        deadline = time.monotonic() + 60
        while not any("now serving the primary's BinarySign512 index (5 vectors)" in line
                      for line in served.lines):
            assert time.monotonic() < deadline, "".join(
                line for line in served.lines if "dedup.access" not in line)
            time.sleep(0.2)
        relayed = False
        for _ in range(TRIES):
            with fresh_channel(served.address) as ch:
                rebuild = pb_grpc.IndexAdminStub(ch).Rebuild(
                    pb.RebuildRequest(index_factory="BinarySign512"), timeout=120)
                phases = [progress.phase for progress in rebuild]
                assert phases[-1] == "done"
                if served_by(rebuild) == ["replica-1", "primary"]:
                    relayed = True
                    break
        assert relayed
        for number, person in enumerate(persons):
            on_every_process(served.address, finds(f"t{number}", faces.capture(person)))
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert served.wait() == 0


def test_an_enrolment_stream_is_relayed_item_by_item(start):
    """A request stream through the replica: each item answered in order, and a client
    that stops sending gets the idle bound's DEADLINE_EXCEEDED, as from the primary."""
    server = start(stream_idle_timeout_s=0.5)
    faces = FaceGenerator(seed=20)
    persons = faces.persons(4)
    for attempt in range(TRIES):
        with fresh_channel(server.address) as ch:
            stream = pb_grpc.FaceDedupStub(ch).EnrollStream(iter([
                pb.EnrollRequest(registration=registration(f"s{attempt}-{i}", f"IDS{i}"),
                                 face=face(person)) for i, person in enumerate(persons)]),
                timeout=30)
            answers = [(r.registration.registration_id, r.enrolled) for r in stream]
        assert answers == [(f"s{attempt}-{i}", True) for i in range(4)]
        if served_by(stream) == ["replica-1", "primary"]:
            break
        with fresh_channel(server.address) as ch:  # on the primary: erased, to enrol again
            for i in range(4):
                pb_grpc.FaceDedupStub(ch).Delete(
                    pb.DeleteRequest(registration_id=f"s{attempt}-{i}"), timeout=30)
    else:
        raise AssertionError("no enrolment stream went through the replica")
    for i, person in enumerate(persons):
        on_every_process(server.address, finds(f"s{attempt}-{i}", faces.capture(person)))

    def stalled() -> Iterator[pb.EnrollRequest]:
        yield pb.EnrollRequest(registration=registration("idle", "ID-IDLE"),
                               face=face(faces.persons(1)[0]))
        time.sleep(3)

    ended: dict[str, tuple[grpc.StatusCode, str]] = {}
    for _ in range(TRIES):
        with fresh_channel(server.address) as ch:
            stream = pb_grpc.FaceDedupStub(ch).EnrollStream(stalled(), timeout=30)
            with pytest.raises(grpc.RpcError) as error:
                list(stream)
        ended[served_by(error.value)[0]] = (error.value.code(), error.value.details())
        if set(ended) == PROCESSES:
            break
    assert ended == dict.fromkeys(PROCESSES, (
        grpc.StatusCode.DEADLINE_EXCEEDED, "EnrollStream: no next request within 0.5 s of "
        "the last (stream_idle_timeout_s)"))


def test_a_second_server_cannot_share_the_port(start, tmp_path):
    """SO_REUSEPORT is for the processes of one server: another server on the same port
    (another data directory) is refused instead of taking half the clients."""
    first = start()
    port = int(first.address.rsplit(":", 1)[1])
    other = ServerConfig(store=StoreConfig(data_dir=tmp_path / "other"))
    with pytest.raises(ConfigError, match="another server holds the port"):
        create_servers(other, f"127.0.0.1:{port}", 2)


def test_a_check_stream_is_answered_by_the_process_it_reaches(start):
    """A replica answers a CheckStream's items itself, as single Checks: each item finds what
    was acknowledged before it."""
    server = start()
    faces = FaceGenerator(seed=21)
    persons = faces.persons(2)
    with fresh_channel(server.address) as ch:
        enroll(ch, "c0", "IDC0", persons[0])

    def streamed(ch: grpc.Channel) -> Any:
        stream = pb_grpc.FaceDedupStub(ch).CheckStream(iter([
            pb.CheckRequest(face=face(faces.capture(persons[0])), claimed_id_number="ID-X"),
            pb.CheckRequest(face=face(persons[1]), claimed_id_number="ID-Y")]), timeout=30)
        first, second = stream
        assert [m.registration.registration_id for m in first.matches][:1] == ["c0"]
        assert (first.verdict, second.verdict) == (pb.DUPLICATE_IDENTITY, pb.CLEAR)
        return stream

    assert set(on_every_process(server.address, streamed)) == PROCESSES


def test_a_replicas_stream_items_go_to_the_primary_while_its_store_is_released(start, keys,
                                                                               caplog):
    """Around a compaction's swap the replicas close their store: a desk's stream items that
    come meanwhile are checked by the primary, each once and charged once to the desk's
    rate, and the stream goes on (16 streams: 2**-16 to have none on the replica)."""
    from dedup.core.security import load_security

    caplog.set_level(logging.INFO, logger="dedup.access")  # the primary's, in this process
    server = start(metrics_address="127.0.0.1:0", security=load_security(keys / "security.toml"),
                   queries=dataclasses.replace(DESKS_SEND_EMBEDDINGS, check_rate_per_caller=0.001,
                                               check_burst_per_caller=48))  # 3 items x 16
    faces = FaceGenerator(seed=23)
    persons = faces.persons(3)
    with secure_channel(keys, role="admin")(server.address) as ch:
        for number, person in enumerate(persons):
            enroll(ch, f"k{number}", f"IDK{number}", person)
    channels = [secure_channel(keys, role="registration")(server.address) for _ in range(16)]
    streams = []
    for ch in channels:
        outbox: queue.SimpleQueue[pb.CheckRequest | None] = queue.SimpleQueue()
        streams.append((outbox, pb_grpc.FaceDedupStub(ch).CheckStream(iter(outbox.get, None),
                                                                      timeout=120)))

    def checked_by_every_stream(number: int) -> None:
        for outbox, _ in streams:
            outbox.put(pb.CheckRequest(face=face(faces.capture(persons[number])),
                                       claimed_id_number="ID-Z"))
        for _, responses in streams:
            reply = next(responses)
            assert not reply.HasField("error"), reply.error
            assert [m.registration.registration_id for m in reply.matches][:1] == [
                f"k{number}"]

    def checks_on_the_primary() -> int:  # the replicas' items sent there as Checks
        return sum(1 for record in caplog.records if record.name == "dedup.access"
                   and getattr(record, "method", None) == "Check"
                   and getattr(record, "status", None) == "OK")

    checked_by_every_stream(0)  # every stream open, on the process it reached
    before = checks_on_the_primary()
    with server.replicas.released():
        checked_by_every_stream(1)
    relayed = checks_on_the_primary() - before
    assert server.replicas.wait_opened(60)  # the reopening is asked for, not waited for
    checked_by_every_stream(2)
    paths = Counter()
    for outbox, responses in streams:
        outbox.put(None)
        assert list(responses) == []
        paths[">".join(served_by(responses))] += 1
    for ch in channels:
        ch.close()
    assert set(paths) == PROCESSES, paths
    assert relayed == paths["replica-1"]  # one Check on the primary for each, no more
    assert checks_on_the_primary() - before == relayed  # and none once reopened
    samples = scrape(server.metrics_port)  # every process's, each item once
    assert value(samples, "dedup_stream_items_total", method="CheckStream", status="OK") == 48
    assert value(samples, "dedup_requests_total", method="CheckStream", status="OK") == 16
    assert value(samples, "dedup_requests_total", method="Check", status="OK") == 0


def test_a_relayed_stream_ends_when_its_token_expires(start, keys, monkeypatch):
    """An investigator's stream is audited, so relayed whole: the replica names the caller's
    token expiry to the primary, which refuses the stream's items once it has passed, as
    its own (16 streams: 2**-16 to land none on the replica)."""
    import hashlib

    from dedup.core.security import Token, load_security

    security = load_security(keys / "security.toml")
    expires = datetime.now(UTC) + timedelta(hours=1)
    brief = Token("brief", "investigator", hashlib.sha256(b"brief-secret").digest(), expires)
    server = start(security=dataclasses.replace(security, tokens=(*security.tokens, brief)))
    request = pb.CheckRequest(face=face(FaceGenerator(seed=22).persons(1)[0]),
                              claimed_id_number="ID-1")
    channels = [secure_channel(keys, token="brief-secret")(f"127.0.0.1:{server.token_port}")
                for _ in range(16)]
    streams = []
    for ch in channels:
        outbox: queue.SimpleQueue[pb.CheckRequest | None] = queue.SimpleQueue()
        responses = pb_grpc.FaceDedupStub(ch).CheckStream(
            iter(outbox.get, None), timeout=60,
            metadata=(("x-case-id", "CASE-7"), ("x-purpose", "expiry")))
        outbox.put(request)
        assert next(responses).verdict == pb.CLEAR  # answered while the token holds
        streams.append((outbox, responses))
    # The primary (this process) checks each item's expiry by its clock: two hours on.
    monkeypatch.setattr("dedup.api.calls.datetime", _TwoHoursOn)
    paths = Counter()
    for outbox, responses in streams:
        outbox.put(request)
        with pytest.raises(grpc.RpcError) as error:
            next(responses)
        outbox.put(None)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token:brief" in error.value.details()
        paths[">".join(served_by(error.value))] += 1
    for ch in channels:
        ch.close()
    assert paths["replica-1>primary"] > 0, paths


def test_streams_cut_by_a_stop_end_between_items_on_every_process(start):
    """Stopping, each process ends its request streams between two items (UNAVAILABLE), a
    replica's relayed ones too: it ends the primary's stream and passes on the answers to
    what it sent. What the enrolment streams acknowledged is what is stored."""
    server = start(shutdown_grace_s=8.0)
    people = FaceGenerator(seed=23).persons(300)
    streams = 16
    acknowledged: list[list[str]] = [[] for _ in range(streams)]
    ended: list[grpc.RpcError | None] = [None] * streams
    first_answers = threading.Barrier(streams + 1, timeout=60)

    def paced(stream: int) -> Iterator[pb.EnrollRequest]:
        for i, person in enumerate(people):
            yield pb.EnrollRequest(registration=registration(f"e{stream}-{i}",
                                                             f"ID{stream}-{i}"),
                                   face=face(person))
            time.sleep(0.05)

    def enrol(stream: int) -> None:
        with fresh_channel(server.address) as ch:
            replies = pb_grpc.FaceDedupStub(ch).EnrollStream(paced(stream), timeout=120)
            try:
                for n, reply in enumerate(replies):
                    assert reply.enrolled
                    acknowledged[stream].append(reply.registration.registration_id)
                    if n == 0:
                        first_answers.wait()
            except grpc.RpcError as error:
                ended[stream] = error

    threads = [threading.Thread(target=enrol, args=(k,)) for k in range(streams)]
    for thread in threads:
        thread.start()
    first_answers.wait()
    server.stop()
    for thread in threads:
        thread.join(60)
    paths = Counter()
    for stream, error in enumerate(ended):
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert f"after {len(acknowledged[stream])} answered" in error.details()
        assert "shutting down" in error.details()
        paths[">".join(served_by(error))] += 1
    assert set(paths) == {"primary", "replica-1>primary"}, paths  # 2**-15 to miss one

    again = start()
    with fresh_channel(again.address) as ch:
        stub = pb_grpc.FaceDedupStub(ch)
        assert stub.Stats(pb.StatsRequest(), timeout=30).registrations == \
            sum(map(len, acknowledged))
        for stream, ids in enumerate(acknowledged):
            assert ids == [f"e{stream}-{i}" for i in range(len(ids))]
            stub.GetRegistration(pb.GetRegistrationRequest(registration_id=ids[-1]),
                                 timeout=30)


def test_the_primarys_metrics_count_what_every_process_served_once(start):
    """/metrics is the primary's, and adds its replicas' counts: a Check a replica answered
    is counted, and a call it relayed is counted once (where its client called), not again
    by the primary."""
    server = start(metrics_address="127.0.0.1:0")
    faces = FaceGenerator(seed=24)
    person = faces.persons(1)[0]
    enrolled = {"primary": 0, "replica-1>primary": 0}
    for attempt in range(TRIES):
        with fresh_channel(server.address) as ch:
            path = ">".join(served_by(enroll(ch, f"m{attempt}", f"IDM{attempt}", person)))
        enrolled[path] += 1
        if min(enrolled.values()) and sum(enrolled.values()) >= 4:
            break
    assert min(enrolled.values()) >= 1, enrolled
    checked = on_every_process(server.address, finds("m0", faces.capture(person)))
    assert set(checked) == PROCESSES
    checks = sum(checked.values())
    expected = {
        ("dedup_requests_total", "Enroll", "OK"): sum(enrolled.values()),
        ("dedup_requests_total", "Check", "OK"): checks,
        ("dedup_request_seconds_count", "Check", None): checks,
    }
    samples = scrape(server.metrics_port)  # each process counts a call before answering it
    seen = {key: value(samples, key[0], method=key[1], **({"status": key[2]} if key[2] else {}))
            for key in expected}
    assert seen == expected
    assert value(samples, "dedup_request_seconds_bucket", method="Check", le="+Inf") == checks
    assert value(samples, "dedup_verdicts_total", verdict="DUPLICATE_IDENTITY") == checks


def test_a_scrape_survives_replica_metrics_files_it_cannot_read(start, caplog):
    """The library makes a file empty, then sizes it: one caught so is skipped. A damaged
    one leaves the replicas' counts out of the scrape, which still answers."""
    server = start(metrics_address="127.0.0.1:0")
    directory = tmp_data(server) / "replica-metrics"
    (directory / "counter_replica7.db").touch()
    seen = on_every_process(server.address, finds_nothing(FaceGenerator(seed=26).persons(1)[0]))
    checks = value(scrape(server.metrics_port), "dedup_requests_total", method="Check",
                   status="OK")
    assert checks == sum(seen.values())
    (directory / "histogram_replica8.db").write_bytes(b"\x10\x00\x00\x00" + b"\xff" * 100)
    with caplog.at_level(logging.WARNING, logger="dedup.server"):
        samples = scrape(server.metrics_port)
    assert value(samples, "dedup_requests_total", method="Check", status="OK") == \
        seen["primary"]
    assert any("cannot read the replicas' metrics" in record.getMessage()
               for record in caplog.records)


def test_the_replicas_metrics_files_are_private_under_an_open_umask(start):
    previous = os.umask(0)
    try:
        server = start(metrics_address="127.0.0.1:0")
        on_every_process(server.address, finds_nothing(FaceGenerator(seed=25).persons(1)[0]))
    finally:
        os.umask(previous)
    directory = tmp_data(server) / "replica-metrics"
    files = sorted(directory.iterdir())
    assert [path.name for path in files] == ["counter_replica1.db", "histogram_replica1.db"]
    assert [f"{path.name} {stat.S_IMODE(path.stat().st_mode):04o}" for path in
            (directory, *files) if stat.S_IMODE(path.stat().st_mode) & 0o077] == []


def test_the_files_every_process_maps_have_their_blocks_on_disk(start):
    """Files the processes map and write: a page of a sparse file gets its block when first
    written, and on a full disk that write kills the process (SIGBUS) instead of failing
    with an error. The desks' rate buckets and the replicas' metrics files were made sparse
    (ftruncate, and prometheus-client's truncate): now every byte of them is allocated, the
    metrics files large enough that the library never grows them."""
    server = start(metrics_address="127.0.0.1:0")
    on_every_process(server.address, finds_nothing(FaceGenerator(seed=27).persons(1)[0]))
    data = tmp_data(server)
    metrics = sorted((data / "replica-metrics").iterdir())
    mapped = [data / "check-rates", *metrics]
    assert [path.name for path in metrics] == ["counter_replica1.db", "histogram_replica1.db"]
    sparse = [f"{path.name}: {path.stat().st_blocks * 512} of {path.stat().st_size} B"
              for path in mapped if path.stat().st_blocks * 512 < path.stat().st_size]
    assert sparse == []
    for path in metrics:  # the bytes used, in the file's first four
        assert 8 < int.from_bytes(path.read_bytes()[:4], "little") < path.stat().st_size // 8


class _TwoHoursOn(datetime):
    """A clock two hours ahead, for what the server reads of it."""

    @classmethod
    def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
        return datetime.now(tz) + timedelta(hours=2)
