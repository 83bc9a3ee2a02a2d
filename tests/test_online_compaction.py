"""Compaction never stops reads, and writes only for its last step: registrations enrolled,
checked and erased while it copies the store are all in the compacted store as they should
be, and the bytes of one erased meanwhile are gone after the next compaction."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from dedup.core.errors import StoreError
from dedup.core.records import DeleteKey, Registration
from dedup.core.settings import IndexConfig, StoreConfig
from dedup.core.vectors import normalize_rows
from dedup.gallery.embedded import compaction, lmdb_env, maintenance
from dedup.gallery.embedded.data_dir import open_data_dir
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.layout import DATA_FILE, REPLACED_FILE, compaction_dir
from dedup.ops.doctor import examine

GALLERY = 40_000  # enough for the copy to take a while


def registration(n: int, prefix: str = "r") -> Registration:
    return Registration(registration_id=f"{prefix}{n}", id_number=f"ID-{prefix}{n}",
                        msisdn=f"+86139{n:08d}" if prefix == "live" else "")


def open_gallery(data_dir) -> EmbeddedGallery:
    return EmbeddedGallery(StoreConfig(data_dir=data_dir), "test-model",
                           IndexConfig("BinarySign512"), background=False)


def fill(gallery: EmbeddedGallery, rng: np.random.Generator) -> None:
    for start in range(0, GALLERY, 10_000):
        vectors = normalize_rows(rng.standard_normal((10_000, 512), dtype=np.float32))
        gallery.insert_many([(registration(start + i), vectors[i]) for i in range(10_000)])


def test_reads_and_writes_go_on_while_the_store_is_copied(tmp_path):
    rng = np.random.default_rng(5)
    gallery = open_gallery(tmp_path / "data")
    fill(gallery, rng)
    gallery.delete(DeleteKey.REGISTRATION_ID, "r7")  # makes the compaction due
    lmdb_env = gallery.store._lmdb
    compaction = threading.Thread(target=gallery.compact)
    during: dict[str, list[str]] = {"enrolled": [], "erased": [], "checked": []}
    compaction.start()
    n = 0
    while compaction.is_alive():
        if lmdb_env.compacting_from is None:
            continue
        vector = normalize_rows(rng.standard_normal((1, 512), dtype=np.float32))[0]
        gallery.insert(registration(n, "live"), vector)
        found = gallery.neighbours(vector, 5, 0.9)
        erased = gallery.delete(DeleteKey.REGISTRATION_ID, f"r{1000 + n}").registrations
        if lmdb_env.compacting_from is not None:  # all three ran while the copy was made
            during["enrolled"].append(f"live{n}")
            during["checked"].append(found[0].registration.registration_id)
            during["erased"].extend(r.registration_id for r in erased)
        n += 1
    compaction.join()
    assert during["enrolled"], "no call completed while the compaction copied the store"
    assert during["checked"] == during["enrolled"]  # each found as its own best match
    for registration_id in during["enrolled"]:
        assert gallery.is_enrolled(registration_id)
    for registration_id in during["erased"] + ["r7"]:
        assert not gallery.is_enrolled(registration_id)
    assert gallery.stats().registrations == GALLERY - 1  # each round enrolled one, erased one
    # Erasures made during the copy left freed pages in it: compaction is due again.
    assert gallery.compaction_due() is not None
    gallery.close(checkpoint=True)

    gallery = open_gallery(tmp_path / "data")
    gallery.compact()
    assert gallery.compaction_due() is None
    gallery.close(checkpoint=True)
    problems = [f for f in examine(tmp_path / "data") if f.level == "problem"]
    assert not problems, problems
    erased_id = during["erased"][0].encode()
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            assert erased_id + b'"' not in path.read_bytes(), path


def test_the_replaced_data_file_is_freed_after_writes_go_on(tmp_path, caplog, monkeypatch):
    """Renamed over, the old data file freed its blocks while writes waited (about 1 s
    at 10,000,000 here): it is kept linked through the swap and deleted with the compaction's
    directory afterwards, so no file holds what it held once the compaction returns."""
    rng = np.random.default_rng(6)
    gallery = open_gallery(tmp_path / "data")
    vectors = normalize_rows(rng.standard_normal((50, 512), dtype=np.float32))
    gallery.insert_many([(registration(i), vectors[i]) for i in range(50)])
    gallery.delete(DeleteKey.REGISTRATION_ID, "r3")
    store = gallery.store._lmdb
    data_file = store.path / DATA_FILE
    old_bytes, kept = data_file.read_bytes(), {}
    swap = store.replace_data_file

    def replace_data_file(replacement, keep_replaced=None):
        swap(replacement, keep_replaced)
        kept["linked"] = keep_replaced is not None and keep_replaced.read_bytes() == old_bytes

    def rmtree(path, ignore_errors=False):
        kept["writes going on"] = not store._writes.locked()
        removed(path, ignore_errors=ignore_errors)

    store.replace_data_file = replace_data_file
    removed = compaction.shutil.rmtree
    monkeypatch.setattr(compaction.shutil, "rmtree", rmtree)
    caplog.set_level(logging.INFO, logger="dedup")
    gallery.compact()
    assert kept == {"linked": True, "writes going on": True}
    assert not compaction_dir(store.path).exists()
    assert "waiting for reads to finish" in caplog.text  # the pause's parts are logged
    gallery.close(checkpoint=True)


def test_a_compaction_killed_after_its_swap_leaves_nothing_at_the_next_start(tmp_path, caplog):
    """Its directory holds the replaced data file, whose free pages may hold erased bytes:
    the next opening of the data directory removes it."""
    gallery = open_gallery(tmp_path / "data")
    gallery.insert(registration(1), normalize_rows(np.ones((1, 512), np.float32))[0])
    store_path = gallery.store._lmdb.path
    gallery.close(checkpoint=True)
    staging = compaction_dir(store_path)
    staging.mkdir()
    (staging / REPLACED_FILE).write_bytes(b'"ID-erased"' * 100)
    caplog.set_level(logging.WARNING, logger="dedup")
    gallery = open_gallery(tmp_path / "data")
    assert not staging.exists()
    assert "left by a compaction that did not finish" in caplog.text
    assert gallery.is_enrolled("r1")
    gallery.close(checkpoint=True)


def test_a_start_that_refuses_the_store_still_removes_an_unfinished_compaction(tmp_path):
    """What a killed compaction left may hold erased bytes: it goes before anything that can
    refuse the store (here a server configured for another dimension), and `dedup doctor`
    reports it until then."""
    gallery = open_gallery(tmp_path / "data")
    gallery.insert(registration(1), normalize_rows(np.ones((1, 512), np.float32))[0])
    staging = compaction_dir(gallery.store._lmdb.path)
    gallery.close(checkpoint=True)
    staging.mkdir()
    (staging / REPLACED_FILE).write_bytes(b'"ID-erased"' * 100)
    assert [f.check for f in examine(tmp_path / "data") if f.level == "warning"] == [
        "compaction"]
    with pytest.raises(StoreError, match="holds 512-d embeddings"):
        open_data_dir(StoreConfig(data_dir=tmp_path / "data", dimension=128))
    assert not staging.exists()
    assert not [f for f in examine(tmp_path / "data") if f.level != "ok"]


def test_without_hard_links_compaction_frees_the_replaced_file_in_the_swap(tmp_path, caplog,
                                                                           monkeypatch):
    """On a file system that refuses hard links the swap frees the old file during the
    pause, as before, and says so; the erased registration is in no file afterwards."""
    def refuse(source, link):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(lmdb_env.os, "link", refuse)
    rng = np.random.default_rng(8)
    gallery = open_gallery(tmp_path / "data")
    vectors = normalize_rows(rng.standard_normal((50, 512), dtype=np.float32))
    gallery.insert_many([(registration(i), vectors[i]) for i in range(50)])
    gallery.delete(DeleteKey.REGISTRATION_ID, "r3")
    caplog.set_level(logging.WARNING, logger="dedup")
    gallery.compact()
    assert "the replaced file is freed while writes are paused" in caplog.text
    assert not compaction_dir(gallery.store._lmdb.path).exists()
    assert gallery.is_enrolled("r4") and not gallery.is_enrolled("r3")
    gallery.close(checkpoint=True)
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            assert b'"ID-r3"' not in path.read_bytes(), path


def test_an_erasures_compaction_due_allows_twice_the_last_compactions_time(tmp_path,
                                                                          monkeypatch):
    """The receipt promises the compaction's end: its start, compact_delay_s after the
    erasure, plus twice the last compaction's time (here each is made 0.8 s slower), or
    before any, the store's size at COMPACTION_BYTES_PER_S."""
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data", compact_delay_s=30),
                              "model-a", IndexConfig(index_factory="Flat"), background=False)
    try:
        vectors = normalize_rows(np.random.default_rng(5).standard_normal((20, 512),
                                                                          np.float32))
        gallery.insert_many([(registration(n), vectors[n]) for n in range(20)])
        first = gallery.delete(DeleteKey.REGISTRATION_ID, "r1")
        by_size = max(maintenance.MIN_COMPACTION_ALLOWANCE_S, 2 * gallery.store.file_bytes()
                      / maintenance.COMPACTION_BYTES_PER_S)
        assert first.compaction_due == pytest.approx(
            gallery.store.erased_since() + 30 + by_size)
        real_compact = gallery.store.compact

        def slower():
            time.sleep(0.8)
            return real_compact()

        monkeypatch.setattr(gallery.store, "compact", slower)
        gallery.compact()
        second = gallery.delete(DeleteKey.REGISTRATION_ID, "r2")
        assert second.compaction_due is not None
        assert second.compaction_due - (gallery.store.erased_since() + 30) >= 1.6
    finally:
        gallery.close(checkpoint=False)


def test_a_checkpoint_during_the_copy_loses_no_change(tmp_path, monkeypatch):
    """The checkpoint thread runs beside a compaction: a checkpoint that truncates the
    change log while the store is copied leaves the compacted store with every change, and
    the next start with nothing to mend."""
    vectors = normalize_rows(np.random.default_rng(6).standard_normal((301, 512), np.float32))
    gallery = open_gallery(tmp_path / "data")
    gallery.insert_many([(registration(n), vectors[n]) for n in range(300)])
    gallery.delete(DeleteKey.REGISTRATION_ID, "r0")
    gallery.checkpoint()
    real_copy = compaction._copy_entries
    checkpointed: list[int] = []

    def change_and_checkpoint() -> None:
        gallery.insert_many([(registration(300, "live"), vectors[300])])
        gallery.delete(DeleteKey.REGISTRATION_ID, "r5")
        checkpointed.append(gallery.checkpoint())

    def copying(*args, **kwargs):
        if not checkpointed:  # on another thread, as the checkpoint thread would
            changer = threading.Thread(target=change_and_checkpoint)
            changer.start()
            changer.join()
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(compaction, "_copy_entries", copying)
    gallery.compact()
    assert checkpointed and gallery.checkpoint_sequence == checkpointed[0]
    assert gallery.is_enrolled("live300")
    assert not gallery.is_enrolled("r5") and not gallery.is_enrolled("r0")
    gallery.close(checkpoint=False)
    gallery = open_gallery(tmp_path / "data")
    try:
        assert gallery.is_enrolled("live300") and not gallery.is_enrolled("r5")
        assert gallery.stats().registrations == 299
    finally:
        gallery.close(checkpoint=False)
    assert [f for f in examine(tmp_path / "data") if f.level == "problem"] == []
