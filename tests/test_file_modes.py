"""Biometric data at rest is its owner's only: the data directory is 0700 and every file dedup
writes (the store, checkpoints, compaction's copy, backups, exports, calibration) has no group
or other bits, even under a umask that would let anyone read them; a data directory other
users may enter is refused at start, or served with a loud warning when allowed."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import enroll
from processes import ServerProcess

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.errors import SharedDataDir

CASE = {"case_id": "CASE-9", "purpose": "file modes"}

DATA_DIR_FILES = ("reads the embedded data directory's files (LMDB, checkpoints, lock); "
                  "with Milvus the registrations live in Milvus's own storage")


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The worst case: a umask that would let every new file be read and written by anyone."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def dedup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", *args], capture_output=True,
                          text=True, timeout=120)


def exposed(*roots: Path) -> list[str]:
    """Each of `roots` and everything under them that group or other users may use."""
    paths = [path for root in roots for path in (root, *sorted(root.rglob("*")))]
    return [f"{path} {stat.S_IMODE(path.lstat().st_mode):04o}" for path in paths
            if stat.S_IMODE(path.lstat().st_mode) & 0o077]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def shared_dir(path: Path) -> Path:
    path.mkdir()
    os.chmod(path, 0o755)  # an older version's data directory
    return path


@pytest.mark.embedded_only(reason=DATA_DIR_FILES)
@pytest.mark.timeout(240)
def test_everything_written_is_private_even_with_an_open_umask(make_server, faces, tmp_path,
                                                               open_umask):
    server = make_server(checkpoint_interval_s=3600)
    people = faces.persons(30)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", f"ID{i}", person, msisdn=f"+86139000000{i:02d}")
    admin = pb_grpc.IndexAdminStub(server.channel)
    admin.Checkpoint(pb.CheckpointRequest())
    pb_grpc.InvestigateStub(server.channel).Search(pb.SearchRequest(
        **CASE, face=pb.Face(embedding=pb.Embedding(values=people[3].tolist())), k=5))
    assert server.stub.Delete(pb.DeleteRequest(id_number="ID3")).deleted == 1
    admin.Compact(pb.CompactRequest())
    address = f"127.0.0.1:{server.port}"

    backup = shared_dir(tmp_path / "backup")  # an empty directory made for it beforehand
    exports = tmp_path / "exports"
    exports.mkdir(mode=0o700)
    np.save(tmp_path / "impostor_scores.npy", np.random.default_rng(1).normal(0, 0.05, 500))
    for command in (("backup", str(server.data_dir), str(backup)),
                    ("audit", "export", str(server.data_dir), "--out",
                     str(exports / "trail.jsonl")),
                    ("calibrate", "--target-fpir", "0.01", "--gallery-size", "1000",
                     "--evaluation", str(tmp_path), "--record", str(server.data_dir)),
                    ("clusters", "--server", address, "--out", str(exports / "clusters.csv"),
                     *("--case-id", CASE["case_id"], "--purpose", CASE["purpose"]))):
        result = dedup(*command)
        assert result.returncode == 0, f"{command}: {result.stderr}"
    server.stop()  # the shutdown checkpoint too

    written = {path.relative_to(server.data_dir).as_posix()
               for path in server.data_dir.rglob("*")}
    assert {"store/data.mdb", "store/lock.mdb", "index.ckpt", "dedup.lock",
            "calibration.json"} <= written
    assert {"store/data.mdb", "index.ckpt"} <= {path.relative_to(backup).as_posix()
                                              for path in backup.rglob("*")}
    assert {path.name for path in exports.iterdir()} == {"trail.jsonl", "clusters.csv"}
    assert mode(server.data_dir) == mode(backup) == 0o700
    assert exposed(server.data_dir, backup, exports) == []


@pytest.mark.embedded_only(reason=DATA_DIR_FILES)
def test_files_an_older_version_left_readable_are_narrowed_at_start(make_server, faces,
                                                                    tmp_path):
    server = make_server()
    enroll(server.stub, "r0", "ID0", faces.persons(1)[0])
    server.stop()
    for path in server.data_dir.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    server.restart()
    assert exposed(server.data_dir) == []


@pytest.mark.embedded_only(reason=DATA_DIR_FILES)
def test_a_data_directory_others_may_enter_is_refused_and_left_alone(make_server, tmp_path):
    data_dir = shared_dir(tmp_path / "data")
    with pytest.raises(SharedDataDir) as refusal:
        make_server(data_dir=data_dir)
    assert str(data_dir) in str(refusal.value) and "mode 0755" in str(refusal.value)
    assert f"chmod 700 {data_dir}" in str(refusal.value)
    assert list(data_dir.iterdir()) == [] and mode(data_dir) == 0o755

    result = dedup("serve", "--data-dir", str(data_dir), "--address", "127.0.0.1:0")
    assert result.returncode == 1
    assert "mode 0755" in result.stderr and f"chmod 700 {data_dir}" in result.stderr
    assert list(data_dir.iterdir()) == []


@pytest.mark.embedded_only(reason=DATA_DIR_FILES)
def test_allowed_shared_data_directory_starts_with_a_warning(make_server, faces, tmp_path,
                                                             caplog):
    data_dir = shared_dir(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="dedup.store"):
        server = make_server(data_dir=data_dir, allow_shared_data_dir=True)
    enroll(server.stub, "r0", "ID0", faces.persons(1)[0])
    assert server.stub.Stats(pb.StatsRequest()).registrations == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("SHARED DATA DIRECTORY" in w and str(data_dir) in w and "0755" in w
               for w in warnings), warnings
    server.stop()

    served = ServerProcess(tmp_path / "data", "--allow-shared-data-dir")
    try:
        assert any("SHARED DATA DIRECTORY" in line for line in served.lines), served.lines
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert served.wait() == 0


def test_a_milvus_lite_file_is_private_even_with_an_open_umask(tmp_path, open_umask):
    """Milvus Lite made its directory and files with the umask's modes (0755 and 0644): every
    embedding, ID number and phone number readable by any user of the machine."""
    from conftest import release_milvus_lite

    from dedup.core.settings import MilvusConfig
    from dedup.gallery.milvus import MilvusGallery

    older = tmp_path / "older.db"
    older.mkdir(mode=0o755)
    os.chmod(older, 0o755)
    for lite in (tmp_path / "made" / "dedup.db", older):
        gallery = MilvusGallery(MilvusConfig(uri=str(lite)), "model-a", background=False)
        gallery.close(checkpoint=False)
        release_milvus_lite(lite)
        assert mode(lite) == 0o700, lite
