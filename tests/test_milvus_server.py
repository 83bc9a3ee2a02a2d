"""The Milvus backend on a real Milvus server: Milvus 2.3.5 standalone from the `milvus`
package (tests/milvus_server.py), beside Milvus Lite.

Here: the server never outlives its test run; the collections are built as the server's
version supports; faults (a dedup node killed with SIGKILL in the middle of claims, the
Milvus server killed during an EnrollStream and restarted on its directory); and erasure
down to the bytes of every file under the server's base directory. The service suite and
the multi-node races run on the server through the `milvus-server` backend (conftest.py)
and tests/test_milvus.py. Everything here is in `make test-milvus`.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, check, drop_collections, enroll, face, milvus_on_server
from conftest import registration as registration_of
from milvus_server import MilvusServer, alive
from processes import ServerProcess

from dedup import ServerConfig, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.security import load_security
from dedup.core.settings import MilvusConfig
from dedup.gallery.milvus import MilvusGallery
from dedup.gallery.milvus.schema import LOOKUP_FIELDS, Collections

pytestmark = pytest.mark.milvus_server

TESTS = Path(__file__).parent
STARTS_A_SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from milvus_server import MilvusServer
server = MilvusServer(sys.argv[2])
server.start()
print(server.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGTERM", "SIGKILL"])
def test_the_server_dies_with_the_process_that_started_it(tmp_path, signum):
    """The `milvus` package's own start() left the server running after a SIGTERM to its
    Python parent; started by tests/milvus_server.py it goes with the parent however the
    parent goes."""
    parent = subprocess.Popen([sys.executable, "-c", STARTS_A_SERVER, str(TESTS),
                               str(tmp_path / "milvus")], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert alive(pid)
    parent.send_signal(signum)
    parent.wait(30)
    deadline = time.monotonic() + 20
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid), f"the Milvus server {pid} outlived its parent"


def test_a_first_start_whose_port_was_taken_meanwhile_starts_on_new_ones(tmp_path):
    """Ports are chosen free and bound by Milvus later: in between another process may take
    one (CI met it: Milvus exited with SIGABRT, "bind: address already in use")."""
    server = MilvusServer(tmp_path / "milvus")
    taken = server.ports["proxy_internal_port"]
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", taken))
        squatter.listen()
        try:
            server.start()
            assert server.ports["proxy_internal_port"] != taken
            assert alive(server.pid)
        finally:
            server.kill()


def _index_types(gallery: MilvusGallery) -> dict[str, str]:
    client, names = gallery._client, gallery.collections
    return {field: client.describe_index(names.registrations, field)["index_type"]
            for field in LOOKUP_FIELDS} | {
        f"settlements.{field}": client.describe_index(names.adjudications, field)["index_type"]
        for field in ("first", "second")}


@pytest.mark.parametrize("where", ["lite", "server"])
def test_collections_are_built_with_the_indexes_the_server_has(where, request, tmp_path, faces):
    """Milvus 2.3 refuses INVERTED (`index type not match: expected=Trie`, the error a user
    got): there the lookups get Trie (strings) and STL_SORT (state); Milvus Lite gets
    INVERTED. Either way the lookups they serve work."""
    from conftest import release_milvus_lite

    if where == "lite":
        config = MilvusConfig(uri=str(tmp_path / "milvus.db"))
        expected = dict.fromkeys([*LOOKUP_FIELDS, "settlements.first", "settlements.second"],
                                 "INVERTED")
        name = "Milvus Lite 3.2.2"
    else:
        config = MilvusConfig(uri=request.getfixturevalue("milvus_server").uri,
                              prefix="fresh")  # created here, not prepared ahead
        expected = {"registration_id": "Trie", "id_number": "Trie", "msisdn": "Trie",
                    "state": "STL_SORT", "settlements.first": "Trie",
                    "settlements.second": "Trie"}
        name = "Milvus 2.3.5"
    gallery = MilvusGallery(config, "model-x", data_dir=tmp_path / "node", background=False)
    try:
        assert gallery.server.name == name
        assert _index_types(gallery) == expected
        from dedup.core.records import Registration

        person = faces.persons(1)[0]
        gallery.insert(Registration("r1", "ID1", "+8613800000001", embedding_model="model-x"),
                       person)
        assert gallery.get("r1") is not None
        assert [s.registration.registration_id for s in gallery.same_id_number(person, "ID1")] \
            == ["r1"]
    finally:
        gallery.close(checkpoint=False)
        if where == "lite":
            release_milvus_lite(tmp_path / "milvus.db")
        else:
            drop_collections(config)


# -- faults -------------------------------------------------------------------------

def _pending_claims(config: MilvusConfig, where: str = "state == 0") -> list[dict]:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=config.uri)
    try:
        return client.query(Collections.named(config.prefix).registrations,
                            filter=where, output_fields=["registration_id", "claimed_at_us",
                                                         "state"],
                            consistency_level="Strong")
    finally:
        client.close()


def _claims_of_stopped(node: ServerProcess, config: MilvusConfig,
                       its_person: Callable[[int], bool]) -> list[dict]:
    """Stops `node` (SIGSTOP) at a moment it holds PENDING claims, and returns them (the
    claims of the persons `its_person` says it enrols).

    A claim is PENDING for a few of Milvus's time ticks: a kill at a random moment can find
    none, or one whose commit was already on its way (then it lands after the kill and the
    claim is not abandoned). Stopped, the node sends nothing more; a second later what it had
    sent is in Milvus, and the claims still pending are the ones its death abandons."""
    for _ in range(40):
        node.process.send_signal(signal.SIGSTOP)
        time.sleep(1)
        pending = [claim for claim in _pending_claims(config)
                   if its_person(int(claim["registration_id"][1:]))]
        if pending:
            return pending
        node.process.send_signal(signal.SIGCONT)
        time.sleep(0.1)
    raise AssertionError("node A never held a claim when stopped")


@pytest.mark.timeout(300)
def test_a_node_killed_in_the_middle_of_claims(milvus_server, tmp_path, faces):
    """Eight clients enrol with check_first on node A, one on node B; A gets SIGKILL. B goes
    on serving; every enrolment acknowledged on either node is there and is its own top
    match; A's abandoned claims keep their faces taken until claim_timeout_s (30 s), then
    the same face enrols on B."""
    config = milvus_on_server(milvus_server)
    target = ["--backend", "milvus", "--milvus-uri", config.uri, "--milvus-prefix",
              config.prefix]
    a, b = (ServerProcess(tmp_path / name, *target) for name in ("a", "b"))
    people = faces.persons(400)
    acknowledged: dict[str, int] = {}  # registration_id -> person
    lock = threading.Lock()
    b_failures: list[object] = []
    stop_b = threading.Event()

    def enrol(address: str, first: int, step: int, until: threading.Event | None) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.FaceDedupStub(channel)
            for n in range(first, len(people), step):
                if until is not None and until.is_set():
                    return
                try:
                    response = enroll(stub, f"r{n}", f"ID{n}", people[n], check_first=True)
                except grpc.RpcError as error:
                    if until is not None:  # B must not fail
                        b_failures.append(error)
                    return  # A was killed
                if until is not None and not response.enrolled:
                    b_failures.append(response)
                if response.enrolled:
                    with lock:
                        acknowledged[f"r{n}"] = n

    on_a = [threading.Thread(target=enrol, args=(a.address, i, 10, None)) for i in range(8)]
    on_b = threading.Thread(target=enrol, args=(b.address, 8, 10, stop_b))
    for thread in [*on_a, on_b]:
        thread.start()
    time.sleep(4)
    abandoned = _claims_of_stopped(a, config, its_person=lambda n: n % 10 != 8)
    a.process.kill()
    a.wait()
    for thread in on_a:
        thread.join(60)
    time.sleep(2)  # B goes on meanwhile
    stop_b.set()
    on_b.join(60)
    assert b_failures == []
    assert abandoned, "no claim was in flight when A was killed"

    with grpc.insecure_channel(b.address) as channel:
        stub = pb_grpc.FaceDedupStub(channel)
        for registration_id, n in acknowledged.items():
            top = check(stub, people[n], max_candidates=1).matches
            assert [m.registration.registration_id for m in top] == [registration_id]
        ghost = abandoned[0]
        face_of_ghost = people[int(ghost["registration_id"][1:])]
        wait = max(claim["claimed_at_us"] for claim in abandoned) / 1e6 + 30 - time.time()
        if wait > 1:  # still claimed: refused as if enrolled, and nothing is stored
            refused = enroll(stub, "again-1", "ID-AGAIN-1", face_of_ghost, check_first=True)
            assert not refused.enrolled and refused.check.verdict == pb.DUPLICATE_IDENTITY
        time.sleep(max(0.0, wait + 0.5))
        retried = enroll(stub, "again-2", "ID-AGAIN-2", face_of_ghost, check_first=True)
        names = json.dumps([claim["registration_id"] for claim in abandoned])
        assert retried.enrolled and retried.check.verdict == pb.CLEAR, (
            ghost, [m.registration.registration_id for m in retried.check.matches],
            _pending_claims(config, f"registration_id in {names}"))
        # and perhaps claims A committed without answering before it died
        stored = stub.Stats(pb.StatsRequest()).registrations
        assert len(acknowledged) + 1 <= stored <= len(acknowledged) + 1 + len(on_a)
    b.process.terminate()
    assert b.wait() == 0
    drop_collections(config)


@pytest.mark.timeout(600)
def test_milvus_killed_during_an_enroll_stream(tmp_path, faces):
    """SIGKILL to the Milvus server while an EnrollStream runs, then a restart on the same
    base directory (Milvus serves again once its killed components' etcd sessions expire,
    ~30 s). Calls meanwhile answer UNAVAILABLE, never a verdict from a gallery that is not
    there; every acknowledged enrolment is there afterwards and is its own top match; the
    stream goes on enrolling."""
    milvus = MilvusServer(tmp_path / "milvus")
    milvus.start()
    node = RunningServer(ServerConfig(store=StoreConfig(data_dir=tmp_path / "node"),
                                      milvus=MilvusConfig(uri=milvus.uri)))
    people = faces.persons(200)
    responses: list[pb.EnrollResponse] = []
    back = threading.Event()

    def requests():
        for n, person in enumerate(people):
            if n == 120:  # the rest once Milvus serves again
                back.wait(300)
            yield pb.EnrollRequest(registration=registration_of(f"r{n}", f"ID{n}"),
                                   face=face(person))
            time.sleep(0.02)

    def stream() -> None:
        for response in node.stub.EnrollStream(requests(), timeout=600):
            responses.append(response)

    streaming = threading.Thread(target=stream)
    streaming.start()
    while len(responses) < 40:
        time.sleep(0.01)
    milvus.kill()

    def outage() -> None:
        time.sleep(3)
        milvus.start()
        while not _serves(node):
            time.sleep(0.5)

    during = _answers_while(node, people[:5], outage)
    back.set()
    streaming.join(600)
    failed = [r for r in responses if r.HasField("error")]
    acknowledged = [r.registration.registration_id for r in responses
                    if not r.HasField("error")]
    assert len(responses) == len(people)
    assert failed and {r.error.code for r in failed} == {"UNAVAILABLE"}
    assert {f"r{n}" for n in range(120, len(people))} <= set(acknowledged)
    assert {answer for answer in during if isinstance(answer, str)} == {"UNAVAILABLE"}
    verdicts = [pb.Verdict.Name(answer) for answer in during if not isinstance(answer, str)]
    assert set(verdicts) == {"SAME_PERSON"}, verdicts
    for registration_id in acknowledged:
        n = int(registration_id[1:])
        top = check(node.stub, people[n], max_candidates=1).matches
        assert [m.registration.registration_id for m in top] == [registration_id]
    assert node.stub.Stats(pb.StatsRequest()).registrations >= len(acknowledged)
    node.stop()
    milvus.stop()


def _serves(node: RunningServer) -> bool:
    try:
        node.stub.Stats(pb.StatsRequest(), timeout=30)
        return True
    except grpc.RpcError:
        return False


def _answers_while(node: RunningServer, people: list[np.ndarray], during) -> list[object]:
    """Checks of enrolled people (r0..r4, claiming their own IDs) on a thread while
    `during()` runs: each verdict, or the status code name of a failed call."""
    answers: list[object] = []
    done = threading.Event()

    def checking() -> None:
        while not done.is_set():
            for n, person in enumerate(people):
                try:
                    answers.append(check(node.stub, person, f"ID{n}").verdict)
                except grpc.RpcError as error:
                    answers.append(error.code().name)

    thread = threading.Thread(target=checking)
    thread.start()
    try:
        during()
    finally:
        done.set()
        thread.join(120)
    return answers


# -- erasure ------------------------------------------------------------------------

def _parquet_values(data: bytes) -> bytes:
    """The values of the (zstd-compressed) parquet payloads in a Milvus binlog, as bytes:
    strings UTF-8, vectors as their raw bytes."""
    import pyarrow.parquet as pq

    values = []
    start = data.find(b"PAR1")
    while start >= 0:
        end = data.find(b"PAR1", start + 4)
        while end >= 0:
            try:
                table = pq.read_table(io.BytesIO(data[start:end + 4]))
            except Exception:
                end = data.find(b"PAR1", end + 4)
                continue
            for column in table.columns:
                for value in column.to_pylist():
                    values.append(value.encode() if isinstance(value, str) else
                                  bytes(value) if isinstance(value, bytes | bytearray) else b"")
            break
        start = data.find(b"PAR1", (end if end >= 0 else start) + 4)
    return b"\x00".join(values)


def files_holding(base: Path, needles: list[bytes]) -> list[str]:
    """Files under `base` (not the server's binaries) holding any of `needles`, as stored or
    inside a binlog's compressed parquet payload. Milvus rewrites files as it goes (rocksdb
    compacts its write-ahead log every few seconds): files that appear during the scan are
    scanned too, until a listing shows none unscanned; files gone by then do not count."""
    holding: dict[Path, bool] = {}
    for _ in range(1000):
        unscanned = [path for path in _files(base) if path not in holding]
        if not unscanned:
            break
        for path in unscanned:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            readable = data + _parquet_values(data) if b"PAR1" in data else data
            holding[path] = any(needle in readable for needle in needles)
    else:
        raise AssertionError(f"{base}: the files never stopped changing")
    present = set(_files(base))
    return [str(path.relative_to(base)) for path, held in holding.items()
            if held and path in present]


def _files(base: Path) -> list[Path]:
    return [path for path in sorted(base.rglob("*")) if path.is_file()
            and not path.is_symlink() and path.relative_to(base).parts[0] != "bin"]


def embedding_pieces(vector: np.ndarray) -> list[bytes]:
    """The stored float32 embedding in 64-byte pieces: Milvus's write-ahead log (rocksdb)
    splits records into blocks, so the 2,048 bytes need not be contiguous in a file."""
    values = np.asarray(vector, np.float32).astype(np.float64)  # normalised as the server does
    stored = (values / np.linalg.norm(values)).astype(np.float32).tobytes()
    return [stored[i:i + 64] for i in range(0, len(stored), 64)]


VICTIMS = [("registration_id", "victim-r", "VICTIM-ID-1001", "+8613911110001"),
           ("id_number", "victim-i", "VICTIM-ID-2002", "+8613922220002"),
           ("msisdn", "victim-m", "VICTIM-ID-3003", "+8613933330003")]
CASE = {"case_id": "CASE-9", "purpose": "erasure check"}


def _outside_the_wal(files: list[str]) -> list[str]:
    return [name for name in files if not name.startswith("data/rocksmq/")]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("wal", ["default", "forgetful"])
def test_erasure_down_to_the_milvus_base_directory(tmp_path, faces, keys, wal):
    """After Delete (by each key) and Compact, the erased embeddings, ID numbers and phone
    numbers leave every segment file (binlogs, decoded), etcd and the logs once the test
    server's garbage collector has run (tests/milvus_server.py TEST_SETTINGS); the others'
    stay. With Milvus's default write-ahead log retention its insert messages are still in
    the WAL (data/rocksmq, kept 3 days); with a WAL that forgets after 30 s (not safe for
    real data: FORGETFUL_WAL_SETTINGS) they are in no file at all."""
    from milvus_server import FORGETFUL_WAL_SETTINGS
    from secure import channel

    milvus = MilvusServer(tmp_path / "milvus",
                          FORGETFUL_WAL_SETTINGS if wal == "forgetful" else None)
    milvus.start()
    node = RunningServer(ServerConfig(
        store=StoreConfig(data_dir=tmp_path / "node"), milvus=MilvusConfig(uri=milvus.uri),
        security=load_security(keys / "security.toml")))
    people = faces.persons(30)
    admin, investigator = (channel(node.port, keys, role=role)
                           for role in ("admin", "investigator"))
    stub, investigate = pb_grpc.FaceDedupStub(admin), pb_grpc.InvestigateStub(investigator)
    for i, person in enumerate(people[len(VICTIMS):]):
        stub.Enroll(pb.EnrollRequest(registration=registration_of(f"r{i}", f"ID{i}"),
                                     face=face(person)))
    for (_, registration_id, id_number, msisdn), person in zip(VICTIMS, people, strict=False):
        stub.Enroll(pb.EnrollRequest(registration=registration_of(registration_id, id_number,
                                                                  msisdn), face=face(person)))
        investigate.Links(pb.LinksRequest(**CASE, id_number=id_number))
        investigate.Adjudicate(pb.AdjudicateRequest(
            **CASE, registration_id=registration_id, matched_registration_id="r0",
            decision=pb.DIFFERENT_PEOPLE))
    node.server.gallery.checkpoint()  # sealed into segment files, as after a while
    needles = [[*embedding_pieces(person), id_number.encode(), msisdn.encode()]
               for (_, _, id_number, msisdn), person in zip(VICTIMS, people, strict=False)]
    for pieces in needles:
        assert _outside_the_wal(files_holding(milvus.base_dir, pieces))
    for by, registration_id, id_number, msisdn in VICTIMS:
        value = {"registration_id": registration_id, "id_number": id_number,
                 "msisdn": msisdn}[by]
        assert list(stub.Delete(pb.DeleteRequest(**{by: value})).registration_ids) == \
            [registration_id]
    node.server.gallery.checkpoint()
    pb_grpc.IndexAdminStub(admin).Compact(pb.CompactRequest())
    started = time.monotonic()
    everything = [needle for pieces in needles for needle in pieces]
    gone = (lambda files: not files) if wal == "forgetful" else \
        (lambda files: not _outside_the_wal(files))
    while not gone(files_holding(milvus.base_dir, everything)) and \
            time.monotonic() - started < 300:
        time.sleep(2)
    left = {needle: files_holding(milvus.base_dir, [needle]) for needle in everything}
    if wal == "forgetful":
        assert {needle: files for needle, files in left.items() if files} == {}
    else:
        assert {needle: _outside_the_wal(files) for needle, files in left.items()
                if _outside_the_wal(files)} == {}
        assert any(left.values()), "the default WAL keeps the insert messages"
    print(f"{wal} WAL: erased {time.monotonic() - started:.0f} s after Compact")
    assert _outside_the_wal(files_holding(milvus.base_dir, [b"ID26"]))  # the others' stay
    assert stub.Stats(pb.StatsRequest()).registrations == len(people) - len(VICTIMS)
    r0_key = node.server.gallery.stored_face("r0")[0]
    assert node.server.gallery.settled(r0_key) == {}  # no settlement names a victim
    admin.close()
    investigator.close()
    node.stop()
    milvus.stop()
