"""Erasure that really erases: after Delete (by any of its three keys) and compaction the
embedding's bytes, the ID number and the phone number are in no file under the data directory
(the audit trail holds keyed pseudonyms, settlements go with the registration), and no search
at any threshold returns the registration."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import enroll, face, registration
from secure import channel

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.errors import FailedPrecondition
from dedup.core.security import load_security
from dedup.core.vectors import unit_vector

CASE = {"case_id": "CASE-9", "purpose": "erasure check"}

LMDB_BYTES = ("reads the LMDB and checkpoint files' bytes. Milvus Lite cannot pass it: its "
              "ManualCompaction is a no-op (milvus_lite's servicer: no on-demand trigger), so "
              "an erased embedding stays in its parquet and index files until its size-tiered "
              "compaction merges them (seen here); a cluster's Compact rewrites the segments")


def files_holding(data_dir: Path, needle: bytes) -> list[str]:
    return [str(path.relative_to(data_dir)) for path in sorted(data_dir.rglob("*"))
            if path.is_file() and needle in path.read_bytes()]


def stored_bytes(vector: np.ndarray) -> bytes:
    """The bytes the server stores: the float32 unit vector, normalised as the server does
    (a norm computed in float32 differs in the last bit now and then, and a search for those
    bytes would find nothing, erased or not)."""
    values = np.asarray(vector, np.float32)
    return unit_vector(values, len(values), "embedding").tobytes()


def never_returned(server, vector: np.ndarray, registration_id: str) -> None:
    investigate = pb_grpc.InvestigateStub(server.channel)
    found = investigate.Search(pb.SearchRequest(**CASE, face=pb.Face(embedding=pb.Embedding(
        values=vector.tolist())), k=1000, min_score=-1.0)).matches
    assert found and registration_id not in {m.registration.registration_id for m in found}
    check = server.stub.Check(pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(
        values=vector.tolist())), max_candidates=100))
    assert registration_id not in {m.registration.registration_id for m in check.matches}


def wait_until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert condition()


@pytest.mark.embedded_only(reason=LMDB_BYTES)
def test_delete_then_compact_leaves_no_byte_of_the_embedding(make_server, faces):
    server = make_server(checkpoint_interval_s=3600, erasure_checkpoint_delay_s=0.3)
    people = faces.persons(50)
    for i, person in enumerate(people):
        if i == 7:
            enroll(server.stub, "r7", "VICTIM-ID-0007", person, msisdn="+8613900000007")
        else:
            enroll(server.stub, f"r{i}", f"ID{i}", person)
    server.server.gallery.checkpoint()
    victim = stored_bytes(people[7])
    personal = [b"VICTIM-ID-0007", b"+8613900000007"]
    assert files_holding(server.data_dir, victim) == ["index.ckpt", "store/vectors.f32"]
    assert all(files_holding(server.data_dir, text) == ["store/data.mdb"] for text in personal)

    receipt = server.stub.Delete(pb.DeleteRequest(registration_id="r7"))
    # The embedding's slot is zeroed before the reply: only the index checkpoint has it now.
    assert "store/vectors.f32" not in files_holding(server.data_dir, victim)
    assert list(receipt.registration_ids) == ["r7"] and receipt.deleted == 1
    assert len(receipt.audit_record_hash) == 64
    assert receipt.erased_at.seconds > 0 and receipt.compaction_due.seconds > 0
    assert 0 < receipt.checkpoint_due.ToMicroseconds() - receipt.erased_at.ToMicroseconds() \
        <= 1_000_000
    # The checkpoint is rewritten by checkpoint_due; then no file holds the embedding.
    wait_until(lambda: files_holding(server.data_dir, victim) == [])
    never_returned(server, people[7], "r7")

    compacted = pb_grpc.IndexAdminStub(server.channel).Compact(pb.CompactRequest())
    assert compacted.bytes_after <= compacted.bytes_before
    assert files_holding(server.data_dir, victim) == []
    for text in personal:  # the record too: new pages hold no leftovers of deleted entries
        assert files_holding(server.data_dir, text) == []
    assert files_holding(server.data_dir, stored_bytes(people[8])) != []  # the others stay
    never_returned(server, people[7], "r7")
    server.restart()
    never_returned(server, people[7], "r7")
    assert files_holding(server.data_dir, victim) == []
    assert server.stub.Stats(pb.StatsRequest()).registrations == 49


@pytest.mark.embedded_only(reason=LMDB_BYTES)
def test_the_checkpoint_leaves_the_erased_out_by_the_receipts_checkpoint_due(make_server,
                                                                             faces):
    """The receipt's checkpoint_due is a promise: by then no file holds the embedding.
    (The checkpoint used to start at the first poll of the maintenance thread after it, so
    it was written up to a second and the writing late.)"""
    server = make_server(checkpoint_interval_s=3600, erasure_checkpoint_delay_s=1.5)
    people = faces.persons(40)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    server.server.gallery.checkpoint()
    victim = stored_bytes(people[3])
    before = time.time()
    receipt = server.stub.Delete(pb.DeleteRequest(registration_id="r3"))
    due = receipt.checkpoint_due.ToNanoseconds() / 1e9
    assert files_holding(server.data_dir, victim) == ["index.ckpt"]
    clean_at = _first_time_without(server.data_dir, victim, due, "checkpoint_due")
    assert clean_at - before >= 1.5  # not before its delay


@pytest.mark.embedded_only(reason=LMDB_BYTES)
def test_the_store_is_compacted_by_the_receipts_compaction_due(make_server, faces):
    """compaction_due is a promise too: by then the erased ID number is in no file."""
    server = make_server(checkpoint_interval_s=3600, erasure_checkpoint_delay_s=0.2,
                         compact_delay_s=1.5)
    for i, person in enumerate(faces.persons(40)):
        enroll(server.stub, f"r{i}", f"VICTIM-ID-{i:04d}", person)
    before = time.time()
    receipt = server.stub.Delete(pb.DeleteRequest(registration_id="r3"))
    due = receipt.compaction_due.ToNanoseconds() / 1e9
    assert files_holding(server.data_dir, b"VICTIM-ID-0003") == ["store/data.mdb"]
    clean_at = _first_time_without(server.data_dir, b"VICTIM-ID-0003", due, "compaction_due")
    assert clean_at - before >= 1.5  # not before its delay


def _first_time_without(data_dir: Path, needle: bytes, due: float, promise: str) -> float:
    """The time (read before the files) from which no file holds `needle`; fails once
    the files still hold it at `due`."""
    while True:
        now = time.time()
        if not files_holding(data_dir, needle):
            return now
        assert now <= due, f"a file still held the erased after the receipt's {promise}"
        time.sleep(0.01)


# One victim per erasure key: (delete by, registration_id, ID number, phone number).
VICTIMS = [("registration_id", "victim-r", "VICTIM-ID-1001", "+8613911110001"),
           ("id_number", "victim-i", "VICTIM-ID-2002", "+8613922220002"),
           ("msisdn", "victim-m", "VICTIM-ID-3003", "+8613933330003")]


@pytest.mark.embedded_only(reason=LMDB_BYTES)
def test_erasure_by_every_key_leaves_no_face_id_number_or_phone_number(make_server, faces,
                                                                        keys):
    """Each victim is read by investigators first (Links by ID number, a Check claiming it,
    an adjudication), so the audit trail and the adjudications name them; then erased by
    registration_id, ID number and phone number, and compacted."""
    server = make_server(security=load_security(keys / "security.toml"),
                         checkpoint_interval_s=3600, erasure_checkpoint_delay_s=0.3)
    people = faces.persons(30)
    admin, investigator = (channel(server.port, keys, role=role)
                           for role in ("admin", "investigator"))
    stub, investigate = pb_grpc.FaceDedupStub(admin), pb_grpc.InvestigateStub(investigator)
    for i, person in enumerate(people[len(VICTIMS):]):
        stub.Enroll(pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"),
                                     face=face(person)))
    for (_, registration_id, id_number, msisdn), person in zip(VICTIMS, people, strict=False):
        stub.Enroll(pb.EnrollRequest(registration=registration(registration_id, id_number,
                                                               msisdn), face=face(person)))
        investigate.Links(pb.LinksRequest(**CASE, id_number=id_number))
        pb_grpc.FaceDedupStub(investigator).Check(
            pb.CheckRequest(face=face(person), claimed_id_number=id_number),
            metadata=(("x-case-id", CASE["case_id"]), ("x-purpose", CASE["purpose"])))
        investigate.Adjudicate(pb.AdjudicateRequest(
            **CASE, registration_id=registration_id, matched_registration_id="r0",
            decision=pb.DIFFERENT_PEOPLE))
    server.server.gallery.checkpoint()
    for by, registration_id, id_number, msisdn in VICTIMS:
        value = {"registration_id": registration_id, "id_number": id_number,
                 "msisdn": msisdn}[by]
        erased = stub.Delete(pb.DeleteRequest(**{by: value}))
        assert list(erased.registration_ids) == [registration_id]
    victims = [stored_bytes(person) for person in people[:len(VICTIMS)]]
    # The checkpoint is rewritten without them; freed store pages may still hold them.
    wait_until(lambda: all("index.ckpt" not in files_holding(server.data_dir, v)
                           for v in victims))
    pb_grpc.IndexAdminStub(admin).Compact(pb.CompactRequest())
    for (_, _, id_number, msisdn), victim in zip(VICTIMS, victims, strict=True):
        for needle in (victim, id_number.encode(), msisdn.encode(), msisdn[1:].encode()):
            assert files_holding(server.data_dir, needle) == [], needle
    assert files_holding(server.data_dir, stored_bytes(people[-1])) != []  # the others stay
    r0_key = server.server.gallery.stored_face("r0")[0]
    assert server.server.gallery.settled(r0_key) == {}  # no settlement names a victim
    admin.close()
    investigator.close()


def test_the_server_compacts_by_itself_after_an_erasure(make_server, faces):
    server = make_server(compact_delay_s=0.5, checkpoint_interval_s=0.2)
    people = faces.persons(20)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    victim = stored_bytes(people[3])
    receipt = server.stub.Delete(pb.DeleteRequest(id_number="ID3"))
    assert receipt.compaction_due.ToMicroseconds() > receipt.erased_at.ToMicroseconds()
    wait_until(lambda: files_holding(server.data_dir, victim) == [])
    never_returned(server, people[3], "r3")


@pytest.mark.embedded_only(reason=LMDB_BYTES)
@pytest.mark.timeout(120)
def test_compact_command_offline(stopped_with_erasure):
    data_dir, victim = stopped_with_erasure
    result = subprocess.run([sys.executable, "-m", "dedup", "compact", "--data-dir",
                             str(data_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "compacted the store" in result.stdout
    assert files_holding(data_dir, victim) == []


@pytest.fixture
def stopped_with_erasure(make_server, faces):
    """A stopped server's directory after r2 was erased: its embedding is gone already (its
    slot zeroed, the checkpoint rewritten at shutdown); its ID number is still on a freed
    LMDB page, the needle returned."""
    server = make_server()
    people = faces.persons(10)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", "VICTIM-ID-0002" if i == 2 else f"ID{i}", person)
    server.stub.Delete(pb.DeleteRequest(registration_id="r2"))
    server.stop()
    assert files_holding(server.data_dir, stored_bytes(people[2])) == []
    assert files_holding(server.data_dir, b"VICTIM-ID-0002") == ["store/data.mdb"]
    return server.data_dir, b"VICTIM-ID-0002"


def test_a_rebuild_that_is_not_swapped_in_leaves_no_side_file(tmp_path, faces):
    """A live rebuild's side file holds every embedding as of its snapshot. A gallery closed
    while it ran left the file behind (until the next start), with a registration erased
    meanwhile in it; and close did not wait for the rebuild, which went on using the store."""
    from dedup.core.records import DeleteKey, Registration
    from dedup.core.settings import IndexConfig, StoreConfig
    from dedup.gallery.embedded.gallery import EmbeddedGallery

    data_dir = tmp_path / "data"
    people = faces.persons(600)
    gallery = EmbeddedGallery(StoreConfig(data_dir=data_dir), "test-model",
                              IndexConfig(index_factory="Flat"), background=False)
    gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), person)
                         for i, person in enumerate(people)])
    outcome: list[object] = []

    def erase_and_close() -> None:
        gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        gallery.close()
        outcome.append(("still rebuilding after close", gallery._rebuilder.running))

    closing = threading.Thread(target=erase_and_close)

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "writing":  # the child writes its side file: the gallery closes now
            closing.start()
            time.sleep(1.0)

    try:
        gallery.rebuild("BinarySign512", progress)
        outcome.append("swapped")
    except Exception as error:  # the outcome is what is asserted
        outcome.append(error)
    closing.join(timeout=60)
    assert not closing.is_alive()
    assert ("still rebuilding after close", False) in outcome
    assert any("cancelled" in str(item) for item in outcome), outcome
    assert sorted(p.name for p in data_dir.iterdir() if "ckpt" in p.name) == ["index.ckpt"]
    with pytest.raises(FailedPrecondition, match="closing"):
        gallery.rebuild("BinarySign512", progress)


def test_files_a_crash_left_holding_embeddings_are_removed_at_start(tmp_path, faces):
    """A live rebuild's side file and the temporary files of a checkpoint being written hold
    every embedding as of their writing; after a crash nothing would ever replace them."""
    from dedup.core.records import Registration
    from dedup.core.settings import IndexConfig, StoreConfig
    from dedup.gallery.embedded.gallery import EmbeddedGallery

    data_dir = tmp_path / "data"
    person = faces.persons(1)[0]
    config = StoreConfig(data_dir=data_dir)
    gallery = EmbeddedGallery(config, "test-model", IndexConfig(index_factory="Flat"),
                              background=False)
    gallery.insert(Registration("r0", "ID0"), person)
    gallery.close()
    leftovers = ["index.ckpt.rebuild", "index.ckpt.rebuild.tmp", "index.ckpt.tmp"]
    for name in leftovers:
        (data_dir / name).write_bytes(stored_bytes(person))
    EmbeddedGallery(config, "test-model", IndexConfig(index_factory="Flat"),
                    background=False).close()
    assert not [name for name in leftovers if (data_dir / name).exists()]
