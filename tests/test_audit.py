"""The audit trail: a record for every investigator call and every Delete, written before the
reply; a hash chain that `dedup audit verify` checks; a failed write fails the call."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import grpc
import lmdb
import numpy as np
import pytest
from conftest import enroll, face
from trail import records

from dedup import MIB
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.audit_chain import read_audit_key, signed_content

CASE = {"case_id": "CASE-7", "purpose": "ring review"}


def dedup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def audited(server, faces):
    """A server with 3 registrations and one call of each audited kind made."""
    people = faces.persons(3)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    enroll(server.stub, "r0b", "IDX", faces.capture(people[0]))
    investigate = pb_grpc.InvestigateStub(server.channel)
    probe = face(faces.capture(people[0]))
    replies = {
        "search_face": investigate.Search(pb.SearchRequest(**CASE, face=probe, k=2)),
        "search_id": investigate.Search(pb.SearchRequest(**CASE, registration_id="r1", k=3)),
        "links": investigate.Links(pb.LinksRequest(**CASE, id_number="ID0")),
        "clusters": list(investigate.FindClusters(pb.FindClustersRequest(**CASE))),
        "delete": server.stub.Delete(pb.DeleteRequest(registration_id="r2")),
    }
    server.stop()
    return server, replies, probe


def test_every_audited_call_leaves_a_record(audited):
    data_dir, replies, _ = audited
    trail = records(data_dir)
    assert [r["method"] for r in trail] == [
        "Investigate.Search", "Investigate.Search", "Investigate.Links",
        "Investigate.FindClusters", "Investigate.FindClusters", "FaceDedup.Delete"]
    search_face, search_id, links, clusters_start, clusters, delete = trail
    for record in trail[:5]:
        assert (record["case_id"], record["purpose"]) == (CASE["case_id"], CASE["purpose"])
        assert record["caller"] == "unauthenticated (loopback)" and record["role"] == "admin"
    assert search_face["returned"] == [m.registration.registration_id
                                       for m in replies["search_face"].matches]
    assert search_face["hash"] == replies["search_face"].audit_record_hash
    # The probe appears as a hash of the unit vector, never as its values.
    assert set(search_face["query"]) >= {"embedding_sha256"}
    assert "values" not in json.dumps(search_face)
    assert len(search_face["query"]["embedding_sha256"]) == 64
    assert search_id["query"]["registration_id"] == "r1"
    # The ID number as a pseudonym under the audit key (without a security file: the one
    # made in the data directory), never the value.
    key = read_audit_key(data_dir.data_dir / "audit.key")
    assert links["query"] == {"id_number": key.pseudonym("id_number", "ID0")}
    assert all(key.verifies(signed_content(record), record["mac"]) for record in trail)
    assert set(links["returned"]) == {"r0", "r0b"}
    assert clusters_start["returned"] == []
    cluster_replies = [u for u in replies["clusters"] if u.HasField("cluster")]
    assert set(clusters["returned"]) == {"r0", "r0b"}
    assert cluster_replies[0].audit_record_hash == clusters["hash"]
    assert delete["returned"] == ["r2"] and delete["query"] == {"registration_id": "r2"}
    assert replies["delete"].audit_record_hash == delete["hash"]


def test_probe_hash_is_of_the_embedding_used(audited):
    data_dir, _, probe = audited
    values = np.asarray(probe.embedding.values, np.float32).astype(np.float64)
    unit = (values / np.linalg.norm(values)).astype(np.float32)  # normalised as the server does
    assert records(data_dir)[0]["query"]["embedding_sha256"] == hashlib.sha256(
        unit.tobytes()).hexdigest()


LMDB_TRAIL = ("`dedup audit verify/export DATA_DIR` read the LMDB trail; Milvus's per-node "
              "chains are verified in test_milvus.py")


@pytest.mark.embedded_only(reason=LMDB_TRAIL)
def test_verify_passes_an_intact_trail(audited):
    result = dedup("audit", "verify", str(audited[0].data_dir))
    assert result.returncode == 0, result.stdout
    assert "intact: 6 records" in result.stdout


def _rewrite(data_dir, change) -> None:
    env = lmdb.open(str(data_dir / "store"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            change(txn, env.open_db(b"audit", txn=txn))
    finally:
        env.close()


def _key(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _edit(txn, db) -> None:
    record = json.loads(txn.get(_key(3), db=db))
    record["returned"] = ["someone-else"]
    txn.put(_key(3), json.dumps(record).encode(), db=db)


def _remove(txn, db) -> None:
    txn.delete(_key(3), db=db)


def _reorder(txn, db) -> None:
    third, fourth = txn.get(_key(3), db=db), txn.get(_key(4), db=db)
    txn.put(_key(3), fourth, db=db)
    txn.put(_key(4), third, db=db)


def _cut(txn, db) -> None:
    txn.delete(_key(6), db=db)


@pytest.mark.parametrize("tamper, broken, words", [
    (_edit, 3, "edited"), (_remove, 4, "removed"), (_reorder, 3, "reordered"),
    (_cut, 6, "cut off"),
])
@pytest.mark.embedded_only(reason="tampers with the LMDB audit database")
def test_verify_names_the_first_broken_record(audited, tamper, broken, words):
    _rewrite(audited[0].data_dir, tamper)
    result = dedup("audit", "verify", str(audited[0].data_dir))
    assert result.returncode == 1
    assert f"BROKEN at record {broken}" in result.stdout and words in result.stdout


@pytest.mark.embedded_only(reason=LMDB_TRAIL)
def test_export_since_until(audited, tmp_path):
    trail = records(audited[0])
    out = tmp_path / "audit.jsonl"
    result = dedup("audit", "export", str(audited[0].data_dir), "--since", trail[1]["time"],
                   "--until", trail[3]["time"], "--out", str(out))
    assert result.returncode == 0, result.stderr
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in exported] == [2, 3]


def test_missing_case_or_purpose_is_refused_and_the_refusal_audited(server, faces):
    enroll(server.stub, "r0", "ID0", faces.persons(1)[0])
    investigate = pb_grpc.InvestigateStub(server.channel)
    for fields, named in (({"purpose": "p"}, "case_id"), ({"case_id": "c"}, "purpose")):
        with pytest.raises(grpc.RpcError) as refused:
            investigate.Links(pb.LinksRequest(id_number="ID0", **fields))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith(named)
    server.stop()
    trail = records(server)  # nothing returned, and no case kept: only the refusal
    assert [(r["method"], r["case_id"], r["returned"], r["query"]) for r in trail] == [
        ("Investigate.Links", "", [], {"outcome": "INVALID_ARGUMENT"})] * 2


@pytest.mark.embedded_only(reason="fills the LMDB map; Milvus Lite has no size cap to fill "
                                  "(a cluster refuses writes at its quota: the same UNAVAILABLE)")
def test_a_failed_audit_write_fails_the_call(make_server, faces):
    server = make_server(initial_map_size=MIB // 4, max_map_size=MIB // 4)
    people = faces.persons(1000)
    with pytest.raises(grpc.RpcError) as full:
        for i, person in enumerate(people):
            enroll(server.stub, f"r{i}", f"ID{i}", person)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    investigate = pb_grpc.InvestigateStub(server.channel)
    answered = 0
    with pytest.raises(grpc.RpcError) as refused:  # the records fill what space is left
        for _ in range(5000):
            assert investigate.Search(pb.SearchRequest(**CASE, registration_id="r0")).matches
            answered += 1
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "audit" in refused.value.details()
    server.stop()
    assert len(records(server)) == answered  # no reply without its record


def test_an_erasure_records_its_reason_and_a_miss_its_outcome(server, faces):
    """Delete's record had no case or purpose, and the caller could give none: the one act
    that cannot be undone was the one audited without a reason. It takes both from metadata
    (or neither; one alone is refused, naming the other, and erases nothing); a Delete that
    found nothing is recorded as NOT_FOUND, as other refused calls are."""
    for i, person in enumerate(faces.persons(2)):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    reason = (("x-case-id", "ERASURE-118"), ("x-purpose", "subject request"))
    erased = server.stub.Delete(pb.DeleteRequest(registration_id="r0"), metadata=reason)
    with pytest.raises(grpc.RpcError) as missing:
        server.stub.Delete(pb.DeleteRequest(registration_id="r-none"), metadata=reason)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as half:
        server.stub.Delete(pb.DeleteRequest(registration_id="r1"), metadata=reason[:1])
    assert half.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-purpose" in half.value.details()
    assert server.stub.GetRegistration(pb.GetRegistrationRequest(registration_id="r1"))
    server.stop()
    first, second = records(server)
    assert (first["case_id"], first["purpose"], first["returned"]) == (
        "ERASURE-118", "subject request", ["r0"])
    assert first["hash"] == erased.audit_record_hash
    assert second["query"] == {"registration_id": "r-none", "outcome": "NOT_FOUND"}
    assert (second["case_id"], second["returned"]) == ("ERASURE-118", [])
