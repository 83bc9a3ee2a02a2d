"""Damaged data directories: a checkpoint killed mid-write is recovered from the store; a
damaged store is refused at start with a clear message, never a crash or a partial index."""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import face, registration
from processes import ServerProcess

from dedup import FaceGenerator, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.records import Registration
from dedup.face.model_pack import default_pack_dir, model_id_for
from dedup.gallery.embedded.gallery import EmbeddedGallery

PAGE = 4096
P_BRANCH, P_LEAF = 0x01, 0x02
HEADER, SLOT = 4096, 2048  # the vector file's header, and a 512-d float32 slot
GALLERY = 20_000
KILL_SEEDS = int(os.environ.get("DEDUP_SOAK_SEEDS", "2"))  # benchmarks/soak.py runs 100


@pytest.fixture(scope="module")
def people():
    return FaceGenerator(5).persons(GALLERY + 200)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, people) -> Path:
    """A data directory of 20,000 registrations and its checkpoint, made in-process."""
    data_dir = tmp_path_factory.mktemp("damage") / "data"
    model_id = model_id_for(default_pack_dir() / "w600k_mbf.onnx")
    gallery = EmbeddedGallery(StoreConfig(data_dir=data_dir), model_id=model_id, background=False)
    for start in range(0, GALLERY, 2000):
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i])
                             for i in range(start, start + 2000)])
    gallery.close()
    return data_dir


@pytest.fixture
def data_dir(base_dir, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(base_dir, copy)
    return copy


def pages_of_kind(data_file: Path, flag: int) -> list[int]:
    raw = data_file.read_bytes()
    return [page for page in range(len(raw) // PAGE)
            if struct.unpack_from("<H", raw, page * PAGE + 10)[0] == flag]


def overwrite_bodies(data_file: Path, pages: list[int], seed: int) -> None:
    """Random bytes over each page after its 16-byte header (page number and flags stay)."""
    rng = np.random.default_rng(seed)
    raw = bytearray(data_file.read_bytes())
    for page in pages:
        raw[page * PAGE + 16:(page + 1) * PAGE] = rng.bytes(PAGE - 16)
    data_file.write_bytes(bytes(raw))


def serve_refused(data_dir: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dedup", "serve", "--data-dir", str(data_dir),
         "--address", "127.0.0.1:0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, f"exit {result.returncode}: {result.stderr[-2000:]}"
    return result.stderr


def stats_of(server: ServerProcess) -> pb.StatsResponse:
    with grpc.insecure_channel(server.address) as channel:
        return pb_grpc.FaceDedupStub(channel).Stats(pb.StatsRequest())


def stop(server: ServerProcess) -> None:
    server.process.send_signal(signal.SIGTERM)
    assert server.wait() == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(KILL_SEEDS))
def test_kill_during_checkpoint_recovers(data_dir, people, seed):
    rng = random.Random(seed)
    server = ServerProcess(data_dir)
    acknowledged = []
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.FaceDedupStub(channel)
        for i in range(GALLERY, GALLERY + 50):  # changes the new checkpoint must cover
            stub.Enroll(pb.EnrollRequest(registration=registration(f"r{i}", f"ID{i}"),
                                         face=face(people[i])))
            acknowledged.append(i)
        admin = pb_grpc.IndexAdminStub(channel)
        temporary = data_dir / "index.ckpt.tmp"
        writing = threading.Thread(target=lambda: _ignore_unavailable(admin.Checkpoint))
        writing.start()
        deadline = time.monotonic() + 30
        while not temporary.exists() and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0.0, 0.003))  # writing 40 MB and fsyncing it takes longer
        server.process.send_signal(signal.SIGKILL)
        server.wait()
        writing.join()
        assert temporary.exists(), "the kill did not land while the checkpoint was written"
    restarted = ServerProcess(data_dir)
    try:
        stats = stats_of(restarted)
        assert stats.registrations == GALLERY + len(acknowledged)
        assert stats.index_vectors == stats.registrations
        with grpc.insecure_channel(restarted.address) as channel:
            stub = pb_grpc.FaceDedupStub(channel)
            for i in [*acknowledged, *rng.sample(range(GALLERY), 20)]:
                top = stub.Check(pb.CheckRequest(face=face(people[i]))).matches[0]
                assert top.registration.registration_id == f"r{i}" and top.score > 0.999
    finally:
        stop(restarted)


def _ignore_unavailable(call) -> None:
    try:
        call(pb.CheckpointRequest(), timeout=60)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_truncated_store_is_refused(data_dir):
    data_file = data_dir / "store" / "data.mdb"
    with data_file.open("r+b") as handle:
        handle.truncate(data_file.stat().st_size // 2)
    message = serve_refused(data_dir)
    assert "the store is damaged" in message and "data.mdb holds" in message


def test_store_without_meta_pages_is_refused(data_dir):
    data_file = data_dir / "store" / "data.mdb"
    raw = data_file.read_bytes()
    data_file.write_bytes(bytes(2 * PAGE) + raw[2 * PAGE:])
    assert "not an LMDB file" in serve_refused(data_dir)


@pytest.mark.parametrize("kind", [P_LEAF, P_BRANCH])
@pytest.mark.parametrize("keep_checkpoint", [True, False])
def test_damaged_tree_pages_are_refused(data_dir, kind, keep_checkpoint):
    data_file = data_dir / "store" / "data.mdb"
    overwrite_bodies(data_file, pages_of_kind(data_file, kind), seed=kind)
    if not keep_checkpoint:
        (data_dir / "index.ckpt").unlink()
    message = serve_refused(data_dir)
    assert "the store is damaged" in message and "restore it from a backup" in message
    assert "Traceback" not in message


def test_garbage_embedding_is_refused_when_rebuilding(data_dir):
    overwrite_slot(data_dir / "store" / "vectors.f32", key=101,
                   data=np.random.default_rng(1).bytes(SLOT))
    (data_dir / "index.ckpt").unlink()  # the index must come from the store
    message = serve_refused(data_dir)
    # Never a silent index of garbage: the file and the key are named.
    assert "vectors.f32: the store is damaged" in message
    assert "key 101 is not a unit vector" in message and "Traceback" not in message
    doctor = dedup_doctor(data_dir)
    assert doctor.returncode == 1 and "key 101: its embedding in vectors.f32 is not a unit " \
        "vector" in doctor.stdout


def test_zeroed_embedding_of_a_stored_registration_is_refused(data_dir):
    """An all-zero slot is an erased registration's: under a stored one it is damage."""
    overwrite_slot(data_dir / "store" / "vectors.f32", key=7, data=bytes(SLOT))
    (data_dir / "index.ckpt").unlink()
    assert "key 7 is not a unit vector" in serve_refused(data_dir)


@pytest.mark.parametrize(("damage", "expected"), [
    ("truncated", "holds 10000 slots but the store has assigned 20000 keys"),
    ("header", "does not start with a vector file's header"),
    ("missing", "is missing, but the store has assigned 20000 keys"),
])
def test_damaged_vector_file_is_refused_and_reported(data_dir, damage, expected):
    vector_file = data_dir / "store" / "vectors.f32"
    if damage == "truncated":
        with vector_file.open("r+b") as handle:
            handle.truncate(HEADER + 10_000 * SLOT)
    elif damage == "header":
        overwrite_slot(vector_file, key=0, data=np.random.default_rng(2).bytes(HEADER))
    else:
        vector_file.unlink()
    message = serve_refused(data_dir)
    assert f"{vector_file}: the store is damaged: the vector file {expected}" in message
    assert "restore it from a backup" in message and "Traceback" not in message
    doctor = dedup_doctor(data_dir)
    assert doctor.returncode == 1 and expected in doctor.stdout


def overwrite_slot(vector_file: Path, key: int, data: bytes) -> None:
    """`data` over the slot of `key` (key 0: over the header)."""
    with vector_file.open("r+b") as handle:
        handle.seek(0 if key == 0 else HEADER + (key - 1) * SLOT)
        handle.write(data)


def dedup_doctor(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", "doctor", str(data_dir)],
                          capture_output=True, text=True, timeout=300)
