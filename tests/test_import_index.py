"""An offline import leaves the index type the gallery wants at its new size, so that a server
started on the data directory serves that type first, with no rebuild."""

from __future__ import annotations

import csv
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import RunningServer

from dedup import FaceGenerator, ServerConfig, StoreConfig
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup._proto.dedup.v1 import dedup_pb2_grpc as pb_grpc
from dedup.core.settings import IndexConfig, Limits
from dedup.face.model_pack import default_pack_dir, model_id_for
from dedup.gallery.embedded import replay
from dedup.gallery.embedded.checkpoint import read_checkpoint
from dedup.gallery.embedded.gallery import EmbeddedGallery
from dedup.gallery.embedded.index_plan import lists_for
from dedup.ops import bulk_import
from dedup.ops.bulk_import import import_offline

THRESHOLD = 300  # the test's lowered auto threshold
OFFLINE = "the offline import writes the embedded backend's data directory"


def write_batch(folder: Path, name: str, start: int, vectors: np.ndarray) -> Path:
    npy = folder / f"{name}.npy"
    np.save(npy, vectors)
    with open(npy.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["registration_id", "id_number"])
        writer.writerows((f"i{start + i}", f"ID{start + i}") for i in range(len(vectors)))
    return npy


def imported(data_dir: Path, files: list[Path], index: IndexConfig) -> str:
    """Imports offline as `dedup import --data-dir` does; returns the report's summary."""
    model_id = model_id_for(default_pack_dir() / "w600k_mbf.onnx")
    gallery = EmbeddedGallery(StoreConfig(data_dir=data_dir), model_id, index, background=False)
    try:
        report = import_offline(gallery, files, Limits())
    finally:
        gallery.close(checkpoint=True)
    return report.summary()


def first_served(data_dir: Path, index: IndexConfig, probe: np.ndarray
                 ) -> tuple[pb.IndexInfo, pb.CheckResponse]:
    server = RunningServer(ServerConfig(store=StoreConfig(data_dir=data_dir), index=index))
    try:
        info = pb_grpc.IndexAdminStub(server.channel).GetIndexInfo(pb.GetIndexInfoRequest())
        return info, server.stub.Check(pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(
            values=probe.tolist()))))
    finally:
        server.stop()


def import_failing_after(tmp_path: Path, vectors: np.ndarray, stored: int, config: IndexConfig,
                         before_closing: Callable[[EmbeddedGallery], None] = lambda _: None
                         ) -> str:
    """An offline import into tmp_path/data of `vectors` in two files whose second loses its
    CSV once every file was checked: the first `stored` rows are stored, then it fails.
    `before_closing` looks at the gallery as the import left it. Returns the model id."""
    folder = tmp_path / "in"
    folder.mkdir()
    first = write_batch(folder, "a", 0, vectors[:stored])
    broken = write_batch(folder, "b", stored, vectors[stored:])
    model_id = model_id_for(default_pack_dir() / "w600k_mbf.onnx")
    gallery = EmbeddedGallery(StoreConfig(data_dir=tmp_path / "data"), model_id, config,
                              background=False)
    checked = bulk_import.count_rows

    def then_gone(files: list[Path]) -> int:
        rows = checked(files)
        broken.with_suffix(".csv").unlink()  # as a disk error or an operator would, mid-way
        return rows

    try:
        with pytest.MonkeyPatch.context() as patched, \
                pytest.raises(ValueError, match=r"no b\.csv beside it"):
            patched.setattr(bulk_import, "count_rows", then_gone)
            import_offline(gallery, [first, broken], Limits())
        before_closing(gallery)
    finally:
        gallery.close(checkpoint=True)
    return model_id


@pytest.mark.embedded_only(reason=OFFLINE)
@pytest.mark.parametrize(("config", "wanted"), [
    (IndexConfig(auto_threshold=THRESHOLD), "BinarySign512"),
    (IndexConfig(auto_threshold=100, auto_lists_threshold=THRESHOLD),
     f"FastScanIVF{lists_for(THRESHOLD + 100)}"),  # trained and calibrated at the end
    (IndexConfig(index_factory="BinaryIVF8"), "BinaryIVF8"),  # trained at the end
    (IndexConfig(index_factory="IVF8,Flat"), "IVF8,Flat"),
])
def test_an_import_across_the_threshold_leaves_the_wanted_type_served_first(
        tmp_path, config, wanted):
    folder = tmp_path / "in"
    folder.mkdir()
    vectors = FaceGenerator(21).persons(THRESHOLD + 100)
    files = [write_batch(folder, "a", 0, vectors[:200]),
             write_batch(folder, "b", 200, vectors[200:])]
    data_dir = tmp_path / "data"
    summary = imported(data_dir, files, config)
    checkpoint = read_checkpoint(data_dir / "index.ckpt")
    assert checkpoint.kind == wanted and checkpoint.vectors == THRESHOLD + 100
    info, response = first_served(data_dir, config, vectors[250])
    assert info.index_type == wanted and info.wanted_index_type == wanted
    assert not info.rebuilding and info.vectors == THRESHOLD + 100
    assert response.matches[0].registration.registration_id == "i250"
    assert f"imported {THRESHOLD + 100:,}" in summary and f"index: {wanted}" in summary


@pytest.mark.embedded_only(reason=OFFLINE)
def test_imports_below_then_across_the_threshold(tmp_path):
    """A small import stays exact; the next one that crosses the threshold switches."""
    folder = tmp_path / "in"
    folder.mkdir()
    vectors = FaceGenerator(22).persons(THRESHOLD + 50)
    config = IndexConfig(auto_threshold=THRESHOLD)
    data_dir = tmp_path / "data"
    summary = imported(data_dir, [write_batch(folder, "a", 0, vectors[:100])], config)
    assert read_checkpoint(data_dir / "index.ckpt").kind == "Flat"
    assert "index: Flat" in summary
    summary = imported(data_dir, [write_batch(folder, "b", 100, vectors[100:])], config)
    info, response = first_served(data_dir, config, vectors[5])
    assert info.index_type == "BinarySign512" and info.vectors == THRESHOLD + 50
    assert response.matches[0].registration.registration_id == "i5"
    assert f"imported {THRESHOLD - 50:,}" in summary and "index: BinarySign512" in summary


@pytest.mark.embedded_only(reason=OFFLINE)
def test_an_import_whose_rows_are_mostly_skipped_stays_exact(tmp_path):
    """Rows counted beforehand but skipped (already enrolled) do not leave a compact index
    on a gallery below the threshold."""
    folder = tmp_path / "in"
    folder.mkdir()
    vectors = FaceGenerator(23).persons(200)
    config = IndexConfig(auto_threshold=THRESHOLD)
    data_dir = tmp_path / "data"
    npy = write_batch(folder, "a", 0, vectors)
    imported(data_dir, [npy], config)
    summary = imported(data_dir, [npy, npy], config)  # 400 rows counted, none stored
    assert "imported 0, already enrolled 400" in summary and "index: Flat" in summary
    assert read_checkpoint(data_dir / "index.ckpt").kind == "Flat"


@pytest.mark.embedded_only(reason=OFFLINE)
def test_an_import_that_ends_building_its_index_indexes_nothing_before(tmp_path):
    """An import that ends by building a trained type from the store adds no row to the
    interim index (at 10,000,000 that index grew ~220 bytes a registration), and one that
    fails before its build checkpoints no index short of the rows it stored: the next start
    replays them into the checkpoint written before the import, and serves every one."""
    vectors = FaceGenerator(24).persons(THRESHOLD + 100)
    config = IndexConfig(auto_threshold=100, auto_lists_threshold=THRESHOLD)
    data_dir = tmp_path / "data"

    def before_closing(gallery: EmbeddedGallery) -> None:
        assert gallery.comparable_count() == 200
        assert gallery.index.kind == "BinarySign512" and len(gallery.index) == 0

    import_failing_after(tmp_path, vectors, 200, config, before_closing)
    checkpoint = read_checkpoint(data_dir / "index.ckpt")
    assert (checkpoint.kind, checkpoint.vectors, checkpoint.sequence) == ("BinarySign512", 0, 0)
    info, response = first_served(data_dir, config, vectors[150])
    assert info.index_type == "BinarySign512" and info.vectors == 200
    assert response.matches[0].registration.registration_id == "i150"


@pytest.mark.embedded_only(reason=OFFLINE)
def test_the_start_after_a_failed_import_replays_its_rows_a_batch_at_a_time(
        tmp_path, monkeypatch):
    """The start after a failed deferred import replays every stored row into the checkpoint
    from before it: at 10,000,000 registrations their vectors at once (20 GB) would not fit,
    so the replay reads them from the store a batch at a time."""
    rows, batch = 12_000, 1_000
    vectors = FaceGenerator(25).persons(rows + 1)
    config = IndexConfig(auto_threshold=100, auto_lists_threshold=rows // 2)
    data_dir = tmp_path / "data"
    model_id = import_failing_after(tmp_path, vectors, rows, config)
    monkeypatch.setattr(replay, "REPLAY_BATCH", batch)
    tracemalloc.start()
    try:
        reopened = EmbeddedGallery(StoreConfig(data_dir=data_dir), model_id, config,
                                   background=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert reopened.index.kind == "BinarySign512" and len(reopened.index) == rows
        # The rows' vectors at once are 25 MB (54 MiB traced with their records, read at
        # once); a batch of them 2 MB (5 MiB traced).
        assert peak < rows * vectors.shape[1] * 4 / 3, f"{peak / 2**20:.1f} MiB traced"
    finally:
        reopened.close(checkpoint=False)
