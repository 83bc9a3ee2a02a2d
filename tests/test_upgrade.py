"""A data directory of store format 1 (embeddings in LMDB's `vectors` database, a 4 KB page
each) upgraded to format 2 (embeddings in store/vectors.f32): at a server's start, and by
`dedup upgrade`, also after a kill -9 in the middle. Every registration and its embedding
bit for bit, searchable; the `vectors` database gone; the erased ones' bytes in no file."""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np
import pytest

from dedup import FaceGenerator
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.face.model_pack import default_pack_dir, model_id_for

HEADER, SLOT = 4096, 2048
_T = TypeVar("_T")
FORMAT_1 = ("builds an LMDB store of the embedded backend's old format and upgrades it")


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def write_format_1(data_dir: Path, people: np.ndarray, erased: list[int]) -> None:
    """What dedup's format 1 wrote for len(people) enrolments, then the Deletes of `erased`
    (0-based): row i is key i + 1, registration r<i>, ID number ID<i>, phone +86139<i>."""
    os.makedirs(data_dir / "store", mode=0o700)
    os.chmod(data_dir, 0o700)
    env = lmdb.open(str(data_dir / "store"), map_size=1 << 34, max_dbs=16, mode=0o600)
    names = ("meta", "records", "vectors", "by_registration_id", "by_msisdn", "changes")
    dbs = {name: env.open_db(name.encode()) for name in names}
    dbs["by_id_number"] = env.open_db(b"by_id_number", dupsort=True, dupfixed=True)
    model = model_id_for(default_pack_dir() / "w600k_mbf.onnx")
    with env.begin(write=True) as txn:
        for i, vector in enumerate(people):
            key = u64(i + 1)
            txn.put(key, json.dumps({"r": f"r{i}", "i": f"ID{i}", "m": f"+86139{i:08d}",
                                     "c": "CMCC", "g": "4403", "t": 1_700_000_000_000_000 + i,
                                     "e": model, "b": ""}, separators=(",", ":")).encode(),
                    db=dbs["records"])
            txn.put(key, np.asarray(vector, np.float32).tobytes(), db=dbs["vectors"])
            txn.put(f"r{i}".encode(), key, db=dbs["by_registration_id"])
            txn.put(f"ID{i}".encode(), key, db=dbs["by_id_number"])
            txn.put(f"+86139{i:08d}".encode(), key, db=dbs["by_msisdn"])
            txn.put(u64(i + 1), b"A" + key, db=dbs["changes"])
        for sequence, i in enumerate(erased, start=len(people) + 1):
            key = u64(i + 1)
            for name in ("records", "vectors"):
                txn.delete(key, db=dbs[name])
            txn.delete(f"r{i}".encode(), db=dbs["by_registration_id"])
            txn.delete(f"ID{i}".encode(), key, db=dbs["by_id_number"])
            txn.delete(f"+86139{i:08d}".encode(), db=dbs["by_msisdn"])
            txn.put(u64(sequence), b"R" + key, db=dbs["changes"])
        stored = len(people) - len(erased)
        for name, value in (("format", 1), ("dimension", 512), ("next_key", len(people) + 1),
                            ("sequence", len(people) + len(erased)),
                            ("distinct_id_numbers", stored), (f"model:{model}", stored)):
            txn.put(name.encode(), u64(value), db=dbs["meta"])
        txn.put(b"erased_since", struct.pack(">d", time.time()), db=dbs["meta"])
    env.close()


def read_store(data_dir: Path, work: Callable[[lmdb.Environment, lmdb.Transaction], _T]) -> _T:
    """`work` in a read transaction of the store; opened again when a running `dedup upgrade`
    grew the map between the open and the transaction (MDB_MAP_RESIZED)."""
    for _ in range(9):
        env = lmdb.open(str(data_dir / "store"), readonly=True, lock=False, max_dbs=16)
        try:
            with env.begin() as txn:
                return work(env, txn)
        except lmdb.MapResizedError:
            time.sleep(0.01)
        finally:
            env.close()
    raise AssertionError("the store's map grew under every one of 9 reads")


def database_names(data_dir: Path) -> set[str]:
    return read_store(data_dir, lambda env, txn: {bytes(key).decode() for key, _ in txn.cursor()})


def meta(data_dir: Path, name: bytes) -> int | None:
    def value(env: lmdb.Environment, txn: lmdb.Transaction) -> int | None:
        raw = txn.get(name, db=env.open_db(b"meta", txn=txn, create=False))
        return None if raw is None else int(struct.unpack(">Q", raw)[0])
    return read_store(data_dir, value)


def dedup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", *args], capture_output=True,
                          text=True, timeout=600)


def assert_upgraded(data_dir: Path, people: np.ndarray, erased: list[int]) -> None:
    """Format 2; every stored embedding bit for bit in its slot, every erased one zeros and
    in no file; no `vectors` database left."""
    assert meta(data_dir, b"format") == 2 and meta(data_dir, b"upgrade_moved") is None
    assert "vectors" not in database_names(data_dir)
    raw = (data_dir / "store" / "vectors.f32").read_bytes()
    assert len(raw) >= HEADER + len(people) * SLOT
    slots = np.frombuffer(raw, np.float32, count=len(people) * 512, offset=HEADER)
    slots = slots.reshape(len(people), 512)
    kept = np.setdiff1d(np.arange(len(people)), erased)
    assert np.array_equal(slots[kept], people[kept]) and not slots[erased].any()
    for i in erased:
        needle = people[i].tobytes()
        assert not any(needle in path.read_bytes() for path in data_dir.rglob("*")
                       if path.is_file()), f"r{i}"


@pytest.fixture
def people() -> np.ndarray:
    return FaceGenerator(31).persons(3000)


ERASED = [4, 999, 2999]  # the last key's too: its slot is a hole at the file's end


@pytest.mark.embedded_only(reason=FORMAT_1)
@pytest.mark.timeout(300)
def test_a_server_upgrades_a_format_1_directory_at_start(make_server, tmp_path, people,
                                                         caplog):
    caplog.set_level(logging.INFO, logger="dedup.store")
    data_dir = tmp_path / "old"
    write_format_1(data_dir, people, ERASED)
    before = (data_dir / "store" / "data.mdb").stat().st_size
    doctor = dedup("doctor", str(data_dir))
    assert doctor.returncode == 0 and "store format 1" in doctor.stdout
    backup = dedup("backup", str(data_dir), str(tmp_path / "backup"))  # read-only: as it is
    assert backup.returncode == 0 and "backed up 2997 registrations" in backup.stdout
    assert "vectors" in database_names(tmp_path / "backup")

    server = make_server(data_dir=data_dir)
    assert "store upgrade: 2997 of 2997 embeddings in the vector file (100%)" in caplog.text
    assert server.stub.Stats(pb.StatsRequest()).registrations == 2997
    for i in (0, 5, 1500, 2998):  # found by their faces, with exact scores
        top = server.stub.Check(pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(
            values=people[i].tolist())))).matches[0]
        assert top.registration.registration_id == f"r{i}" and top.score > 0.9999
        assert top.registration.msisdn == f"+86139{i:08d}"
    found = server.stub.Check(pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(
        values=people[4].tolist())), max_candidates=100)).matches
    assert "r4" not in {match.registration.registration_id for match in found}
    server.stop()
    assert_upgraded(data_dir, people, ERASED)
    assert (data_dir / "store" / "data.mdb").stat().st_size < before / 5
    doctor = dedup("doctor", str(data_dir))
    assert doctor.returncode == 0 and "0 problem(s), 0 warning(s)" in doctor.stdout


@pytest.mark.embedded_only(reason=FORMAT_1)
@pytest.mark.timeout(600)
def test_dedup_upgrade_killed_midway_resumes(tmp_path, make_server):
    people = FaceGenerator(32).persons(60_000)
    erased = [0, 17, 30_000]
    data_dir = tmp_path / "old"
    write_format_1(data_dir, people, erased)
    upgrading = subprocess.Popen([sys.executable, "-m", "dedup", "upgrade", str(data_dir)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while meta(data_dir, b"upgrade_moved") is None and upgrading.poll() is None:
        time.sleep(0.005)  # until the first batch is committed: then kill it in the middle
    upgrading.send_signal(signal.SIGKILL)
    _, errors = upgrading.communicate()
    moved = meta(data_dir, b"upgrade_moved")
    assert meta(data_dir, b"format") == 1 and moved is not None and moved < 60_000, errors

    result = dedup("upgrade", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert f"upgraded {data_dir} to store format 2" in result.stdout
    assert "moved " in result.stdout and "embeddings into store/vectors.f32" in result.stdout
    assert_upgraded(data_dir, people, erased)
    again = dedup("upgrade", str(data_dir))
    assert again.returncode == 0 and "in format 2 already; nothing to do" in again.stdout

    server = make_server(data_dir=data_dir)
    assert server.stub.Stats(pb.StatsRequest()).registrations == 60_000 - len(erased)
    top = server.stub.Check(pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(
        values=people[59_999].tolist())))).matches[0]
    assert top.registration.registration_id == "r59999" and top.score > 0.9999


def test_upgrade_refuses_a_directory_without_a_store(tmp_path):
    result = dedup("upgrade", str(tmp_path))
    assert result.returncode == 1 and "no dedup store here" in result.stderr
