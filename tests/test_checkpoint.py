"""The checkpoint file format: every kind of damage is a clean CheckpointError."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time

import numpy as np
import pytest

from dedup import CheckpointError, FaceGenerator, StoreConfig
from dedup.core.errors import StoreError
from dedup.core.records import DeleteKey, Registration
from dedup.core.settings import IndexConfig
from dedup.gallery.base import Erasure
from dedup.gallery.embedded import checkpointer
from dedup.gallery.embedded.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.index import (
    FlatIndex,
    SearchOptions,
    SnapshotBuffer,
    load_index,
    new_index,
    training_size,
)
from dedup.gallery.embedded.maintenance import run_every
from dedup.gallery.embedded.rebuilder import Rebuilder


@pytest.fixture
def saved(tmp_path):
    index = FlatIndex(512)
    index.add(np.arange(100, 110, dtype=np.int64), FaceGenerator(1).persons(10))
    path = tmp_path / "index.ckpt"
    write_checkpoint(path, index.snapshot(sequence=42, model_id="model-a"))
    return path


def test_round_trip(saved):
    index, sequence = load_index(saved, 512, "model-a")
    assert sequence == 42
    assert len(index) == 10
    (ids, scores), = index.search(FaceGenerator(1).persons(10)[3:4], 1, SearchOptions())
    assert ids.tolist() == [103] and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert not (saved.parent / "index.ckpt.tmp").exists()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda data: b"", "truncated header"),
    (lambda data: data[:40], "truncated header"),
    (lambda data: b"XXXXXXXX" + data[8:], "bad magic"),
    (lambda data: data[:8] + b"\x09\x00\x00\x00" + data[12:], "unsupported checkpoint version"),
    (lambda data: data[:-1], "header says"),
    (lambda data: data + b"\x00", "header says"),
    (lambda data: data[:-5] + bytes([data[-5] ^ 1]) + data[-4:], "checksum mismatch"),
])
def test_damaged_file_is_a_clean_error(saved, damage, message):
    saved.write_bytes(damage(saved.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as error:
        load_index(saved, 512, "model-a")
    assert str(saved) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path / "absent.ckpt")


def test_valid_checksum_but_not_faiss(tmp_path):
    path = tmp_path / "index.ckpt"
    write_checkpoint(path, Checkpoint(1, 0, "model-a",
                                        (memoryview(b"definitely not a faiss index"),)))
    with pytest.raises(CheckpointError, match="FAISS cannot read"):
        load_index(path, 512, "model-a")


def test_wrong_dimension(saved):
    with pytest.raises(CheckpointError, match="dimension"):
        load_index(saved, 128, "model-a")


def test_other_model(saved):
    with pytest.raises(CheckpointError, match="holds embeddings of model 'model-a'"):
        load_index(saved, 512, "model-b")


def test_a_large_checkpoint_reaches_the_disk_as_it_is_written(tmp_path, monkeypatch):
    """A checkpoint is flushed every `flush_every` bytes, not fsynced once at its end: written
    whole, a 720 MB index left that much dirty data for the store's fsyncs to wait behind. Its
    parts (FAISS writes an index in thousands of pieces) are flushed together."""
    payload = np.random.default_rng(3).integers(0, 256, (10 << 20) + 7, dtype=np.uint8)
    small = [memoryview(payload.data)[i:i + 10_000] for i in range(0, 3_000_000, 10_000)]
    cases = {"one part": (memoryview(payload.data),),
             "many parts": (*small, memoryview(payload.data)[3_000_000:])}
    unflushed: list[int] = []
    real_fdatasync, flushed_at = os.fdatasync, [0]

    def fdatasync(descriptor: int) -> None:
        size = os.fstat(descriptor).st_size
        unflushed.append(size - flushed_at[0])
        flushed_at[0] = size
        real_fdatasync(descriptor)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    whole = tmp_path / "whole.ckpt"
    write_checkpoint(whole, Checkpoint(7, 1, "model-a", cases["one part"]), flush_every=None)
    assert not unflushed
    for name, parts in cases.items():
        unflushed.clear()
        flushed_at[0] = 0
        path = tmp_path / f"{name}.ckpt"
        write_checkpoint(path, Checkpoint(7, 1, "model-a", parts), flush_every=1 << 20)
        assert len(unflushed) >= 8, name
        assert 1 << 20 <= max(unflushed) <= 2 << 20, name
        assert path.read_bytes() == whole.read_bytes(), name
        assert read_checkpoint(path).payload == memoryview(payload.data)


def _flipped(data: bytes, offset: int, bit: int = 0) -> bytes:
    return data[:offset] + bytes([data[offset] ^ (1 << bit)]) + data[offset + 1:]


@pytest.mark.parametrize(("field", "offset", "bit"), [
    ("sequence", 12, 1), ("vectors", 20, 0), ("model id", 72, 0), ("index type", 79, 0),
])
def test_a_flipped_bit_in_the_header_is_refused(saved, field, offset, bit):
    """The SHA-256 covered only the payload: a bit flipped in the sequence started the change
    log's replay from the wrong change (an acknowledged enrolment missing from the index, an
    erased face still in it), and one in the model id or type escaped as a UnicodeDecodeError."""
    saved.write_bytes(_flipped(saved.read_bytes(), offset, bit))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_index(saved, 512, "model-a")


def test_a_model_id_that_is_not_utf8_is_a_clean_error(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:72] + b"\xed" + data[73:])  # the model id's first byte
    with pytest.raises(CheckpointError, match="model id is not UTF-8"):
        load_index(saved, 512, "model-a")


def test_a_long_model_id_round_trips(tmp_path):
    """Model ids were cut to 64 bytes: such a checkpoint never matched its model again (a
    full rebuild at every start), or failed to open when the cut split a character."""
    model = "Ünïcödé-recogniser-with-a-long-file-name-w600k_mbf-0123456789ab"
    assert len(model.encode()) > 64
    index = FlatIndex(512)
    index.add(np.arange(3, dtype=np.int64), FaceGenerator(1).persons(3))
    path = tmp_path / "index.ckpt"
    write_checkpoint(path, index.snapshot(sequence=7, model_id=model))
    loaded, sequence = load_index(path, 512, model)
    assert (len(loaded), sequence) == (3, 7)


def test_a_version_2_checkpoint_is_still_read(tmp_path):
    """Written before the header was signed: loaded as it is (no rebuild at the upgrade)."""
    import hashlib
    import struct

    index = FlatIndex(512)
    index.add(np.arange(5, dtype=np.int64), FaceGenerator(2).persons(5))
    payload = index.snapshot(sequence=9, model_id="model-a").payload.tobytes()
    header = struct.pack("<8sIQQQ32s64s64s", b"DDUPCKPT", 2, 9, 5, len(payload),
                         hashlib.sha256(payload).digest(), b"model-a", b"Flat")
    path = tmp_path / "index.ckpt"
    path.write_bytes(header + payload)
    loaded, sequence = load_index(path, 512, "model-a")
    assert (len(loaded), sequence, loaded.kind) == (5, 9, "Flat")
    path.write_bytes(_flipped(header + payload, len(header) + 10))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_index(path, 512, "model-a")


@pytest.mark.parametrize("kind", ["Flat", "SignIVF16", "FastScanIVF16"])
def test_snapshots_into_a_kept_buffer_hold_the_index_as_it_was(tmp_path, kind):
    """A buffer serves one snapshot after another (a smaller after a larger one): each file
    holds the index as it was when its snapshot was taken, and the memory is kept."""
    vectors = FaceGenerator(3).persons(1000)
    index = new_index(kind, 512)
    if training_size(kind, 512):
        index.train(vectors[:training_size(kind, 512)])  # type: ignore[attr-defined]
    index.add(np.arange(1000, dtype=np.int64), vectors)
    buffer = SnapshotBuffer()
    path = tmp_path / "index.ckpt"
    write_checkpoint(path, index.snapshot(1, "model-a", buffer))
    address = buffer.address
    index.remove(np.arange(500, dtype=np.int64))
    shrunk = index.snapshot(2, "model-a", buffer)
    index.add(np.arange(500, dtype=np.int64), vectors[:500])  # after the copy: not in it
    write_checkpoint(path, shrunk)
    loaded, sequence = load_index(path, 512, "model-a")
    assert (sequence, len(loaded)) == (2, 500)
    found = [ids.tolist() for ids, _ in loaded.search(vectors[[0, 700]], 1,
                                                       SearchOptions(nprobe=16))]
    assert found[0] != [0] and found[1] == [700]
    assert buffer.address == address  # the second snapshot reused the first's memory


def test_the_checkpointer_takes_every_checkpoint_in_one_kept_buffer(tmp_path, monkeypatch):
    people = FaceGenerator(4).persons(300)
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "model-a",
                              background=False)
    taken: list[bool] = []
    real = SnapshotBuffer.serialized

    def counted(self, index, binary):
        taken.append(binary)
        return real(self, index, binary)

    monkeypatch.setattr(SnapshotBuffer, "serialized", counted)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(300)])
        gallery.checkpoint()
        address = gallery._checkpointer.buffer.address
        gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        gallery.checkpoint()
        assert len(taken) == 2  # both checkpoints in the buffer
        assert gallery._checkpointer.buffer.address == address != 0  # fitted, kept
    finally:
        gallery.close()
    loaded, _ = load_index(tmp_path / "data" / "index.ckpt", 512, "model-a")
    assert len(loaded) == 299


def _rebuild_with(gallery, change, monkeypatch, kind="BinarySign512"):
    """A live rebuild to `kind` with `change` made while its child fills; the snapshots
    taken once it reported its start counted (not a checkpoint pending before, which is
    written first)."""
    taken: list[bool] = []
    real = SnapshotBuffer.serialized
    started: list[bool] = []

    def counted(self, index, binary):
        if started:
            taken.append(binary)
        return real(self, index, binary)

    changed: list[bool] = []

    def progress(phase, done, total):
        started.append(True)
        if phase == "adding" and not changed:
            change()
            changed.append(True)

    monkeypatch.setattr(SnapshotBuffer, "serialized", counted)
    gallery.rebuild(kind, progress)
    assert changed
    return taken


def test_a_live_rebuild_takes_its_side_file_as_the_checkpoint(tmp_path, monkeypatch):
    """The swap writes no second copy of the new index: the side file, already fsynced,
    becomes the checkpoint as of the build, and the change log keeps what came after it
    (at 10,000,000 a second copy cost ~1 s of the checks' CPU at the swap). Someone erased
    before the build is not in the side file: that erasure does not stop it."""
    people = FaceGenerator(6).persons(601)
    config = StoreConfig(data_dir=tmp_path / "data")
    gallery = EmbeddedGallery(config, "model-a", IndexConfig(index_factory="Flat"),
                              background=False)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(600)])
        gallery.delete(DeleteKey.REGISTRATION_ID, "r599")
        taken = _rebuild_with(gallery, lambda: gallery.insert_many(
            [(Registration("late", "ID-late"), people[600])]), monkeypatch)
        assert taken == []  # no snapshot at the swap
        on_disk = read_checkpoint(tmp_path / "data" / "index.ckpt")
        assert (on_disk.kind, on_disk.vectors) == ("BinarySign512", 599)  # as built
        assert gallery.checkpoint_sequence == on_disk.sequence
        assert not (tmp_path / "data" / "index.ckpt.rebuild").exists()
    finally:
        gallery.close(checkpoint=False)
    reopened = EmbeddedGallery(config, "model-a", IndexConfig(index_factory="BinarySign512"),
                               background=False)
    try:  # the enrolment made during the build, replayed from the log
        assert len(reopened.index) == 600
        found = reopened.index.search(people[600][None, :], 1, SearchOptions())
        assert found[0][0].tolist() == [reopened.stored_face("late")[0]]
    finally:
        reopened.close(checkpoint=False)


def test_a_live_rebuild_with_an_erasure_meanwhile_writes_its_checkpoint_again(
        tmp_path, monkeypatch):
    """The side file holds whoever was erased during the build: it must not become the
    checkpoint. The swap writes the new index instead, in the checkpointer's kept memory
    (not in fresh pieces, with writes held), without the erased, and the writing below the
    checks' priority."""
    people = FaceGenerator(6).persons(600)
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "model-a",
                              IndexConfig(index_factory="Flat", rebuild_niceness=7),
                              background=False)
    written_at: list[int] = []
    real_write = checkpointer.write_checkpoint

    def recording(*args, **kwargs):
        written_at.append(os.getpriority(os.PRIO_PROCESS, 0))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpointer, "write_checkpoint", recording)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(600)])
        erased_key = gallery.stored_face("r0")[0]
        taken = _rebuild_with(gallery, lambda: gallery.delete(DeleteKey.REGISTRATION_ID, "r0"),
                              monkeypatch)
        assert taken == [True]  # the new (binary) index's one snapshot, in the buffer
        assert written_at == [min(19, ours + 7)]
        store_sequence = gallery.index_status().store_sequence
    finally:
        gallery.close(checkpoint=False)
    loaded, sequence = load_index(tmp_path / "data" / "index.ckpt", 512, "model-a")
    assert (loaded.kind, len(loaded), sequence) == ("BinarySign512", 599, store_sequence)
    assert erased_key not in loaded.search(people[0][None, :], 5, SearchOptions())[0][0]


def test_a_live_rebuild_never_puts_back_an_older_checkpoint(tmp_path, monkeypatch):
    """A checkpoint written during the build covers more than the side file: the swap
    writes the new index as of now instead of renaming the side file over it."""
    people = FaceGenerator(6).persons(601)
    config = StoreConfig(data_dir=tmp_path / "data")
    gallery = EmbeddedGallery(config, "model-a", IndexConfig(index_factory="Flat"),
                              background=False)
    during: list[int] = []

    def enrolled_and_checkpointed():
        gallery.insert_many([(Registration("late", "ID-late"), people[600])])
        during.append(gallery.checkpoint())

    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(600)])
        taken = _rebuild_with(gallery, enrolled_and_checkpointed, monkeypatch)
        assert taken == [False, True]  # the old (Flat) index's checkpoint, then the new one's
        on_disk = read_checkpoint(tmp_path / "data" / "index.ckpt")
        assert (on_disk.kind, on_disk.vectors) == ("BinarySign512", 601)
        assert on_disk.sequence == gallery.checkpoint_sequence >= during[0]
    finally:
        gallery.close(checkpoint=False)


def test_after_a_live_rebuild_an_erasures_receipt_allows_for_the_new_index(tmp_path,
                                                                           monkeypatch):
    """A rebuild's swap may write an index slower to write than the one before (another
    type, more vectors; here each BinarySign512 write waits 0.6 s more): the next erasure's
    promise allows twice that writing, and holds."""
    real_write = checkpointer.write_checkpoint

    def slow_for_the_new_type(path, snapshot):
        if snapshot.kind == "BinarySign512":
            time.sleep(0.6)
        return real_write(path, snapshot)

    gallery = _enrolled_gallery(tmp_path, 11, 600, erasure_checkpoint_delay_s=0.3)
    monkeypatch.setattr(checkpointer, "write_checkpoint", slow_for_the_new_type)
    try:
        gallery.checkpoint()  # the Flat index, fast
        # An erasure during the build: the swap writes the new index (not its side file).
        _rebuild_with(gallery, lambda: gallery.delete(DeleteKey.REGISTRATION_ID, "r0"),
                      monkeypatch)
        assert read_checkpoint(tmp_path / "data" / "index.ckpt").kind == "BinarySign512"
        _no_erasure_checkpoint_pending(gallery)  # r1's is a promise of its own
        _erased_by_the_receipts_due(gallery, "r1", allowing=0.3 + 2 * 0.6)
    finally:
        gallery.close(checkpoint=False)
    assert read_checkpoint(tmp_path / "data" / "index.ckpt").vectors == 598


def test_erasures_before_and_during_a_rebuild_allow_for_its_swap_writing_the_larger_index(
        tmp_path, monkeypatch):
    """A live rebuild from BinarySign512 (140 KB) to Flat (4 MB, written at 1 MB/s). r0 is
    erased just before it starts: its checkpoint, promised for the old index 3 s on, is
    written before the rebuild goes on, not behind the swap's 4 s write. r1 is erased after
    the build, before the swap: its promise allows for writing the new index. Both hold."""
    erasures: list[_Watched] = []
    real_catch_up = Rebuilder._catch_up

    def erase_r1_first(self, index, covered):
        if len(erasures) == 1:
            erasures.append(_erased(gallery, "r1"))
        return real_catch_up(self, index, covered)

    gallery = _binary_gallery_writing_at(1e6, tmp_path, 13, monkeypatch,
                                         erasure_checkpoint_delay_s=3.0)
    try:
        monkeypatch.setattr(Rebuilder, "_catch_up", erase_r1_first)
        erasures.append(_erased(gallery, "r0"))
        gallery.rebuild("Flat", lambda *_: None)
        _kept(erasures)
    finally:
        gallery.close(checkpoint=False)
    assert len(erasures) == 2
    assert read_checkpoint(tmp_path / "data" / "index.ckpt").vectors == 1998


def test_an_erasure_while_a_rebuilds_swap_writes_allows_for_the_rest_of_that_write(
        tmp_path, monkeypatch):
    """An erasure made while a live rebuild's swap writes the new index (4 MB of Flat at 2
    MB/s, after a BinarySign512 of 140 KB) has its checkpoint wait for that write: its promise
    allows for the rest of it and for writing the larger index again, and holds."""
    erasures: list[_Watched] = []

    def erase_r0_and_wait_for_its_checkpoint() -> None:
        _erased(gallery, "r0").join()

    def erase_r1_in_the_swaps_write(snapshot: Checkpoint) -> None:
        if snapshot.kind == "Flat" and not erasures:
            erasures.append(_erased(gallery, "r1"))

    gallery = _binary_gallery_writing_at(2e6, tmp_path, 14, monkeypatch,
                                         erase_r1_in_the_swaps_write)
    try:
        _rebuild_with(gallery, erase_r0_and_wait_for_its_checkpoint, monkeypatch, kind="Flat")
        _kept(erasures)
    finally:
        gallery.close(checkpoint=False)
    assert read_checkpoint(tmp_path / "data" / "index.ckpt").vectors == 1998


def test_an_erasure_the_swaps_write_covered_is_not_written_again(tmp_path, monkeypatch):
    """r1 is erased after a rebuild's build: the swap's write of the new index covers it. An
    enrolment made during that write leaves the store ahead of it, but the erasure's own
    checkpoint writes nothing more (a second 4 MB Flat here; 720 MB at 10,000,000)."""
    erasures: list[_Watched] = []
    flat_writes: list[float] = []
    real_catch_up = Rebuilder._catch_up
    person = FaceGenerator(99).persons(1)[0]

    def erase_r1_first(self, index, covered):
        if not erasures:
            erasures.append(_erased(gallery, "r1"))
        return real_catch_up(self, index, covered)

    def enrol_during_the_swaps_write(snapshot: Checkpoint) -> None:
        if snapshot.kind == "Flat":
            flat_writes.append(time.time())
            if len(flat_writes) == 1:
                gallery.insert(Registration("new", "IDnew"), person)

    gallery = _binary_gallery_writing_at(4e6, tmp_path, 15, monkeypatch,
                                         enrol_during_the_swaps_write)
    try:
        monkeypatch.setattr(Rebuilder, "_catch_up", erase_r1_first)
        gallery.rebuild("Flat", lambda *_: None)
        _kept(erasures)
        _no_erasure_checkpoint_pending(gallery)
        time.sleep(0.2)  # a second write would have begun by now
    finally:
        gallery.close(checkpoint=False)
    assert len(flat_writes) == 1


def _binary_gallery_writing_at(rate: float, tmp_path, seed: int, monkeypatch,
                               before_each_write=lambda snapshot: None,
                               erasure_checkpoint_delay_s: float = 0.6) -> EmbeddedGallery:
    """2,000 people enrolled in BinarySign512 and checkpointed; from then on each checkpoint
    write takes its size at `rate` bytes a second, after `before_each_write(snapshot)`."""
    real_write = checkpointer.write_checkpoint
    people = FaceGenerator(seed).persons(2000)
    config = StoreConfig(data_dir=tmp_path / "data", checkpoint_interval_s=3600,
                         erasure_checkpoint_delay_s=erasure_checkpoint_delay_s)
    gallery = EmbeddedGallery(config, "model-a", IndexConfig(index_factory="BinarySign512"))

    def slowed(path, snapshot):
        before_each_write(snapshot)
        time.sleep(snapshot.nbytes / rate)
        return real_write(path, snapshot)

    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(2000)])
        monkeypatch.setattr(checkpointer, "write_checkpoint", slowed)
        gallery.checkpoint()
    except BaseException:
        gallery.close(checkpoint=False)
        raise
    return gallery


def _erased(gallery: EmbeddedGallery, registration_id: str) -> _Watched:
    """Erases `registration_id`; watches (on a thread) for the checkpoint without it."""
    erasure = gallery.delete(DeleteKey.REGISTRATION_ID, registration_id)
    return _Watched(gallery, erasure, gallery.index_status().store_sequence)


class _Watched(threading.Thread):
    """When the checkpoint first covered an erasure (time.time())."""

    def __init__(self, gallery: EmbeddedGallery, erasure: Erasure, erased: int) -> None:
        super().__init__(daemon=True)
        self.gallery, self.erasure, self.erased = gallery, erasure, erased
        self.covered_at = math.inf
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + 30
        while self.gallery.checkpoint_sequence < self.erased and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.gallery.checkpoint_sequence >= self.erased:
            self.covered_at = time.time()


def _kept(erasures: list[_Watched]) -> None:
    """Each erasure's checkpoint was written by its receipt's checkpoint_due."""
    assert erasures
    for watched in erasures:
        watched.join()
        assert watched.erasure.checkpoint_due is not None
        assert watched.covered_at <= watched.erasure.checkpoint_due


def test_an_adopted_side_file_keeps_the_measured_writing_allowance(tmp_path, monkeypatch):
    """On a slow disk (here 4 MB/s), the side file a live rebuild adopts unwritten does not
    lower the erasure receipts' allowance to a guess at a fast disk's rate: the next
    erasure's promise allows for the rate measured, and holds."""
    real_write = checkpointer.write_checkpoint

    def at_4_mb_a_second(path, snapshot):
        time.sleep(snapshot.nbytes / 4e6)
        return real_write(path, snapshot)

    gallery = _enrolled_gallery(tmp_path, 12, 2000, erasure_checkpoint_delay_s=0.3)
    monkeypatch.setattr(checkpointer, "write_checkpoint", at_4_mb_a_second)
    try:
        gallery.checkpoint()  # 2,000 x 2 KB: ~1 s
        gallery.rebuild("Flat", lambda *_: None)  # nobody erased: the side file is adopted
        _no_erasure_checkpoint_pending(gallery)
        _erased_by_the_receipts_due(gallery, "r0", allowing=0.3 + 2 * 1.0)
    finally:
        gallery.close(checkpoint=False)


def _erased_by_the_receipts_due(gallery: EmbeddedGallery, registration_id: str,
                                allowing: float) -> None:
    """Erases `registration_id`: its receipt's checkpoint_due is at least `allowing` s off,
    and the checkpoint without it is written by then."""
    before = time.time()
    erasure = gallery.delete(DeleteKey.REGISTRATION_ID, registration_id)
    erased = gallery.index_status().store_sequence
    assert erasure.checkpoint_due is not None
    assert erasure.checkpoint_due - before >= allowing
    while gallery.checkpoint_sequence < erased:
        assert time.time() <= erasure.checkpoint_due
        time.sleep(0.01)


def _no_erasure_checkpoint_pending(gallery: EmbeddedGallery) -> None:
    """Waits (at most 10 s) until no erasure's checkpoint waits to start."""
    deadline = time.monotonic() + 10
    while gallery._checkpointer.seconds_to_erasure_checkpoint() != math.inf:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_gallery_opened_on_a_checkpoint_sizes_the_buffer_before_the_first(tmp_path):
    """The first checkpoint after a start copies into memory taken at the start, not grown
    (page by page, copy by copy) while writes are held."""
    people = FaceGenerator(7).persons(400)
    config = StoreConfig(data_dir=tmp_path / "data")
    gallery = EmbeddedGallery(config, "model-a", background=False)
    gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(300)])
    gallery.close()  # checkpoints
    gallery = EmbeddedGallery(config, "model-a")  # as a server opens it: offline tools do not
    try:
        address = gallery._checkpointer.buffer.address
        assert address != 0  # taken at the start
        gallery.insert_many([(Registration(f"s{i}", f"JD{i}"), people[i])
                             for i in range(300, 320)])  # grows the index, within an eighth
        gallery.checkpoint()
        assert gallery._checkpointer.buffer.address == address
    finally:
        gallery.close()


def _enrolled_gallery(tmp_path, seed: int, n: int, **store) -> EmbeddedGallery:
    """A serving gallery with n people enrolled (r{i}, ID{i}); its periodic checkpoint is an
    hour off, so only erasures checkpoint."""
    people = FaceGenerator(seed).persons(n)
    config = StoreConfig(data_dir=tmp_path / "data", checkpoint_interval_s=3600, **store)
    gallery = EmbeddedGallery(config, "model-a")
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(n)])
    except BaseException:
        gallery.close(checkpoint=False)
        raise
    return gallery


def _disk_full_once(monkeypatch) -> list[CheckpointError]:
    """The next checkpoint write fails as on a full disk; the list returned empties then."""
    real_write = checkpointer.write_checkpoint
    failures = [CheckpointError("index.ckpt: no space left on device (injected)")]

    def failing_once(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpointer, "write_checkpoint", failing_once)
    return failures


def _checkpointed_through(gallery: EmbeddedGallery, sequence: int,
                          seconds: float = 10.0) -> bool:
    """Whether the gallery's checkpoint covers `sequence` within `seconds`."""
    deadline = time.monotonic() + seconds
    while gallery.checkpoint_sequence < sequence and time.monotonic() < deadline:
        time.sleep(0.02)
    return gallery.checkpoint_sequence >= sequence


def test_an_erasures_receipt_allows_twice_the_last_checkpoints_time_and_holds(tmp_path,
                                                                               monkeypatch):
    """A slow checkpoint (a large index, a busy disk: here each write waits 0.4 s more)
    makes the next erasure's promise later by twice its time, and that promise is kept."""
    real_write = checkpointer.write_checkpoint

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpointer, "write_checkpoint", slow)
    gallery = _enrolled_gallery(tmp_path, 8, 50, erasure_checkpoint_delay_s=0.5)
    try:
        started = time.monotonic()
        gallery.checkpoint()
        took = time.monotonic() - started
        before = time.time()
        erasure = gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        erased = gallery.index_status().store_sequence
        assert erasure.checkpoint_due is not None
        assert took >= 0.4 and erasure.checkpoint_due - before >= 0.5 + 2 * 0.4
        while gallery.checkpoint_sequence < erased:
            assert time.time() <= erasure.checkpoint_due
            time.sleep(0.01)
    finally:
        gallery.close(checkpoint=False)
    on_disk = read_checkpoint(tmp_path / "data" / "index.ckpt")
    assert (on_disk.vectors, on_disk.sequence) == (49, erased)


def test_an_erasures_checkpoint_does_not_wait_for_a_compaction(tmp_path, monkeypatch):
    """A compaction takes a minute at 10,000,000 registrations (here one is made to take
    3 s more); an erasure meanwhile still gets its checkpoint by its receipt's due."""
    gallery = _enrolled_gallery(tmp_path, 9, 30, erasure_checkpoint_delay_s=0.5,
                                compact_delay_s=0.1)
    compacting = threading.Event()
    real_compact = gallery.store.compact

    def slow():
        compacting.set()
        time.sleep(3)
        return real_compact()

    monkeypatch.setattr(gallery.store, "compact", slow)
    try:
        gallery.checkpoint()
        gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        assert compacting.wait(5)
        erasure = gallery.delete(DeleteKey.REGISTRATION_ID, "r1")
        erased = gallery.index_status().store_sequence
        assert erasure.checkpoint_due is not None
        while gallery.checkpoint_sequence < erased:
            assert time.time() <= erasure.checkpoint_due, "the checkpoint waited"
            time.sleep(0.01)
    finally:
        gallery.close(checkpoint=False)


@pytest.mark.parametrize("damaged", [False, True], ids=["replayed", "rebuilt"])
def test_a_start_that_cannot_checkpoint_away_an_erasure_tries_again(tmp_path, monkeypatch,
                                                                    damaged):
    """A server stopped before its erasure checkpoint leaves the erased in index.ckpt. The
    next start replays the erasure (or rebuilds from the store, the checkpoint damaged) and
    checkpoints; a full disk fails that write. It is tried again after the erasure delay, not
    left for the next periodic checkpoint (an hour here)."""
    gallery = _enrolled_gallery(tmp_path, 12, 20, erasure_checkpoint_delay_s=3600)
    try:
        gallery.checkpoint()
        gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        erased = gallery.index_status().store_sequence
    finally:
        gallery.close(checkpoint=False)
    path = tmp_path / "data" / "index.ckpt"
    assert read_checkpoint(path).vectors == 20
    if damaged:
        with open(path, "r+b") as file:
            file.seek(path.stat().st_size - 100)
            file.write(b"\0" * 16)
    failures = _disk_full_once(monkeypatch)
    config = StoreConfig(data_dir=tmp_path / "data", checkpoint_interval_s=3600,
                         erasure_checkpoint_delay_s=0.3)
    gallery = EmbeddedGallery(config, "model-a")
    try:
        assert not failures, "the start's checkpoint was not attempted"
        assert _checkpointed_through(gallery, erased)
    finally:
        gallery.close(checkpoint=False)
    assert read_checkpoint(path).vectors == 19


def test_an_erasure_the_index_fails_to_remove_is_removed_before_its_checkpoint(tmp_path,
                                                                              monkeypatch):
    """The store erased r0, then the index's removal failed (no memory), twice. The erasure
    stands (the store is the truth), searches never return r0, and no checkpoint holds its
    code: the first erasure checkpoint is not written while the index cannot remove it, the
    next one removes it first."""
    gallery = _enrolled_gallery(tmp_path, 14, 20, erasure_checkpoint_delay_s=0.3)
    path = tmp_path / "data" / "index.ckpt"
    try:
        gallery.checkpoint()
        index = gallery.index
        real_remove, failures = index.remove, [MemoryError(), MemoryError()]

        def failing_twice(ids):
            if failures:
                raise failures.pop()
            return real_remove(ids)

        monkeypatch.setattr(index, "remove", failing_twice)
        erasure = gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        erased = gallery.index_status().store_sequence
        assert [r.registration_id for r in erasure.registrations] == ["r0"]
        probe = FaceGenerator(14).persons(20)[0]
        assert "r0" not in {scored.registration.registration_id
                            for scored in gallery.neighbours(probe, 5, -1.0)}
        assert _checkpointed_through(gallery, erased) and not failures
        assert len(gallery.index) == 19
    finally:
        gallery.close(checkpoint=False)
    assert read_checkpoint(path).vectors == 19


def _flat_gallery_of_twenty(tmp_path, people: np.ndarray) -> EmbeddedGallery:
    """A Flat gallery without its background threads, holding r0..r19 (ID0..ID19, the first
    20 of `people`) and checkpointed."""
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), "model-a",
                              IndexConfig(index_factory="Flat"), background=False)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(20)])
        gallery.checkpoint()
    except BaseException:
        gallery.close(checkpoint=False)
        raise
    return gallery


def test_erased_registrations_the_index_cannot_remove_go_with_a_rebuild(tmp_path,
                                                                         monkeypatch):
    """The index cannot remove r0 at all. A sweep's exact search (no re-rank from the store)
    still skips it; a live rebuild, whose index is built from the store, is not refused for
    the erasure checkpoint that cannot be written before it, and its swap leaves no index,
    and no checkpoint, holding r0."""
    people = FaceGenerator(15).persons(20)
    gallery = _flat_gallery_of_twenty(tmp_path, people)
    try:
        erased_key = gallery.stored_face("r0")[0]

        def no_memory(ids):
            raise MemoryError

        monkeypatch.setattr(gallery.index, "remove", no_memory)
        gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        swept = gallery.neighbours_of_many(people[:1], 5, -1.0)[0]
        assert gallery.index.exact and erased_key not in {key for key, _ in swept}
        with pytest.raises(CheckpointError, match="cannot remove"):
            gallery.checkpoint()
        gallery.rebuild("Flat", lambda *_: None)
        assert len(gallery.index) == 19 and not len(gallery._live.unremoved())
        assert erased_key not in gallery.index.search(people[:1], 5, SearchOptions())[0][0]
    finally:
        gallery.close(checkpoint=False)
    assert read_checkpoint(tmp_path / "data" / "index.ckpt").vectors == 19


def test_registrations_the_index_fails_to_add_are_found_and_added_before_a_checkpoint(
        tmp_path, monkeypatch):
    """The store committed two enrolments the index could not add (no memory): the single
    one is acknowledged, the bulk load's raises. Every search scores both exactly (a check
    would have missed them: a fraudster's second SIM), no checkpoint is written while the
    index cannot take them (a replica loading it would miss them for good), and the next
    one adds them first."""
    people = FaceGenerator(16).persons(22)
    gallery = _flat_gallery_of_twenty(tmp_path, people)
    path = tmp_path / "data" / "index.ckpt"
    try:
        index = gallery.index
        real_add, failures = index.add, [MemoryError(), MemoryError(), MemoryError()]

        def failing(ids, vectors):
            if failures:
                raise failures.pop()
            return real_add(ids, vectors)

        monkeypatch.setattr(index, "add", failing)
        gallery.insert(Registration("r20", "ID20"), people[20])
        with pytest.raises(MemoryError):
            gallery.insert_many([(Registration("r21", "ID21"), people[21])])
        for i in (20, 21):
            best = gallery.neighbours(people[i], 5, 0.4)[0]
            assert best.registration.registration_id == f"r{i}" and best.score > 0.999
            key = gallery.stored_face(f"r{i}")[0]
            assert key in {k for k, _ in gallery.neighbours_of_many(people[i:i + 1], 5, 0.4)[0]}
        with pytest.raises(CheckpointError, match="cannot add"):
            gallery.checkpoint()
        assert read_checkpoint(path).vectors == 20 and len(gallery._live.unadded()) == 2
        gallery.checkpoint()
        assert not failures and len(gallery.index) == 22
        assert not len(gallery._live.unadded())
    finally:
        gallery.close(checkpoint=False)
    assert read_checkpoint(path).vectors == 22


def test_an_unadded_registration_is_found_by_a_search_a_checkpoint_overtakes(tmp_path,
                                                                              monkeypatch):
    """A check searched the index (lacking r20, which its add failed to take), then a
    checkpoint added r20 and emptied the list of the unadded: the check still finds r20.
    While memory stays short, no checkpoint is written, not even an erasure's."""
    people = FaceGenerator(18).persons(21)
    gallery = _flat_gallery_of_twenty(tmp_path, people)
    try:
        index = gallery.index
        real_add, real_search = index.add, index.search
        short = [True]

        def add(ids, vectors):
            if short[0]:
                raise MemoryError
            return real_add(ids, vectors)

        def search_then_checkpoint(*args):
            found = real_search(*args)
            short[0] = False
            with gallery._live.writes:  # as the next checkpoint does, on another thread
                gallery._live.add_unadded()
            return found

        monkeypatch.setattr(index, "add", add)
        gallery.insert(Registration("r20", "ID20"), people[20])
        gallery.delete(DeleteKey.REGISTRATION_ID, "r5")
        with pytest.raises(CheckpointError, match="cannot add"):
            gallery._checkpointer.write_erasure_checkpoint()
        assert gallery._checkpointer.erasure_start is not None  # tried again
        written = read_checkpoint(tmp_path / "data" / "index.ckpt")
        assert written.vectors == 20 and len(gallery._live.unadded()) == 1
        monkeypatch.setattr(index, "search", search_then_checkpoint)
        best = gallery.neighbours(people[20], 5, 0.4)[0]
        assert best.registration.registration_id == "r20" and best.score > 0.999
        assert not len(gallery._live.unadded())
    finally:
        gallery.close(checkpoint=False)


def test_an_erasure_whose_slot_cannot_be_zeroed_still_leaves_the_index_and_checkpoint(
        tmp_path, monkeypatch):
    """A disk error zeroing r0's slot after the store's commit: the Delete fails, but r0 is
    out of the index and its checkpoint is written as promised (the zeroing skipped both).
    The slot is zeroed before its removal leaves the change log (which a start would zero
    it from), when a later checkpoint truncates the log."""
    people = FaceGenerator(17).persons(20)
    gallery = _enrolled_gallery(tmp_path, 17, 20, erasure_checkpoint_delay_s=0.3)
    try:
        gallery.checkpoint()

        def disk_error(keys):
            raise OSError(5, "Input/output error (injected)")

        monkeypatch.setattr(gallery.store._slots, "zero", disk_error)
        with pytest.raises(OSError):
            gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        erased = gallery.index_status().store_sequence
        assert len(gallery.index) == 19
        assert _checkpointed_through(gallery, erased)
        vector_file = tmp_path / "data" / "store" / "vectors.f32"
        assert people[0].tobytes() in vector_file.read_bytes()
        monkeypatch.undo()
        gallery.insert(Registration("late", "ID-late"), FaceGenerator(99).persons(1)[0])
        gallery.checkpoint()
        assert people[0].tobytes() not in vector_file.read_bytes()
    finally:
        gallery.close(checkpoint=False)
    assert read_checkpoint(tmp_path / "data" / "index.ckpt").vectors == 20  # with "late"


def test_an_erasures_checkpoint_that_fails_is_tried_again(tmp_path, monkeypatch):
    """A full disk fails the checkpoint after an erasure: it is tried again after the
    erasure delay, not left for the next periodic one (an hour here)."""
    gallery = _enrolled_gallery(tmp_path, 10, 20, erasure_checkpoint_delay_s=0.3)
    try:
        gallery.checkpoint()
        failures = _disk_full_once(monkeypatch)
        gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        erased = gallery.index_status().store_sequence
        assert _checkpointed_through(gallery, erased) and not failures
    finally:
        gallery.close(checkpoint=False)
    assert read_checkpoint(tmp_path / "data" / "index.ckpt").vectors == 19


def _disk_full_for(monkeypatch, writes: int) -> list[float]:
    """The next `writes` checkpoint writes fail as on a full disk; returns the list of when
    each write was tried (time.monotonic()), failed or not."""
    real_write = checkpointer.write_checkpoint
    tries: list[float] = []

    def full_for_a_while(*args, **kwargs):
        tries.append(time.monotonic())
        if len(tries) <= writes:
            raise CheckpointError("index.ckpt: no space left on device (injected)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpointer, "write_checkpoint", full_for_a_while)
    return tries


def test_a_checkpoint_failing_again_and_again_is_tried_less_and_less_often(tmp_path,
                                                                          monkeypatch):
    """A disk that stays full fails every try, and each try may write most of the index
    first (gigabytes at 10,000,000): the tries back off, doubling from the erasure delay
    (0.3 s here), and the first once the disk has room writes the checkpoint."""
    monkeypatch.setattr(checkpointer, "MIN_RETRY_S", 0.1)
    gallery = _enrolled_gallery(tmp_path, 15, 20, erasure_checkpoint_delay_s=0.3)
    try:
        gallery.checkpoint()
        tries = _disk_full_for(monkeypatch, 4)
        gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        erased = gallery.index_status().store_sequence
        assert _checkpointed_through(gallery, erased, seconds=30)
    finally:
        gallery.close(checkpoint=False)
    gaps = np.diff(tries)
    assert len(tries) == 5, tries
    assert all(later >= 1.4 * earlier for earlier, later in itertools.pairwise(gaps)), gaps
    assert read_checkpoint(tmp_path / "data" / "index.ckpt").vectors == 19


def test_an_erasures_promise_is_kept_though_another_checkpoint_failed_before(tmp_path,
                                                                            monkeypatch):
    """An erasure's checkpoint is due in 1 s when an operator's checkpoint fails (the disk
    was full for that one write), whose retry would wait 1 s: the erasure's checkpoint is
    tried at its start all the same, and written by its receipt's promise. (c446b85 moved
    the start to the retry, after the promise; 3a0c56c let the start pass while no try
    could begin, and the checkpoint thread polled without waiting meanwhile.)"""
    gallery = _enrolled_gallery(tmp_path, 16, 20, erasure_checkpoint_delay_s=1.0)
    try:
        gallery.checkpoint()
        receipt = gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        erased = gallery.index_status().store_sequence
        tries = _disk_full_for(monkeypatch, 1)
        with pytest.raises(CheckpointError, match="injected"):
            gallery.checkpoint()
        assert receipt.checkpoint_due is not None
        assert _checkpointed_through(gallery, erased, seconds=5)
        assert time.time() <= receipt.checkpoint_due
        assert tries[1] < tries[0] + max(checkpointer.MIN_RETRY_S, 1.0) + 0.1
    finally:
        gallery.close(checkpoint=False)
    assert read_checkpoint(tmp_path / "data" / "index.ckpt").vectors == 19


def test_a_periodic_checkpoint_on_a_full_disk_backs_off(tmp_path, monkeypatch):
    """A periodic checkpoint due at every change (checkpoint_every_changes=1) on a disk that
    stays full: tried at 0, 1 and 3 s in the first 3.5 s, where it was tried at every poll
    of the checkpoint thread (every 0.2 s here: about 17 tries)."""
    people = FaceGenerator(18).persons(3)
    config = StoreConfig(data_dir=tmp_path / "data", checkpoint_interval_s=3600,
                         checkpoint_every_changes=1, erasure_checkpoint_delay_s=0.2)
    gallery = EmbeddedGallery(config, "model-a")
    try:
        tries = _disk_full_for(monkeypatch, 1000)
        started = time.monotonic()
        gallery.insert(Registration("r0", "ID0"), people[0])
        time.sleep(3.5)
    finally:
        gallery.close(checkpoint=False)
    in_time = [t for t in tries if t - started <= 3.5]
    assert 2 <= len(in_time) <= 4, np.round(np.array(in_time) - started, 2)


def test_a_checkpoint_written_ends_the_waiting_of_the_retries(tmp_path, monkeypatch):
    """Four failures make the next try wait 8 s; the operator frees the disk and writes a
    checkpoint: the next erasure's checkpoint comes after the erasure delay (0.5 s), not
    after the 8 s."""
    gallery = _enrolled_gallery(tmp_path, 17, 20, erasure_checkpoint_delay_s=0.5)
    try:
        gallery.checkpoint()
        gallery.insert(Registration("late", "ID-late"), FaceGenerator(98).persons(1)[0])
        _disk_full_for(monkeypatch, 4)
        for _ in range(4):
            with pytest.raises(CheckpointError, match="injected"):
                gallery.checkpoint()
        gallery.checkpoint()  # the disk has room again
        started = time.monotonic()
        gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        erased = gallery.index_status().store_sequence
        assert _checkpointed_through(gallery, erased, seconds=10)
        assert time.monotonic() - started < 2.0
    finally:
        gallery.close(checkpoint=False)


def test_an_early_erasure_checkpoint_that_fails_keeps_the_promised_start(tmp_path,
                                                                        monkeypatch):
    """A live rebuild starting writes a pending erasure's checkpoint early (pin_log); on a
    disk full for that one write it fails, and the checkpoint is tried again at the start
    the receipt promised, not a full erasure delay after the early try (which broke the
    promise)."""
    gallery = _enrolled_gallery(tmp_path, 19, 20, erasure_checkpoint_delay_s=2.0)
    try:
        gallery.checkpoint()
        receipt = gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        erased = gallery.index_status().store_sequence
        time.sleep(1.0)
        _disk_full_for(monkeypatch, 1)
        with pytest.raises(CheckpointError, match="injected"):
            gallery._checkpointer.pin_log(0)
        gallery._checkpointer.unpin_log()
        assert receipt.checkpoint_due is not None
        assert _checkpointed_through(gallery, erased, seconds=5)
        assert time.time() <= receipt.checkpoint_due
    finally:
        gallery.close(checkpoint=False)


def test_after_a_failure_the_maintenance_thread_wakes_when_work_is_due():
    """A failed round (a periodic checkpoint on a full disk) used to wait a whole poll
    whatever was due sooner: an erasure's checkpoint due 0.1 s later started up to a poll
    late. Now it waits for what is due, and never not at all."""
    closed, calls = threading.Event(), []

    def fails_first():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise CheckpointError("injected")
        closed.set()

    thread = threading.Thread(target=run_every,
                              args=(closed, 2.0, lambda: 0.1, fails_first, "test"))
    thread.start()
    thread.join(timeout=10)
    assert len(calls) == 2, calls
    assert calls[1] - calls[0] < 1.0


def test_an_early_erasure_checkpoint_failing_slowly_keeps_the_earlier_promise(tmp_path,
                                                                             monkeypatch):
    """As above, while the failing write takes 0.5 s another erasure comes and schedules a
    checkpoint of its own, later: the earlier start is kept for both (the later erasure
    only ever gets a later promise), so the first receipt's promise holds."""
    real_write = checkpointer.write_checkpoint
    failures = [CheckpointError("index.ckpt: no space left on device (injected)")]

    def slow_failure_once(*args, **kwargs):
        if failures:
            time.sleep(0.5)
            raise failures.pop()
        return real_write(*args, **kwargs)

    gallery = _enrolled_gallery(tmp_path, 20, 20, erasure_checkpoint_delay_s=2.0)
    try:
        gallery.checkpoint()
        first = gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
        time.sleep(0.5)
        monkeypatch.setattr(checkpointer, "write_checkpoint", slow_failure_once)
        def pin_log_failing() -> None:
            with contextlib.suppress(CheckpointError):
                gallery._checkpointer.pin_log(0)

        early = threading.Thread(target=pin_log_failing)
        early.start()
        time.sleep(0.2)
        second = gallery.delete(DeleteKey.REGISTRATION_ID, "r1")
        erased = gallery.index_status().store_sequence
        early.join(timeout=10)
        gallery._checkpointer.unpin_log()
        assert not failures and first.checkpoint_due and second.checkpoint_due
        assert _checkpointed_through(gallery, erased, seconds=5)
        assert time.time() <= first.checkpoint_due
    finally:
        gallery.close(checkpoint=False)
    assert read_checkpoint(tmp_path / "data" / "index.ckpt").vectors == 18


def test_the_maintenance_thread_outlives_a_failure_of_what_it_asks_after_one():
    """After a failed compaction, the time to the next is read from the store too; a read
    error there ended the thread, and nothing compacted until a restart."""
    closed, calls = threading.Event(), []

    def fails_twice():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise StoreError("injected")
        closed.set()

    def unreadable() -> float:
        raise StoreError("injected: the store's read")

    thread = threading.Thread(target=run_every,
                              args=(closed, 0.1, unreadable, fails_twice, "test"))
    thread.start()
    thread.join(timeout=10)
    assert len(calls) == 3, calls
