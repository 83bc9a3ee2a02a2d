"""The Milvus backend across nodes: two `dedup serve` processes on one Milvus, racing.

Milvus Lite runs as its own server process here (`python -m milvus_lite server`), so the
two dedup nodes share nothing but Milvus, as behind a load balancer. The rest of the
service suite runs on Milvus through the `backend` parameter (see conftest.py).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import check, enroll, release_milvus_lite
from processes import ServerProcess
from trail import records

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.records import Registration
from dedup.core.settings import MilvusConfig
from dedup.gallery.milvus import MilvusGallery
from dedup.gallery.milvus.schema import PENDING, _new_key, _now_us, _Row

ROUNDS = 12


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def milvus_uri(tmp_path: Path):
    """A Milvus Lite server in a process of its own; its URI."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "lite"),
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("milvus_lite server did not start") from None
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def two_nodes(milvus_uri: str, tmp_path: Path):
    """Two dedup nodes on the same Milvus, each with its own (empty) node directory."""
    nodes = [ServerProcess(tmp_path / f"node{n}", "--backend", "milvus", "--milvus-uri",
                           milvus_uri, "--milvus-flush-interval", "0.5") for n in range(2)]
    channels = [grpc.insecure_channel(node.address) for node in nodes]
    yield [pb_grpc.FaceDedupStub(channel) for channel in channels]
    for channel in channels:
        channel.close()
    for node in nodes:
        node.process.terminate()
        assert node.wait() == 0


def _race(calls):
    """Runs the calls at the same moment on their own threads; their results or errors."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except grpc.RpcError as error:
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_two_nodes_never_both_enrol_one_face(two_nodes, faces):
    """The same face under two ID numbers, on two nodes at once: exactly one enrols."""
    a, b = two_nodes
    people = faces.persons(ROUNDS)
    for n, person in enumerate(people):
        first, second = faces.capture(person), faces.capture(person)
        results = _race([
            partial(enroll, a, f"a{n}", f"IDA{n}", first, check_first=True),
            partial(enroll, b, f"b{n}", f"IDB{n}", second, check_first=True)])
        assert all(isinstance(r, pb.EnrollResponse) for r in results), results
        enrolled = [r for r in results if r.enrolled]
        refused = [r for r in results if not r.enrolled]
        assert len(enrolled) == 1 and len(refused) == 1, results
        assert refused[0].check.verdict == pb.DUPLICATE_IDENTITY
        winner = enrolled[0].registration.registration_id
        assert [m.registration.registration_id for m in refused[0].check.matches] == [winner]
        for stub in (a, b):  # both nodes see the one registration at once
            seen = check(stub, faces.capture(person))
            assert [m.registration.registration_id for m in seen.matches] == [winner]
    stats = [stub.Stats(pb.StatsRequest()) for stub in (a, b)]
    assert [s.registrations for s in stats] == [ROUNDS, ROUNDS]


def test_two_nodes_never_both_take_one_key(two_nodes, faces):
    """One registration_id (or msisdn) enrolled on two nodes at once: one ALREADY_EXISTS."""
    a, b = two_nodes
    for n in range(ROUNDS):
        one, other = faces.persons(2)
        msisdn = f"+86138{n:08d}"
        results = _race([
            partial(enroll, a, f"same{n}", f"IDA{n}", one, msisdn=msisdn),
            partial(enroll, b, f"same{n}" if n % 2 else f"other{n}", f"IDB{n}", other,
                    msisdn=msisdn)])
        errors = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(errors) == 1, results
        assert errors[0].code() == grpc.StatusCode.ALREADY_EXISTS
        assert ("registration_id" if n % 2 else "msisdn") in errors[0].details()


def test_sim_limit_holds_across_nodes(two_nodes, faces):
    """Two nodes enrolling the last allowed SIM of one ID at once: only one gets it."""
    a, b = two_nodes
    person = faces.persons(1)[0]
    for i in range(4):  # max_sims_per_id is 5
        assert enroll(a, f"s{i}", "ID-S", faces.capture(person), check_first=True).enrolled
    results = _race([
        lambda: enroll(a, "s4a", "ID-S", faces.capture(person), check_first=True),
        lambda: enroll(b, "s4b", "ID-S", faces.capture(person), check_first=True)])
    assert sorted(r.enrolled for r in results) == [False, True], results
    assert check(b, faces.capture(person), "ID-S").verdict == pb.SIM_LIMIT_EXCEEDED


@pytest.mark.parametrize("backend", ["milvus"])
def test_an_abandoned_claim_holds_until_it_expires(make_server, faces, tmp_path):
    """A node killed mid-enrolment leaves a PENDING row: as the earlier claim it wins, so
    its face and msisdn stay taken until claim_timeout_s; then others ignore it."""
    config = MilvusConfig(uri=str(tmp_path / "milvus.db"), flush_interval_s=0.5,
                          claim_timeout_s=3.0)
    server = make_server(milvus=config)
    person = faces.persons(1)[0]
    model_id = server.server.gallery.model_id
    dead = MilvusGallery(config, model_id, background=False)
    dead._upsert(_Row(_new_key(), Registration("ghost", "ID-G", "+8613800000000",
                                               embedding_model=model_id),
                      PENDING, _now_us()), faces.capture(person))
    same_face = enroll(server.stub, "fresh", "ID-F", faces.capture(person), check_first=True)
    assert not same_face.enrolled and same_face.check.verdict == pb.DUPLICATE_IDENTITY
    with pytest.raises(grpc.RpcError) as taken:
        enroll(server.stub, "other", "ID-O", faces.persons(1)[0], msisdn="+8613800000000")
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    time.sleep(3.2)  # the claim has expired: nobody counts it any more
    retried = enroll(server.stub, "fresh", "ID-F", faces.capture(person), check_first=True,
                     msisdn="+8613800000000")
    assert retried.enrolled and retried.check.verdict == pb.CLEAR
    with pytest.raises(grpc.RpcError) as missing:
        server.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="ghost"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    dead.close(checkpoint=False)


def _migrate(source: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", "migrate", "--from",
                           str(source), "--to", str(target), "--batch", "64", "--sample", "40"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("backend", ["embedded"])
def test_migrate_copies_verifies_and_resumes(make_server, faces, tmp_path):
    source = make_server()
    people = faces.persons(300)
    for i, person in enumerate(people):
        enroll(source.stub, f"r{i}", f"ID{i}", person, msisdn=f"+86139{i:08d}")
    enroll(source.stub, "r0-again", "ID-OTHER", faces.capture(people[0]))
    investigate = pb_grpc.InvestigateStub(source.channel)
    investigate.Search(pb.SearchRequest(case_id="C-1", purpose="migration test",
                                        registration_id="r0", k=3))
    probe = faces.capture(people[0])
    before = check(source.stub, probe, "ID0")
    source.stop()
    target = tmp_path / "migrated.db"

    first = _migrate(source.data_dir, target)
    assert first.returncode == 0, first.stderr
    assert "copied 301 registrations, 1 audit records" in first.stdout
    assert "store 301 registrations, Milvus 301; 40/40 sampled" in first.stdout
    state = source.data_dir / "milvus-migration.json"
    saved = json.loads(state.read_text())
    state.write_text(json.dumps(saved | {"last_key": 150}))  # as if cut off after key 150
    resumed = _migrate(source.data_dir, target)
    assert resumed.returncode == 0, resumed.stderr
    assert "copied 151 registrations (resumed after key 150)" in resumed.stdout
    assert "Milvus 301" in resumed.stdout and "verified" in resumed.stdout

    migrated = make_server(milvus=MilvusConfig(uri=str(target), flush_interval_s=0.5))
    after = check(migrated.stub, probe, "ID0")
    assert after.verdict == before.verdict == pb.DUPLICATE_IDENTITY
    assert [(m.registration.registration_id, round(m.score, 5)) for m in after.matches] == \
        [(m.registration.registration_id, round(m.score, 5)) for m in before.matches]
    assert migrated.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="r7")) \
        .msisdn == "+8613900000007"
    migrated.stop()
    assert [r["method"] for r in records(migrated)] == ["Investigate.Search"]
    release_milvus_lite(target)


def test_keys_with_quotes_and_backslashes_are_found_and_deleted(server, faces):
    """Milvus filters quote strings: a key that looks like filter syntax is just a key."""
    tricky = 'ID "7" \\ or id_number != ""'
    person = faces.persons(1)[0]
    assert enroll(server.stub, 'r"1\\', tricky, person, msisdn="+8613700000001").enrolled
    enroll(server.stub, "plain", "ID-PLAIN", faces.persons(1)[0])
    assert check(server.stub, faces.capture(person), tricky).verdict == pb.SAME_PERSON
    assert server.stub.GetRegistration(
        pb.GetRegistrationRequest(registration_id='r"1\\')).id_number == tricky
    deleted = server.stub.Delete(pb.DeleteRequest(id_number=tricky))
    assert list(deleted.registration_ids) == ['r"1\\']
    assert server.stub.Stats(pb.StatsRequest()).registrations == 1


def test_iteration_covers_every_registration_in_key_order(tmp_path, faces):
    """Pages of a Milvus query with a limit are any matching rows, not the first ones:
    iteration (FindClusters, Stats) must still see every registration once, in key order."""
    lite = tmp_path / "milvus.db"
    gallery = MilvusGallery(MilvusConfig(uri=str(lite)), "model-x", background=False)
    try:
        vectors = faces.persons(700)
        keys = [int(key) for key in np.random.default_rng(3).choice(2**62, 700, replace=False)]
        by_key = dict(zip(keys, vectors, strict=True))
        gallery.insert_rows([
            (key, Registration(f"r{i}", f"ID{i % 350}", embedding_model="model-x"), vector)
            for i, (key, vector) in enumerate(by_key.items())])
        seen: list[int] = []
        for page_keys, matrix in gallery.iter_vectors(100):
            seen += page_keys
            assert np.allclose(matrix, np.vstack([by_key[key] for key in page_keys]))
        assert seen == sorted(keys)
        assert gallery.stats().distinct_id_numbers == 350
    finally:
        gallery.close(checkpoint=False)
        release_milvus_lite(lite)


def _audit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", "audit", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("backend", ["milvus"])
def test_milvus_audit_chains_verify_export_and_show_an_edit(make_server, faces, tmp_path):
    server = make_server()
    enroll(server.stub, "r0", "ID0", faces.persons(1)[0])
    case = {"case_id": "C-9", "purpose": "chain test"}
    for _ in range(2):  # two node processes' lifetimes: two chains
        investigate = pb_grpc.InvestigateStub(server.channel)
        for _ in range(3):
            investigate.Search(pb.SearchRequest(**case, registration_id="r0", k=1))
        server.restart()
    server.stop()
    uri = server.config.milvus.uri
    release_milvus_lite(Path(uri))

    intact = _audit("verify", "--milvus-uri", uri)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "audit trail intact: 2 chain(s), 6 records" in intact.stdout
    exported = _audit("export", "--milvus-uri", uri)
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["case_id"] for line in lines] == ["C-9"] * 6
    assert [line["time"] for line in lines] == sorted(line["time"] for line in lines)

    _edit_second_record(uri)
    broken = _audit("verify", "--milvus-uri", uri)
    assert broken.returncode == 1
    assert "BROKEN at record 2: record 2 was edited" in broken.stdout
    assert "1 broken" in broken.stdout


def _edit_second_record(uri: str) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        client.load_collection("dedup_audit")
        (row,) = client.query("dedup_audit", filter="seq == 2", limit=1,
                              output_fields=["key", "chain", "seq", "record", "placeholder"])
        record = json.loads(row["record"])
        record["purpose"] = "something else"
        client.upsert("dedup_audit", [dict(row) | {"record": json.dumps(record)}])
    finally:
        client.close()
    release_milvus_lite(Path(uri))
