"""The audit trail authenticated with a key kept out of the data directory, and anchored
outside it: a trail rewritten and re-hashed, cut short or rolled back to an older copy is
caught by `dedup audit verify --key --anchor`; ID numbers and phone numbers are stored as
keyed pseudonyms, which `dedup audit export --id-number/--msisdn` finds again."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
from conftest import face, registration
from secure import channel, secured
from trail import records

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc

CASE = {"case_id": "CASE-4", "purpose": "audit key test"}
CASE_METADATA = (("x-case-id", "CASE-4"), ("x-purpose", "audit key test"))
EMBEDDED_TRAIL = "rewrites the LMDB audit database and reads DATA_DIR (Milvus: its own test)"


def dedup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", *args], capture_output=True,
                          text=True, timeout=120)


def enrol_people(server, keys: Path, faces, count: int = 3) -> None:
    with channel(server.port, keys, role="admin") as admin:
        stub = pb_grpc.FaceDedupStub(admin)
        for i, person in enumerate(faces.persons(count)):
            stub.Enroll(pb.EnrollRequest(registration=registration(
                f"r{i}", f"ID{i}", f"+86139000000{i:02d}"), face=face(person)))


def searches(server, keys: Path, count: int) -> None:
    """`count` audited investigator reads."""
    with channel(server.port, keys, role="investigator") as investigator:
        stub = pb_grpc.InvestigateStub(investigator)
        for _ in range(count):
            stub.Search(pb.SearchRequest(**CASE, registration_id="r0", k=2))


def anchored(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() \
        else []


def wait_for_anchor(path: Path, sequence: int) -> None:
    deadline = time.monotonic() + 30
    while not any(line["seq"] == sequence for line in anchored(path)):
        assert time.monotonic() < deadline, anchored(path)
        time.sleep(0.05)


# -- the record format as documented (README, Audit trail): public; the key is not ------

def signed_content(record: dict) -> bytes:
    """What a record's hash and MAC cover: its canonical JSON without them."""
    return json.dumps({k: v for k, v in record.items() if k not in ("hash", "mac")},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class AuditKey:
    def __init__(self, path: Path) -> None:
        self.secret = bytes.fromhex(path.read_text().strip())

    def mac(self, content: bytes) -> str:
        return hmac.new(self.secret, content, hashlib.sha256).hexdigest()

    def pseudonym(self, kind: str, value: str) -> str:
        return "hmac:" + self.mac(f"{kind}\0{value}".encode())


def read_audit_key(path: Path) -> AuditKey:
    return AuditKey(path)


def rewrite_trail(data_dir: Path, change, key: AuditKey | None = None) -> None:
    """Reads every record, lets `change` edit the list, then re-numbers, re-links and
    re-hashes them (and with `key`, an insider's, re-MACs them) and writes them back with a
    head to match."""
    env = lmdb.open(str(data_dir / "store"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            audit, meta = env.open_db(b"audit", txn=txn), env.open_db(b"meta", txn=txn)
            trail = [json.loads(value) for _, value in txn.cursor(db=audit)]
            trail = change(trail)
            previous = bytes(32)
            txn.drop(audit, delete=False)
            for sequence, record in enumerate(trail, 1):
                record.update(seq=sequence, prev=previous.hex())
                previous = hashlib.sha256(signed_content(record)).digest()
                record["hash"] = previous.hex()
                if key is not None:
                    record["mac"] = key.mac(signed_content(record))
                txn.put(sequence.to_bytes(8, "big"), json.dumps(record).encode(), db=audit)
            txn.put(b"audit_head", len(trail).to_bytes(8, "big") + previous, db=meta)
    finally:
        env.close()


def the_reviews_attack(trail: list[dict]) -> list[dict]:
    """Drop record 1, cut the last two, change a caller."""
    trail = trail[1:-2]
    trail[0]["caller"] = "CN=someone-else"
    return trail


@pytest.mark.embedded_only(reason=EMBEDDED_TRAIL)
def test_a_trail_rewritten_and_rehashed_fails_its_macs(make_server, keys, faces, tmp_path):
    server = secured(make_server, keys)
    enrol_people(server, keys, faces)
    searches(server, keys, 6)
    server.stop()
    copy = tmp_path / "copy"
    shutil.copytree(server.data_dir, copy)
    rewrite_trail(copy, the_reviews_attack)

    unkeyed = dedup("audit", "verify", str(copy))  # the hash chain alone cannot tell
    assert unkeyed.returncode == 0 and "intact: 3 records" in unkeyed.stdout
    assert "MACs not checked" in unkeyed.stdout
    keyed = dedup("audit", "verify", str(copy), "--key", str(keys / "audit.key"))
    assert keyed.returncode == 1, keyed.stdout + keyed.stderr
    assert "BROKEN at record 1: record 1's MAC does not match" in keyed.stdout
    original = dedup("audit", "verify", str(server.data_dir), "--key", str(keys / "audit.key"))
    assert original.returncode == 0, original.stdout + original.stderr
    assert "intact: 6 records, each chained to the one before, its MAC valid" in original.stdout
    assert not (server.data_dir / "audit.key").exists()  # the key is not beside the records


@pytest.mark.embedded_only(reason=EMBEDDED_TRAIL)
def test_anchors_catch_truncation_rewriting_and_rollback(make_server, keys, faces, tmp_path,
                                                         caplog):
    caplog.set_level("INFO", logger="dedup.audit")
    anchors = tmp_path / "elsewhere" / "anchors.jsonl"
    anchors.parent.mkdir()
    server = secured(make_server, keys, audit_anchor_file=anchors,
                     audit_anchor_interval_s=0.1)
    enrol_people(server, keys, faces)
    searches(server, keys, 3)
    wait_for_anchor(anchors, 3)
    backup = tmp_path / "backup"
    assert dedup("backup", str(server.data_dir), str(backup)).returncode == 0
    searches(server, keys, 3)
    server.stop()  # anchors the head a last time
    assert anchored(anchors)[-1]["seq"] == 6
    assert anchors.stat().st_mode & 0o777 == 0o600
    assert set(anchored(anchors)[0]) == {"time", "seq", "hash", "mac"}
    assert any(message.startswith("audit anchor {") for message in caplog.messages)
    key = str(keys / "audit.key")

    def verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
        return dedup("audit", "verify", str(data_dir), "--key", key, "--anchor", str(anchors))

    intact = verify(server.data_dir)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "anchor(s) agree" in intact.stdout
    rolled_back = verify(backup)  # an older copy: every MAC valid, but short of the anchors
    assert rolled_back.returncode == 1
    assert "the chain ends at record 3, but an anchor" in rolled_back.stdout
    assert "rolled back to an older copy" in rolled_back.stdout

    insider = read_audit_key(keys / "audit.key")  # even with the key
    for name, change, words in (
            ("cut", lambda trail: trail[:-2], "the chain ends at record 4, but an anchor"),
            ("edited", _edit_second, "is not the one an anchor")):
        copy = tmp_path / name
        shutil.copytree(server.data_dir, copy)
        rewrite_trail(copy, change, insider)
        assert dedup("audit", "verify", str(copy), "--key", key).returncode == 0
        caught = verify(copy)
        assert caught.returncode == 1 and words in caught.stdout, caught.stdout


def _edit_second(trail: list[dict]) -> list[dict]:
    trail[1]["purpose"] = "nothing to see"
    return trail


@pytest.mark.embedded_only(reason=EMBEDDED_TRAIL)
def test_anchor_on_demand_and_a_forged_anchor(make_server, keys, faces, tmp_path):
    server = secured(make_server, keys)
    enrol_people(server, keys, faces)
    searches(server, keys, 2)
    server.stop()
    out = tmp_path / "anchors.jsonl"
    key = str(keys / "audit.key")
    made = dedup("audit", "anchor", str(server.data_dir), "--key", key, "--out", str(out))
    assert made.returncode == 0, made.stdout + made.stderr
    (line,) = anchored(out)
    assert line["seq"] == 2 and line["hash"] == records(server.data_dir)[-1]["hash"]
    assert out.stat().st_mode & 0o777 == 0o600
    assert dedup("audit", "verify", str(server.data_dir), "--key", key, "--anchor",
                 str(out)).returncode == 0
    forged = tmp_path / "forged.jsonl"
    forged.write_text(json.dumps(line | {"seq": 9}) + "\n")
    refused = dedup("audit", "verify", str(server.data_dir), "--key", key, "--anchor",
                    str(forged))
    assert refused.returncode == 1 and "is not authentic" in refused.stderr


@pytest.mark.parametrize("backend", ["milvus"])
def test_milvus_chains_macs_and_anchors(make_server, keys, faces, tmp_path):
    from conftest import release_milvus_lite

    anchors = tmp_path / "anchors.jsonl"
    server = secured(make_server, keys, audit_anchor_file=anchors)
    enrol_people(server, keys, faces)
    searches(server, keys, 3)
    server.stop()
    uri = server.config.milvus.uri
    release_milvus_lite(Path(uri))
    key = str(keys / "audit.key")
    on_demand = tmp_path / "on-demand.jsonl"
    assert dedup("audit", "anchor", "--milvus-uri", uri, "--key", key, "--out",
                 str(on_demand)).returncode == 0
    assert [line["seq"] for line in anchored(anchors)] == [3] == \
        [line["seq"] for line in anchored(on_demand)]
    assert anchored(anchors)[0]["chain"] == anchored(on_demand)[0]["chain"]
    intact = dedup("audit", "verify", "--milvus-uri", uri, "--key", key, "--anchor",
                   str(anchors))
    assert intact.returncode == 0, intact.stdout + intact.stderr

    _drop_last_record(uri)
    cut = dedup("audit", "verify", "--milvus-uri", uri, "--key", key, "--anchor", str(anchors))
    assert cut.returncode == 1 and "the chain ends at record 2, but an anchor" in cut.stdout
    assert dedup("audit", "verify", "--milvus-uri", uri, "--key", key).returncode == 0


def _drop_last_record(uri: str) -> None:
    from conftest import release_milvus_lite
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        client.load_collection("dedup_audit")
        client.delete("dedup_audit", filter="seq == 3")
    finally:
        client.close()
    release_milvus_lite(Path(uri))


def test_personal_values_are_pseudonyms_that_export_finds(make_server, keys, faces, tmp_path):
    server = secured(make_server, keys)
    enrol_people(server, keys, faces)
    person = faces.persons(3)[1]
    with channel(server.port, keys, role="investigator") as investigator:
        pb_grpc.InvestigateStub(investigator).Links(pb.LinksRequest(**CASE, id_number="ID1"))
        pb_grpc.FaceDedupStub(investigator).Check(
            pb.CheckRequest(face=face(person), claimed_id_number="ID1"),
            metadata=CASE_METADATA)
    with channel(server.port, keys, role="admin") as admin:
        pb_grpc.FaceDedupStub(admin).Delete(pb.DeleteRequest(msisdn="+8613900000002"))
    server.stop()
    trail = records(server)
    assert [r["method"] for r in trail] == ["Investigate.Links", "FaceDedup.Check",
                                            "FaceDedup.Delete"]
    text = json.dumps(trail)
    assert "ID1" not in text and "+8613900000002" not in text and "13900000002" not in text
    key = read_audit_key(keys / "audit.key")
    assert trail[0]["query"]["id_number"] == trail[1]["query"]["claimed_id_number"] == \
        key.pseudonym("id_number", "ID1")

    milvus = server.config.milvus
    where = ["--milvus-uri", milvus.uri, "--milvus-prefix", milvus.prefix] if milvus \
        else [str(server.data_dir)]
    if milvus and milvus.is_lite:
        from conftest import release_milvus_lite

        release_milvus_lite(Path(milvus.uri))
    about = dedup("audit", "export", *where, "--key", str(keys / "audit.key"),
                  "--id-number", "ID1")
    assert about.returncode == 0, about.stderr
    assert [json.loads(line)["method"] for line in about.stdout.splitlines()] == [
        "Investigate.Links", "FaceDedup.Check"]
    phone = dedup("audit", "export", *where, "--key", str(keys / "audit.key"),
                  "--msisdn", "+8613900000002")
    assert [json.loads(line)["returned"] for line in phone.stdout.splitlines()] == [["r2"]]
    keyless = dedup("audit", "export", *where, "--id-number", "ID1")
    assert keyless.returncode != 0 and "need --key" in keyless.stderr
