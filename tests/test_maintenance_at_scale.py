"""Defects of the store's maintenance that only show at 10,000,000 registrations, each found
on a small gallery: memory that grows with the whole gallery or with every erasure ever
made, a compaction held up behind an automatic rebuild, and a store reopened without room
to grow."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest

from dedup import FaceGenerator, StoreConfig
from dedup.core.errors import StoreError
from dedup.core.records import DeleteKey, Registration
from dedup.core.settings import IndexConfig
from dedup.core.vectors import normalize_rows
from dedup.gallery.embedded import rebuild
from dedup.gallery.embedded import store as store_module
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.layout import CHECKPOINT_FILE, store_dir
from dedup.gallery.embedded.replay import change_delta
from dedup.gallery.embedded.store import OP_ADD, Store
from dedup.gallery.embedded.store_format import u64
from dedup.gallery.embedded.store_tables import TableWriter
from dedup.ops.doctor import examine

DIMENSION = 512
ROW_BYTES = DIMENSION * 4


def _vectors(count: int, seed: int) -> np.ndarray:
    return normalize_rows(np.random.default_rng(seed).standard_normal((count, DIMENSION),
                                                                      dtype=np.float32))


def _fill(store: Store, count: int, model: str = "m", id_number: str | None = None,
          first: int = 0, seed: int = 1) -> None:
    vectors = _vectors(count, seed)
    for start in range(0, count, 10_000):
        store.insert_many([
            (Registration(f"r{first + i}", id_number or f"ID{first + i}",
                          embedding_model=model), vectors[i])
            for i in range(start, min(count, start + 10_000))])


def _traced_peak(work: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        result = work()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_training_sample_among_two_models_keeps_only_its_rows(tmp_path: Path) -> None:
    """With another model's registrations in the store (a model change under way), the
    sample is read batch by batch; it kept a view of each batch of 20,000 rows, so the whole
    model's vectors stayed in memory (20 GB at 10,000,000) for a sample of 512 MB."""
    store = Store(StoreConfig(data_dir=tmp_path / "data"))
    try:
        _fill(store, 100_000)
        _fill(store, 10, model="old", first=100_000, seed=2)
        with store.snapshot() as snapshot:
            sample, peak = _traced_peak(lambda: snapshot.sample(100, "m", "m"))
        assert sample.shape == (100, DIMENSION)
        assert np.allclose(np.linalg.norm(sample, axis=1), 1.0, atol=1e-5)
        # A batch is 41 MB; before, all five stayed (205 MB).
        assert peak < 3 * 20_000 * ROW_BYTES, f"{peak / 2**20:.0f} MiB traced"
    finally:
        store.close()


def test_a_compaction_reads_the_erased_slots_a_chunk_at_a_time(tmp_path: Path) -> None:
    """A compaction checks every slot ever erased for bytes left: it read them all at once
    (1,000,000 erasures: 2 GB)."""
    store = Store(StoreConfig(data_dir=tmp_path / "data"))
    try:
        _fill(store, 100_000, id_number="ID-gone")
        _fill(store, 100, first=100_000, seed=2)
        deleted, _ = store.delete(DeleteKey.ID_NUMBER, "ID-gone")
        assert len(deleted) == 100_000
        _, peak = _traced_peak(store.compact)
        # 100,000 erased slots are 205 MB; a chunk of them is 67 MB.
        assert peak < 0.6 * 100_000 * ROW_BYTES, f"{peak / 2**20:.0f} MiB traced"
        assert store.count() == 100
        assert store.verify() == []
    finally:
        store.close()


def test_writes_after_a_compaction_do_not_have_to_grow_the_map(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A store reopened by a compaction got a map of its file's size, so the next writes
    grew it: a resize waits for every reader (at 10,000,000, the compaction's own seconds-long
    read of every key) and holds up every read that comes after it meanwhile."""
    store = Store(StoreConfig(data_dir=tmp_path / "data", initial_map_size=256 * 1024))
    try:
        _fill(store, 3000, id_number="ID-gone")
        _fill(store, 3000, first=3000, seed=2)
        store.delete(DeleteKey.ID_NUMBER, "ID-gone")
        store.compact()
        caplog.set_level(logging.INFO, logger="dedup.store")
        caplog.clear()
        _fill(store, 1000, first=6000, seed=3)
        assert "grew the LMDB map" not in caplog.text
        assert store.count() == 4000
    finally:
        store.close()


def test_the_change_log_is_read_as_arrays_not_an_object_a_change(tmp_path: Path) -> None:
    """The start after a failed import of 10,000,000 replays as many logged additions (and a
    replica's catch-up or `dedup doctor` may read a long log): each was read as a Change
    object, ~168 bytes with its numbers, 1.7 GB at 10,000,000; now 9 bytes a change."""
    store = Store(StoreConfig(data_dir=tmp_path / "data"))
    try:
        _fill(store, 100_000)
        store.delete(DeleteKey.REGISTRATION_ID, "r5")
        store.delete(DeleteKey.REGISTRATION_ID, "r99999")
        delta, peak = _traced_peak(lambda: change_delta(store, 0))
        assert delta.complete and delta.logged == 100_002
        assert len(delta.added) == 99_998 and [int(k) for k in delta.added[:3]] == [1, 2, 3]
        assert 6 not in delta.added and 100_000 not in delta.added
        assert delta.removed == {6, 100_000} and len(delta.removed_older) == 0
        # Before: 16.8 MiB traced (168 B a change). Now the arrays and a chunk of raw entries.
        assert peak < 100 * 100_002, f"{peak / 2**20:.1f} MiB traced"
        later = change_delta(store, 50_000)
        assert later.added[0] == 50_001 and [int(k) for k in later.removed_older] == [6]
    finally:
        store.close()


def test_the_change_log_is_truncated_a_bounded_number_of_entries_a_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint after an import of 10,000,000 truncates as many logged changes: one
    write transaction dropped them all, holding every write ~4.6 s (0.46 s a million measured
    here); now TRUNCATED_A_TRANSACTION a transaction, so a write waits for one chunk."""
    monkeypatch.setattr(store_module, "TRUNCATED_A_TRANSACTION", 10_000, raising=False)
    dropped: list[int] = []
    real = TableWriter.truncate_changes

    def counted(self: TableWriter, through: int, **most: int) -> int:
        dropped.append(real(self, through, **most))
        return dropped[-1]

    monkeypatch.setattr(TableWriter, "truncate_changes", counted)
    store = Store(StoreConfig(data_dir=tmp_path / "data"))
    try:
        _fill(store, 35_000)
        assert store.truncate_changes(30_000) == 30_000
        assert dropped == [10_000, 10_000, 10_000, 0]
        assert not change_delta(store, 29_999).complete  # the log starts after 30,000
        kept = change_delta(store, 30_000)
        assert kept.complete and kept.logged == 5_000 and kept.added[0] == 30_001
    finally:
        store.close()


def test_doctor_reads_the_checkpoint_once(tmp_path: Path) -> None:
    """`dedup doctor` held the checkpoint file's bytes twice beside the index loaded from it
    (1.2 GB at 10,000,000); now once: its traced peak stays under 1.5 times the file."""
    config = StoreConfig(data_dir=tmp_path / "data")
    gallery = EmbeddedGallery(config, "m", IndexConfig(index_factory="Flat"))
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), vector)
                             for i, vector in enumerate(_vectors(5_000, 3))])
    finally:
        gallery.close()  # checkpointed
    size = (config.data_dir / CHECKPOINT_FILE).stat().st_size
    findings, peak = _traced_peak(lambda: examine(config.data_dir))
    assert [f.level for f in findings if f.check == "index"] == ["ok"]
    assert peak < 1.5 * size, f"{peak / size:.2f} times the {size:,}-byte checkpoint"


@pytest.mark.parametrize("lengths", [(8, 10), (12,)])
def test_a_damaged_change_log_entry_is_refused_not_misread(tmp_path: Path,
                                                            lengths: tuple[int, ...]) -> None:
    """The log is read a chunk of entries at a time: an entry of 8 bytes beside one of 10
    would split into two of 9, misread, unless every entry's length is checked."""
    config = StoreConfig(data_dir=tmp_path / "data")
    store = Store(config)
    _fill(store, 20)
    store.close()
    env = lmdb.open(str(store_dir(config.data_dir)), max_dbs=16, map_size=1 << 30)
    with env.begin(write=True) as txn:
        changes = env.open_db(b"changes", txn=txn, create=False)
        for number, length in enumerate(lengths, start=3):
            txn.put(u64(number), OP_ADD + bytes(length - 1), db=changes)
    env.close()
    store = Store(config)
    try:
        with pytest.raises(StoreError, match="change-log entry is not 9 bytes"):
            change_delta(store, 0)
    finally:
        store.close()


@pytest.mark.timeout(180)
def test_a_compaction_is_not_held_up_by_an_automatic_rebuild(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction and the automatic switch of index type shared one thread: at 10,000,000 a
    rebuild takes 8 minutes or more, and an erasure's compaction promised meanwhile waited
    for it. Here the rebuild's process is stopped (SIGSTOP) as soon as it is spawned; an
    erasure's compaction must end by its `compaction_due` (plus a margin for a slow machine)
    while it stays stopped. Continued, the rebuild must swap in, and checkpoint, an index
    without the erased registration. (A rebuild's process whose snapshot spans a
    compaction's swap of the store's file: tests/test_compaction_beside_readers.py.)"""
    children: list[int] = []
    spawned = threading.Event()
    lower = rebuild._lower_priority

    def stopping(child: Any, value: int) -> None:
        lower(child, value)
        os.kill(child.pid, signal.SIGSTOP)
        children.append(child.pid)
        spawned.set()

    monkeypatch.setattr(rebuild, "_lower_priority", stopping)
    people = FaceGenerator(seed=31).persons(400)
    config = StoreConfig(data_dir=tmp_path / "data", checkpoint_interval_s=0.1,
                         compact_delay_s=0.2, erasure_checkpoint_delay_s=0.2)
    index_config = IndexConfig(auto_threshold=300)
    gallery = EmbeddedGallery(config, "m", index_config)
    try:
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i]) for i in range(200)])
        assert gallery.index.kind == "Flat"
        gallery.insert_many([(Registration(f"r{i}", f"ID{i}"), people[i])
                             for i in range(200, 400)])
        assert spawned.wait(60), "the automatic switch started no rebuild"
        erasure = gallery.delete(DeleteKey.REGISTRATION_ID, "r7")
        assert erasure.compaction_due is not None
        while gallery.compaction_due() is not None:
            assert time.time() < erasure.compaction_due + 10, "the compaction waited"
            time.sleep(0.05)
        assert gallery.index.kind == "Flat"  # the rebuild is still stopped
        os.kill(children[0], signal.SIGCONT)
        deadline = time.monotonic() + 60
        while gallery.index.kind != "BinarySign512":
            assert time.monotonic() < deadline, "the rebuild did not swap"
            time.sleep(0.05)
        assert len(gallery.index) == gallery.comparable_count() == 399
        assert gallery.store.verify() == []
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        gallery.close()
    reopened = EmbeddedGallery(config, "m", index_config, background=False)
    try:  # from the checkpoint written since
        assert reopened.index.kind == "BinarySign512" and len(reopened.index) == 399
        best = reopened.neighbours(people[7], 5, 0.5)  # the best is given even below 0.5
        assert [s.registration.registration_id for s in best if s.score >= 0.5] == []
        assert reopened.stored_face("r7") is None
        assert [s.registration.registration_id for s in reopened.neighbours(people[8], 1, 0.5)
                ] == ["r8"]
    finally:
        reopened.close(checkpoint=False)
