"""The vector file beside LMDB (store/vectors.f32) across crashes: an erased registration's
embedding is gone from it once its Delete is acknowledged, and stays gone after a kill -9 at
any moment; slots a crash left behind (an erasure not yet zeroed, an enrolment never
committed) are put right when the directory is next opened, and compaction zeroes any erased
slot still holding bytes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import enroll, face, registration
from processes import ServerProcess

from dedup import FaceGenerator, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.errors import StoreError
from dedup.core.records import Registration
from dedup.face.model_pack import default_pack_dir, model_id_for
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.vector_file import VectorFile

HEADER, SLOT = 4096, 2048
KILL_SEEDS = int(os.environ.get("DEDUP_SOAK_SEEDS", "2"))  # benchmarks/soak.py runs 100
PEOPLE = 3000  # more than a kill within 0.8 s lets through: always mid-stream
FILES = "reads and writes the embedded backend's vector file (store/vectors.f32) directly"


def slot_bytes(vector: np.ndarray) -> bytes:
    """The bytes a server stores for an embedding sent over gRPC (normalised as it does)."""
    values = np.asarray(vector, np.float64)
    return (values / np.linalg.norm(values)).astype(np.float32).tobytes()


def doctor(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", "doctor", str(data_dir)],
                          capture_output=True, text=True, timeout=300)


def exists(stub: pb_grpc.FaceDedupStub, registration_id: str) -> bool:
    try:
        stub.GetRegistration(pb.GetRegistrationRequest(registration_id=registration_id))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A data directory of 3,000 registrations (r<i> under key i + 1), made in-process."""
    people = FaceGenerator(21).persons(PEOPLE)
    data_dir = tmp_path_factory.mktemp("vectors") / "data"
    model_id = model_id_for(default_pack_dir() / "w600k_mbf.onnx")
    gallery = EmbeddedGallery(StoreConfig(data_dir=data_dir), model_id=model_id, background=False)
    gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(PEOPLE)])
    gallery.close()
    return data_dir, people


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", range(KILL_SEEDS))
def test_kill_during_erasures_leaves_no_erased_embedding(enrolled, tmp_path, seed):
    base, people = enrolled
    data_dir = tmp_path / "data"
    subprocess.run(["cp", "-a", str(base), str(data_dir)], check=True)
    server = ServerProcess(data_dir)
    erased: list[int] = []

    def erase() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FaceDedupStub(channel)
            for i in range(PEOPLE):
                try:
                    stub.Delete(pb.DeleteRequest(registration_id=f"r{i}"), timeout=10)
                except grpc.RpcError:
                    return  # the server is gone
                erased.append(i)

    eraser = threading.Thread(target=erase)
    eraser.start()
    time.sleep(random.Random(seed).uniform(0.1, 0.8))
    server.process.send_signal(signal.SIGKILL)
    server.wait()
    eraser.join()
    assert erased and len(erased) < PEOPLE, "the kill did not land among the erasures"

    restarted = ServerProcess(data_dir)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            stub = pb_grpc.FaceDedupStub(channel)
            stored = {i for i in range(PEOPLE) if exists(stub, f"r{i}")}
            assert stored.isdisjoint(erased)  # every acknowledged erasure holds
            assert len(stored) >= PEOPLE - len(erased) - 1  # at most the one in flight too
            top = stub.Check(pb.CheckRequest(face=face(people[max(stored)]))).matches[0]
            assert top.registration.registration_id == f"r{max(stored)}" and top.score > 0.999
    finally:
        restarted.process.send_signal(signal.SIGTERM)
        assert restarted.wait() == 0
    raw = (data_dir / "store" / "vectors.f32").read_bytes()
    slots = np.frombuffer(raw, np.float32, count=PEOPLE * 512, offset=HEADER)
    for i, slot in enumerate(slots.reshape(PEOPLE, 512)):  # whole, or zeros once erased
        assert np.array_equal(slot, people[i]) if i in stored else not slot.any(), f"r{i}"
    checked = doctor(data_dir)
    assert checked.returncode == 0 and "0 warning(s)" in checked.stdout, checked.stdout


@pytest.mark.embedded_only(reason=FILES)
def test_an_erasure_a_crash_left_unzeroed_is_zeroed_at_start(make_server, faces):
    server = make_server(checkpoint_interval_s=3600, erasure_checkpoint_delay_s=3600)
    people = faces.persons(10)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    server.stub.Delete(pb.DeleteRequest(registration_id="r4"))
    server.crash()  # no checkpoint: the OP_REMOVE stays in the change log
    vector_file = server.data_dir / "store" / "vectors.f32"
    with vector_file.open("r+b") as handle:  # as if killed between the commit and the zeroing
        handle.seek(HEADER + 4 * SLOT)
        handle.write(slot_bytes(people[4]))
    checked = doctor(server.data_dir)
    assert checked.returncode == 0 and "of them 1 not zeros yet" in checked.stdout

    server._start()  # on the crashed server's directory
    assert slot_bytes(people[4]) not in vector_file.read_bytes()
    assert not exists(server.stub, "r4") and exists(server.stub, "r5")
    assert server.stub.Stats(pb.StatsRequest()).registrations == 9


@pytest.mark.embedded_only(reason=FILES)
def test_a_slot_past_the_last_committed_enrolment_is_dropped_at_start(make_server, faces):
    server = make_server()
    people = faces.persons(12)
    for i in range(10):
        enroll(server.stub, f"r{i}", f"ID{i}", people[i])
    server.crash()
    vector_file = server.data_dir / "store" / "vectors.f32"
    with vector_file.open("r+b") as handle:  # as if killed between the fdatasync and the commit
        handle.seek(HEADER + 10 * SLOT)
        handle.write(slot_bytes(people[10]))

    server._start()  # on the crashed server's directory
    assert slot_bytes(people[10]) not in vector_file.read_bytes()
    assert vector_file.stat().st_size == HEADER + 10 * SLOT
    enroll(server.stub, "r11", "ID11", people[11])  # takes key 11, that slot
    top = server.stub.Check(pb.CheckRequest(face=face(people[11]))).matches[0]
    assert top.registration.registration_id == "r11" and top.score > 0.999
    assert server.stub.Stats(pb.StatsRequest()).registrations == 11


@pytest.mark.embedded_only(reason=FILES)
def test_the_vector_file_grows_in_steps_and_takes_disk_only_for_what_it_holds(make_server,
                                                                             faces):
    server = make_server()
    for i, person in enumerate(faces.persons(5)):
        server.stub.Enroll(pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"),
                                            face=face(person)))
    status = (server.data_dir / "store" / "vectors.f32").stat()
    assert status.st_size == HEADER + (64 << 20)  # one 64 MB step, sparse
    assert status.st_blocks * 512 < 1 << 20
    assert status.st_mode & 0o777 == 0o600


@pytest.mark.embedded_only(reason=FILES)
def test_compaction_zeroes_an_erased_slot_that_holds_bytes(make_server, faces):
    server = make_server()
    people = faces.persons(10)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    server.stub.Delete(pb.DeleteRequest(registration_id="r4"))
    server.stop()  # checkpoints: the OP_REMOVE leaves the change log, the start cannot see it
    vector_file = server.data_dir / "store" / "vectors.f32"
    with vector_file.open("r+b") as handle:
        handle.seek(HEADER + 4 * SLOT)
        handle.write(slot_bytes(people[4]))
    server._start()
    assert slot_bytes(people[4]) in vector_file.read_bytes()
    pb_grpc.IndexAdminStub(server.channel).Compact(pb.CompactRequest())
    assert slot_bytes(people[4]) not in vector_file.read_bytes()
    assert slot_bytes(people[5]) in vector_file.read_bytes()


def _written_vector_file(path: Path, count: int) -> tuple[VectorFile, np.ndarray]:
    """A vector file whose keys 1..`count` hold random unit rows, every seventh left unwritten
    (zeros, as an erased key's slot); the rows as the file holds them."""
    rows = np.random.default_rng(5).standard_normal((count, 512)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[::7] = 0.0
    slots = VectorFile.open(path, 512, 0, writable=True)
    keys = [key for key in range(1, count + 1) if (key - 1) % 7]
    slots.write(keys, rows[np.asarray(keys) - 1])
    slots.sync()
    return slots, rows


def test_a_scan_of_slots_reads_what_scattered_reads_do(tmp_path):
    """Runs of keys (a fill's, a compaction's) are read by preadv, scattered ones through the
    map: both give each key's slot, and zeros for keys past the file's end."""
    slots, rows = _written_vector_file(tmp_path / "vectors.f32", 2000)
    in_file = slots.slots()  # 32,768: one 64 MB step
    try:
        def expected(keys: np.ndarray) -> np.ndarray:
            held = np.zeros((len(keys), 512), np.float32)
            written = keys <= len(rows)
            held[written] = rows[keys[written] - 1]
            return held

        run = np.arange(1, 2001, dtype=np.int64)
        shuffled = np.random.default_rng(1).permutation(run)
        with_gaps = run[run % 3 != 0]
        past_the_end = np.arange(in_file - 400, in_file + 400, dtype=np.int64)
        repeated = np.concatenate([run[:1000], run[:1000]])
        from_the_end = np.arange(in_file + 1, in_file + 400, dtype=np.int64)
        over_chunks = np.arange(1, 3 * in_file, 2, dtype=np.int64)  # a span of several reads
        scattered = np.array([1, 9, 500, 1999, in_file + 5], dtype=np.int64)
        many_scattered = np.arange(1, 5 * in_file, 7, dtype=np.int64)  # reads queued first
        for keys in (run, shuffled, with_gaps, repeated, past_the_end, from_the_end,
                     over_chunks, scattered, many_scattered):
            np.testing.assert_array_equal(slots.rows(keys), expected(keys))
        np.testing.assert_array_equal(slots.block(1, 2000), rows)
        assert len(slots.block(in_file - 9, 100)) == 10  # fewer rows: the file ends
        assert len(slots.block(in_file + 1, 100)) == 0
    finally:
        slots.close()


def test_a_scan_reads_slots_written_after_the_file_grew(tmp_path):
    """A scan past the slots the file had when it was mapped maps it again and reads them."""
    slots, rows = _written_vector_file(tmp_path / "vectors.f32", 2000)
    try:
        in_file = slots.slots()
        assert len(slots.rows(np.arange(1, 2001, dtype=np.int64))) == 2000  # mapped
        late = rows[1:301] * -1.0
        slots.write(list(range(in_file + 1, in_file + 301)), late)  # grows the file
        slots.sync()
        keys = np.arange(in_file + 1, in_file + 301, dtype=np.int64)
        np.testing.assert_array_equal(slots.rows(keys), late)
        np.testing.assert_array_equal(slots.block(in_file + 1, 300), late)
    finally:
        slots.close()


def test_a_scans_rows_are_its_own(tmp_path):
    """A compaction copies the block it read while a Delete may zero a slot in it: the rows a
    scan returned must not change with the file, and may be written to (a re-rank's rows
    are)."""
    slots, rows = _written_vector_file(tmp_path / "vectors.f32", 2000)
    try:
        scanned, block = slots.rows(np.arange(1, 2001, dtype=np.int64)), slots.block(1, 2000)
        assert slots.zero([2, 3, 4]) == 3
        slots.sync()
        np.testing.assert_array_equal(scanned, rows)
        np.testing.assert_array_equal(block, rows)
        assert not slots.rows(np.arange(1, 2001, dtype=np.int64))[1:4].any()
        scanned[0] = 1.0
        block[0] = 1.0
    finally:
        slots.close()


def test_a_scan_that_cannot_read_the_file_raises_a_store_error_naming_it(tmp_path):
    """A read error (here the descriptor closed under the reader, as EIO would fail it) is a
    StoreError naming the file, not an OSError, nor zeros taken for erased slots."""
    slots, _ = _written_vector_file(tmp_path / "vectors.f32", 2000)
    slots.rows(np.arange(1, 10, dtype=np.int64))  # mapped
    descriptor = slots._descriptor
    assert descriptor is not None
    os.close(descriptor)
    try:
        with pytest.raises(StoreError, match=r"vectors\.f32: the vector file could not be read"):
            slots.rows(np.arange(1, 2001, dtype=np.int64))
    finally:
        slots._descriptor = None
        slots.close()
