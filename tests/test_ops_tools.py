"""`dedup doctor` and `dedup backup` on real data directories."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import check, enroll

from dedup import FaceGenerator, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.errors import StoreDamaged, StoreError
from dedup.core.records import DeleteKey, Registration
from dedup.core.settings import IndexConfig
from dedup.face.model_pack import default_pack_dir, model_id_for
from dedup.gallery.embedded import store_copy
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.index import load_index
from dedup.gallery.embedded.store import Store
from dedup.ops import backup as backup_module

DATA_DIR_TOOLS = ("dedup doctor and dedup backup work on an embedded data directory; a Milvus "
                  "deployment is checked and backed up with Milvus's tools (docs/milvus.md)")


def dedup(*args: str) -> subprocess.CompletedProcess[str]:
    # A child process: LMDB forbids opening one environment twice in a process.
    return subprocess.run([sys.executable, "-m", "dedup", *args], capture_output=True,
                          text=True, timeout=300)


def findings(output: str) -> dict[str, str]:
    """check name -> level, from the report lines."""
    rows = [line.split(None, 2) for line in output.splitlines() if line.startswith("  ")]
    return {row[1]: row[0] for row in rows}


@pytest.fixture
def stopped_dir(make_server, faces) -> Path:
    server = make_server()
    for i, person in enumerate(faces.persons(30)):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    server.stop()
    return server.data_dir


@pytest.mark.embedded_only(reason=DATA_DIR_TOOLS)
def test_doctor_healthy_directory(stopped_dir):
    result = dedup("doctor", str(stopped_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(findings(result.stdout).values()) == {"ok"}
    assert "30 registrations" in result.stdout and "0 problem(s)" in result.stdout


@pytest.mark.embedded_only(reason=DATA_DIR_TOOLS)
def test_doctor_beside_a_running_server(server, faces):
    enroll(server.stub, "r0", "ID0", faces.persons(1)[0])
    result = dedup("doctor", str(server.data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a dedup server holds this directory" in result.stdout
    assert "1 registrations" in result.stdout


@pytest.mark.embedded_only(reason=DATA_DIR_TOOLS)
def test_doctor_finds_a_damaged_embedding(stopped_dir):
    with (stopped_dir / "store" / "vectors.f32").open("r+b") as handle:
        handle.seek(4096 + 2 * 2048)  # the slot of key 3, a stored registration's
        handle.write(b"\x7f" * 2048)
    result = dedup("doctor", str(stopped_dir))
    assert result.returncode == 1
    assert findings(result.stdout)["vectors"] == "problem"
    assert "key 3: its embedding in vectors.f32 is not a unit vector" in result.stdout


@pytest.mark.embedded_only(reason=DATA_DIR_TOOLS)
def test_doctor_finds_an_erased_slot_that_is_not_zeros(make_server, faces):
    server = make_server()
    people = faces.persons(10)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    server.stub.Delete(pb.DeleteRequest(registration_id="r4"))
    server.stop()  # checkpoints: the OP_REMOVE leaves the change log
    result = dedup("doctor", str(server.data_dir))
    assert result.returncode == 0 and "9 registrations' embeddings" in result.stdout
    with (server.data_dir / "store" / "vectors.f32").open("r+b") as handle:
        handle.seek(4096 + 4 * 2048)  # key 5: r4's
        handle.write(people[4].astype("float32").tobytes())
    result = dedup("doctor", str(server.data_dir))
    assert result.returncode == 1 and findings(result.stdout)["vectors"] == "problem"
    assert "key 5 is erased but its slot in vectors.f32 is not zeros" in result.stdout


@pytest.mark.embedded_only(reason=DATA_DIR_TOOLS)
def test_doctor_missing_checkpoint_is_a_warning(stopped_dir):
    (stopped_dir / "index.ckpt").unlink()
    result = dedup("doctor", str(stopped_dir))
    assert result.returncode == 0
    assert findings(result.stdout)["checkpoint"] == "warning"


@pytest.mark.embedded_only(reason=DATA_DIR_TOOLS)
def test_doctor_stale_checkpoint_past_the_log_is_a_problem(make_server, faces, tmp_path):
    server = make_server()
    people = faces.persons(20)
    for i in range(10):
        enroll(server.stub, f"r{i}", f"ID{i}", people[i])
    server.stop()
    old = tmp_path / "old.ckpt"
    shutil.copyfile(server.data_dir / "index.ckpt", old)
    server.restart()
    for i in range(10, 20):
        enroll(server.stub, f"r{i}", f"ID{i}", people[i])
    server.stop()  # checkpoints and truncates the change log behind it
    shutil.copyfile(old, server.data_dir / "index.ckpt")
    result = dedup("doctor", str(server.data_dir))
    assert result.returncode == 1
    assert findings(result.stdout)["index"] == "problem"
    assert "no longer reaches back" in result.stdout


def test_doctor_on_a_directory_without_a_store(tmp_path):
    result = dedup("doctor", str(tmp_path))
    assert result.returncode == 1 and "no LMDB store" in result.stdout


@pytest.mark.embedded_only(reason=DATA_DIR_TOOLS)
@pytest.mark.timeout(180)
def test_hot_backup_while_enrolling_is_a_consistent_prefix(make_server, faces, tmp_path):
    server = make_server()
    # Enough people that the writer is still enrolling when the backup ends, however fast
    # the machine enrols (600 were not: the backup's start-up outlasted 500 enrolments)
    people = faces.persons(5000)
    for i in range(100):
        enroll(server.stub, f"r{i}", f"ID{i}", people[i])
    backup_ended, done = threading.Event(), threading.Event()
    attempted = [100]  # the people the writer began to enrol

    failures: list[BaseException] = []

    def keep_enrolling() -> None:
        try:
            for i in range(100, len(people)):
                if backup_ended.is_set():
                    return
                attempted[0] = i + 1
                enroll(server.stub, f"r{i}", f"ID{i}", people[i])
            done.set()
        except BaseException as error:  # re-raised below: a thread's error is otherwise lost
            failures.append(error)

    writer = threading.Thread(target=keep_enrolling)
    writer.start()
    dest = tmp_path / "backup"
    result = dedup("backup", str(server.data_dir), str(dest))
    backup_ended.set()
    writer.join()
    if failures:
        raise failures[0]
    assert result.returncode == 0, result.stderr
    assert "backed up" in result.stdout
    assert not done.is_set(), "the backup did not overlap the enrolments"

    restored = make_server(data_dir=dest)
    stats = restored.stub.Stats(pb.StatsRequest())
    assert 100 <= stats.registrations < len(people)
    assert stats.index_vectors == stats.registrations
    assert stats.registrations <= attempted[0]
    # enrolments were sequential: the copy holds a prefix (the people after the writer's
    # last were never sent)
    for i in range(attempted[0]):
        present = _exists(restored.stub, f"r{i}")
        assert present == (i < stats.registrations), f"r{i}"
    for i in (0, stats.registrations - 1):
        top = check(restored.stub, people[i]).matches[0]
        assert top.registration.registration_id == f"r{i}" and top.score > 0.999
    restored.stop()
    assert dedup("doctor", str(dest)).returncode == 0


def _exists(stub: pb_grpc.FaceDedupStub, registration_id: str) -> bool:
    try:
        stub.GetRegistration(pb.GetRegistrationRequest(registration_id=registration_id))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


@pytest.mark.embedded_only(reason=DATA_DIR_TOOLS)
@pytest.mark.timeout(300)
def test_backup_while_erasing_holds_every_registration_whole_and_no_erased_one(make_server,
                                                                             tmp_path):
    """Erasures from the last registration down while `dedup backup` runs: those committed
    after the copy's LMDB snapshot, before their slot was copied, are erased in the copy."""
    people = FaceGenerator(41).persons(40_000)
    data_dir, dest = tmp_path / "data", tmp_path / "backup"
    gallery = EmbeddedGallery(StoreConfig(data_dir=data_dir), model_id=model_id_for(
        default_pack_dir() / "w600k_mbf.onnx"), background=False)
    for start in range(0, len(people), 10_000):
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i])
                             for i in range(start, start + 10_000)])
    gallery.close()
    server = make_server(data_dir=data_dir)
    stop, erased = threading.Event(), []

    def erase() -> None:
        for i in range(len(people) - 1, -1, -1):
            if stop.is_set():
                return
            server.stub.Delete(pb.DeleteRequest(registration_id=f"r{i}"))
            erased.append(i)

    eraser = threading.Thread(target=erase)
    eraser.start()
    while len(erased) < 5:
        time.sleep(0.01)
    result = dedup("backup", str(data_dir), str(dest))
    stop.set()
    eraser.join()
    server.stop()
    assert result.returncode == 0, result.stderr
    raw = (dest / "store" / "vectors.f32").read_bytes()
    slots = np.frombuffer(raw, np.float32, offset=4096).reshape(-1, 512)
    copied = [i for i in range(len(people)) if slots.shape[0] > i and slots[i].any()]
    assert copied == list(range(len(copied)))  # a prefix, each whole:
    assert np.array_equal(slots[:len(copied)], people[:len(copied)])
    assert len(copied) >= len(people) - len(erased)  # nothing erased before the copy began
    assert "in the copy" in result.stdout, "no erasure landed between the two copies"
    data = (dest / "store" / "data.mdb").read_bytes()
    assert b'"r":"r%d"' % (len(copied) - 1) in data and b'"r":"r%d"' % len(copied) not in data
    checked = dedup("doctor", str(dest))
    assert checked.returncode == 0 and "0 warning(s)" in checked.stdout, checked.stdout
    assert f"{len(copied)} registrations" in checked.stdout
    restored = make_server(data_dir=dest)
    stats = restored.stub.Stats(pb.StatsRequest())
    assert stats.registrations == stats.index_vectors == len(copied)
    top = check(restored.stub, people[len(copied) - 1]).matches[0]
    assert top.registration.registration_id == f"r{len(copied) - 1}" and top.score > 0.999



def test_a_store_copy_holds_no_lmdb_snapshot_while_it_reads_the_slots(tmp_path, monkeypatch):
    """LMDB reuses no page freed after an open reader's snapshot, so a copy that held its
    transaction across the vector file's slots (20 GB at 10,000,000) grew the store by every
    write meanwhile. The transaction ends with LMDB's copy; a registration erased before its
    slot was read is still found, from the copy's own records."""
    people = FaceGenerator(43).persons(200)
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "model-a",
                              background=False)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(200)])
        real_copy = store_copy._copy_slots
        seen: list[str] = []

        def copy_slots(*args):
            with gallery.store._lmdb.shared() as env:
                seen.append(env.readers())
            gallery.delete(DeleteKey.REGISTRATION_ID, "r199")  # its slot zeroed before read
            return real_copy(*args)

        monkeypatch.setattr(store_copy, "_copy_slots", copy_slots)
        target = tmp_path / "copy"
        target.mkdir()
        copied = gallery.store.copy_to(target)
    finally:
        gallery.close(checkpoint=False)
    readers = [line.split() for line in seen[0].splitlines()[1:]]
    assert readers and all(txnid == "-" for _, _, txnid in readers), seen[0]
    assert copied.assigned == 200 and copied.erased_meanwhile == ["r199"]


_BACKUP_ACROSS_A_COMPACTION = """
import sys
from pathlib import Path

import grpc

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.gallery.embedded import store_copy
from dedup.ops.backup import backup

port, data_dir, dest = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
copy_slots = store_copy._copy_slots


def compacted_and_erased_first(*args):
    stub = pb_grpc.FaceDedupStub(channel)
    stub.Delete(pb.DeleteRequest(registration_id="r0"))
    pb_grpc.IndexAdminStub(channel).Compact(pb.CompactRequest())
    stub.Delete(pb.DeleteRequest(registration_id="r29"))  # into the new data file only
    return copy_slots(*args)


store_copy._copy_slots = compacted_and_erased_first
print("erased in the copy:", backup(data_dir, dest).erased_meanwhile)
"""


@pytest.mark.embedded_only(reason=DATA_DIR_TOOLS)
def test_a_backup_across_a_compaction_erases_in_the_copy_not_reports_damage(make_server,
                                                                           tmp_path):
    """After the backup's LMDB copy, before the slots are read, the server erases r0,
    compacts its store, then erases r29. The backup's environment still reads the replaced
    data file, where r29 is stored: its zeroed slot looked like damage ("restore from a
    backup"). The store is opened again, and both are erased in the copy."""
    server = make_server()
    for i, person in enumerate(FaceGenerator(44).persons(30)):
        enroll(server.stub, f"r{i}", f"ID{i}", person)
    dest = tmp_path / "backup"
    result = subprocess.run([sys.executable, "-c", _BACKUP_ACROSS_A_COMPACTION,
                             str(server.port), str(server.data_dir), str(dest)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "erased in the copy: 2" in result.stdout
    server.stop()
    checked = dedup("doctor", str(dest))
    assert checked.returncode == 0 and "28 registrations" in checked.stdout, checked.stdout


def test_a_store_copy_never_holds_a_slot_whose_zeroing_failed(tmp_path, monkeypatch):
    """A disk error zeroed nothing when r3 was erased: its embedding stays in the vector
    file until its removal leaves the change log. A copy taken meanwhile leaves it out."""
    people = FaceGenerator(45).persons(20)
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "model-a",
                              background=False)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(20)])

        def disk_error(keys):
            raise OSError(5, "Input/output error (injected)")

        monkeypatch.setattr(gallery.store._slots, "zero", disk_error)
        with pytest.raises(OSError):
            gallery.delete(DeleteKey.REGISTRATION_ID, "r3")
        monkeypatch.undo()
        assert people[3].tobytes() in (tmp_path / "data" / "store" / "vectors.f32").read_bytes()
        target = tmp_path / "copy"
        target.mkdir()
        gallery.store.copy_to(target)
    finally:
        gallery.close(checkpoint=False)
    copied = (target / "vectors.f32").read_bytes()
    assert people[3].tobytes() not in copied and people[4].tobytes() in copied


@pytest.mark.parametrize("zeroing", ["fails", "after the slots are read"])
def test_a_store_copy_erases_what_was_erased_before_it_finished(tmp_path, monkeypatch, zeroing):
    """r7 is erased after the copy's LMDB snapshot: its Delete's zeroing fails on a disk
    error before the slots are read, or succeeds only after they were. Either way its slot
    was read holding its embedding, whole, so nothing marked it: the copy is told to erase
    it, as one whose zeroed slot was read."""
    people = FaceGenerator(46).persons(20)
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "model-a",
                              background=False)
    real_copy = store_copy._copy_slots

    def erase_r7() -> None:
        if zeroing == "fails":
            monkeypatch.setattr(gallery.store._slots, "zero", _disk_error)
            with pytest.raises(OSError):
                gallery.delete(DeleteKey.REGISTRATION_ID, "r7")
            monkeypatch.undo()
        else:
            gallery.delete(DeleteKey.REGISTRATION_ID, "r7")

    def copy_slots(*args):
        if zeroing == "fails":
            erase_r7()
            return real_copy(*args)
        suspects = real_copy(*args)
        erase_r7()
        return suspects

    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(20)])
        monkeypatch.setattr(store_copy, "_copy_slots", copy_slots)
        target = tmp_path / "copy"
        target.mkdir()
        copied = gallery.store.copy_to(target)
    finally:
        gallery.close(checkpoint=False)
    assert copied.erased_meanwhile == ["r7"]
    held = (tmp_path / "copy" / "vectors.f32").read_bytes()
    assert people[7].tobytes() not in held and people[8].tobytes() in held


def _disk_error(keys):
    raise OSError(5, "Input/output error (injected)")


def test_a_store_copy_of_a_damaged_slot_fails_and_names_its_key(tmp_path):
    """r5's slot is zeros while its record is stored (damage, not an erasure): the copy
    fails, naming the key, rather than restoring a registration without its embedding."""
    people = FaceGenerator(47).persons(20)
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "model-a",
                              background=False)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(20)])
        _zero_slot(tmp_path / "data", key=6)  # r5's
        target = tmp_path / "copy"
        target.mkdir()
        with pytest.raises(StoreDamaged, match="key 6 is not a unit vector"):
            gallery.store.copy_to(target)
    finally:
        gallery.close(checkpoint=False)


def _every_file_under(root: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file())


@pytest.mark.embedded_only(reason=DATA_DIR_TOOLS)
@pytest.mark.parametrize("kind", ["Flat", "BinarySign512"])
def test_a_backup_holds_no_byte_of_anyone_erased_before_it(make_server, tmp_path, kind):
    """Half of 400 registrations erased by ID number after the last checkpoint, before the
    backup (the server's erasure checkpoint not yet due, its compaction an hour off). The
    copied checkpoint (Flat: every embedding exact) held their embeddings, and LMDB's copy
    of whole pages kept ID and phone numbers in their free space. Now the checkpoint is
    brought up to the copy and the copy compacted: no file of the backup holds any of them,
    and the copy serves the other 200 from that checkpoint."""
    n = 400
    server = make_server(erasure_checkpoint_delay_s=600.0,
                         index=IndexConfig(index_factory=kind))
    people = FaceGenerator(48).persons(n)
    for i, person in enumerate(people):
        enroll(server.stub, f"r{i}", f"PERSON-{i:04d}-ID", person, msisdn=f"+86139{i:08d}")
    pb_grpc.IndexAdminStub(server.channel).Checkpoint(pb.CheckpointRequest())
    slots = (server.data_dir / "store" / "vectors.f32").read_bytes()
    stored = [slots[4096 + i * 2048:4096 + (i + 1) * 2048] for i in range(n)]  # key i + 1
    for i in range(0, n, 2):
        server.stub.Delete(pb.DeleteRequest(id_number=f"PERSON-{i:04d}-ID"))
    dest = tmp_path / "backup"
    result = dedup("backup", str(server.data_dir), str(dest))
    server.stop()
    assert result.returncode == 0, result.stderr
    assert "index checkpoint brought up to the copy" in result.stdout
    held = _every_file_under(dest)
    for i in range(n):
        personal = (stored[i], f"PERSON-{i:04d}-ID".encode(), f"+86139{i:08d}".encode())
        assert [part in held for part in personal] == [i % 2 == 1] * 3, i
    copied = Store.reader(dest)
    try:
        (model_id,) = copied.model_counts()
        index, covered = load_index(dest / "index.ckpt", 512, model_id)
        assert (index.kind, len(index), covered) == (kind, n // 2, copied.sequence())
    finally:
        copied.close()
    restored = make_server(data_dir=dest, index=IndexConfig(index_factory=kind))
    stats = restored.stub.Stats(pb.StatsRequest())
    assert stats.registrations == stats.index_vectors == n // 2
    assert check(restored.stub, people[7]).matches[0].registration.registration_id == "r7"


def _stored_twenty(tmp_path: Path, seed: int) -> None:
    """Twenty registrations r0..r19 in tmp_path/data, checkpointed and closed."""
    people = FaceGenerator(seed).persons(20)
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "model-a",
                              background=False)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(20)])
    finally:
        gallery.close()


def _zero_slot(data_dir: Path, key: int) -> None:
    """Zeros in `key`'s slot of the vector file, its record left alone: damage."""
    with open(data_dir / "store" / "vectors.f32", "r+b") as handle:
        handle.seek(4096 + (key - 1) * 2048)
        handle.write(bytes(2048))


def test_a_backup_that_fails_leaves_nothing_behind(tmp_path):
    """A damaged slot fails the backup after the store was copied: the copy (every other
    registration's record and embedding) is removed, not left in DEST."""
    _stored_twenty(tmp_path, 49)
    _zero_slot(tmp_path / "data", key=6)
    made, given = tmp_path / "new-backup", tmp_path / "empty-backup"
    given.mkdir()
    for dest in (made, given):
        result = dedup("backup", str(tmp_path / "data"), str(dest))
        assert result.returncode != 0 and "key 6 is not a unit vector" in result.stderr
    assert not made.exists() and given.is_dir() and not any(given.iterdir())


_BACKUP_KILLED = """
import os
import signal
import sys
from pathlib import Path

from dedup.gallery.embedded import store_copy
from dedup.ops.backup import backup


def killed(*args):
    os.kill(os.getpid(), signal.SIGKILL)  # after LMDB's copy, before the slots


store_copy._copy_slots = killed
backup(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_a_killed_backup_is_refused_as_a_data_directory(tmp_path):
    """A backup killed after LMDB's copy left a directory that looked like a data directory,
    with the records of anyone erased meanwhile: a server served it. Its marker stays, and
    a server, another backup into it and doctor refuse it."""
    _stored_twenty(tmp_path, 50)
    dest = tmp_path / "backup"
    killed = subprocess.run([sys.executable, "-c", _BACKUP_KILLED, str(tmp_path / "data"),
                             str(dest)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert (dest / "BACKUP-NOT-FINISHED").exists() and (dest / "store" / "data.mdb").exists()
    with pytest.raises(StoreError, match="a backup that did not finish"):
        EmbeddedGallery(StoreConfig(data_dir=dest), "model-a", background=False)
    again = dedup("backup", str(tmp_path / "data"), str(dest))
    assert again.returncode != 0 and "not empty" in again.stderr
    checked = dedup("doctor", str(dest))
    assert checked.returncode == 1 and "backup that did not finish" in checked.stdout
    for tool in (("backup", str(dest), str(tmp_path / "again")),
                 ("migrate", "--from", str(dest), "--to", str(tmp_path / "m.db")),
                 ("audit", "verify", str(dest))):
        refused = dedup(*tool)
        assert refused.returncode != 0 and "a backup that did not finish" in refused.stderr, \
            (tool, refused.stderr)


def test_a_backup_leaves_out_a_checkpoint_whose_checksum_fails(tmp_path):
    """Whether the copied checkpoint holds anyone erased since is judged by the sequence in
    its header: a damaged file (a sequence raised, say) was copied as good. Its checksum is
    verified first; a damaged one is left out and the copy's server builds from the store."""
    _stored_twenty(tmp_path, 51)
    checkpoint = tmp_path / "data" / "index.ckpt"
    damaged = bytearray(checkpoint.read_bytes())
    damaged[-100] ^= 0xFF
    checkpoint.write_bytes(bytes(damaged))
    result = dedup("backup", str(tmp_path / "data"), str(tmp_path / "backup"))
    assert result.returncode == 0, result.stderr
    assert "index checkpoint left out" in result.stdout and "checksum mismatch" in result.stderr
    assert not (tmp_path / "backup" / "index.ckpt").exists()


def _cgroup_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize(("proc", "files", "room"), [
    ("0::/a/b\n", {"a/b/memory.max": "max\n", "a/memory.max": "1000000\n",
                   "a/memory.current": "600000\n",
                   "a/memory.stat": "anon 400000\ninactive_file 100000\n"}, 500000),
    ("4:memory:/x\n1:cpu:/\n", {"memory/x/memory.limit_in_bytes": "9223372036854771712\n",
                                "memory/memory.limit_in_bytes": "2000\n",
                                "memory/memory.usage_in_bytes": "1500\n",
                                "memory/memory.stat": "total_inactive_file 300\n"}, 800),
    ("0::/\n", {"memory.max": "max\n"}, None),
])
def test_the_backups_memory_budget_reads_its_own_cgroup(tmp_path, proc, files, room):
    """The room under the smallest limit on the process's own cgroup path (the mount's root
    was read: a limit set on the process's cgroup was missed), its reclaimable page cache
    counted as room (the server's mapped vector file is charged to the cgroup)."""
    (tmp_path / "cgroup").write_text(proc)
    _cgroup_files(tmp_path / "fs", files)
    assert backup_module.cgroup_room(tmp_path / "cgroup", tmp_path / "fs") == room


def test_a_migration_from_a_directory_without_a_store_leaves_nothing(tmp_path):
    """A mistyped --from was made a data directory (0700, a lock file) by the lock taken
    before anything was read; it is refused first now."""
    result = dedup("migrate", "--from", str(tmp_path / "mistyped"), "--to",
                   str(tmp_path / "m.db"))
    assert result.returncode != 0 and "no dedup store to migrate" in result.stderr
    assert not (tmp_path / "mistyped").exists() and not (tmp_path / "m.db").exists()
