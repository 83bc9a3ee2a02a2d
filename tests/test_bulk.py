"""Bulk loading: dedup import (offline and into a server), resumption, dedup rebuild."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from test_cli import run

from dedup import FaceGenerator, StoreConfig, StoreError
from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.gallery.embedded.gallery import EmbeddedGallery

OFFLINE = ("offline import and rebuild work on a data directory; into Milvus, import through "
           "a server (test_import_into_a_running_server) or dedup migrate")


def write_batch(folder, name, start, count, seed, extra_rows=()):
    vectors = FaceGenerator(seed).persons(count)
    np.save(folder / f"{name}.npy", vectors)
    with open(folder / f"{name}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["registration_id", "id_number", "msisdn", "carrier", "region"])
        for i in range(count):
            writer.writerow([f"b{start + i}", f"ID{start + i}", f"+8613{start + i:09d}", "CM",
                             "north"])
    return vectors


@pytest.mark.embedded_only(reason=OFFLINE)
def test_import_offline_then_resume_then_serve(tmp_path, capsys, make_server):
    folder = tmp_path / "in"
    folder.mkdir()
    first = write_batch(folder, "part1", 0, 1500, seed=1)
    second = write_batch(folder, "part2", 1500, 700, seed=2)
    data_dir = tmp_path / "data"
    code, out, _ = run(capsys, "import", str(folder / "part1.npy"), "--data-dir", str(data_dir))
    assert code == 0 and "imported 1,500, already enrolled 0, rejected 0" in out
    # Interrupted after part1: the rerun skips it and loads part2.
    code, out, _ = run(capsys, "import", str(folder / "part1.npy"), str(folder / "part2.npy"),
                       "--data-dir", str(data_dir))
    assert code == 0 and "imported 700, already enrolled 1,500, rejected 0" in out
    server = make_server(data_dir=data_dir)
    assert server.stub.Stats(pb.StatsRequest()).registrations == 2200
    for i in (0, 1499):
        top = server.stub.Check(pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(
            values=first[i].tolist())))).matches[0]
        assert top.registration.registration_id == f"b{i}" and top.score > 0.999
    top = server.stub.Check(pb.CheckRequest(face=pb.Face(embedding=pb.Embedding(
        values=second[5].tolist())))).matches[0]
    assert top.registration.registration_id == "b1505"
    assert top.registration.msisdn == "+8613000001505"


@pytest.mark.embedded_only(reason=OFFLINE)
def test_import_rejects_bad_rows_and_refuses_a_held_directory(tmp_path, capsys, server):
    folder = tmp_path / "in"
    folder.mkdir()
    vectors = write_batch(folder, "bad", 0, 5, seed=3)
    vectors[1] = np.nan
    vectors[3] = 0
    np.save(folder / "bad.npy", vectors)
    with open(folder / "bad.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    rows[3][1] = ""  # row for b2 has no id_number
    rows[5][2] = rows[1][2]  # b4 reuses b0's msisdn
    with open(folder / "bad.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    code, out, _ = run(capsys, "import", str(folder / "bad.npy"), "--data-dir",
                       str(tmp_path / "fresh"))
    assert code == 2
    assert "imported 1, already enrolled 0, rejected 4" in out
    assert "embedding: value 0 is nan" in out
    assert "embedding: the vector is all zeros" in out
    assert "registration.id_number: is required" in out
    assert "registration.msisdn: held by another registration" in out

    with pytest.raises(StoreError, match="in use by another dedup process"):
        EmbeddedGallery(StoreConfig(data_dir=server.data_dir), "any-model")


def test_import_into_a_running_server(tmp_path, capsys, server):
    folder = tmp_path / "in"
    folder.mkdir()
    write_batch(folder, "live", 0, 300, seed=4)
    address = f"127.0.0.1:{server.port}"
    code, out, _ = run(capsys, "import", str(folder / "live.npy"), "--server", address)
    assert code == 0 and "imported 300, already enrolled 0, rejected 0" in out
    code, out, _ = run(capsys, "import", str(folder / "live.npy"), "--server", address)
    assert "imported 0, already enrolled 300, rejected 0" in out
    assert server.stub.Stats(pb.StatsRequest()).registrations == 300


@pytest.mark.embedded_only(reason=OFFLINE)
def test_rebuild_command_live_and_offline(tmp_path, capsys, server):
    folder = tmp_path / "in"
    folder.mkdir()
    write_batch(folder, "g", 0, 400, seed=5)
    address = f"127.0.0.1:{server.port}"
    run(capsys, "import", str(folder / "g.npy"), "--server", address)
    code, out, _ = run(capsys, "rebuild", "--server", address, "--index-factory",
                       "BinarySign256")
    assert code == 0 and "rebuilt the index as BinarySign256 with 400 vectors" in out
    code, out, _ = run(capsys, "index-info", "--server", address)
    assert '"index_type": "BinarySign256"' in out
    server.stop()
    code, out, _ = run(capsys, "rebuild", "--data-dir", str(server.data_dir),
                       "--index-factory", "Flat")
    assert code == 0 and "rebuilt the index as Flat with 400 vectors" in out


def _files_that_disagree(folder):
    """good (3 rows), short (3 embeddings, its CSV without b11's row) and empty (one
    embedding, a CSV of its header only)."""
    folder.mkdir()
    write_batch(folder, "good", 0, 3, seed=6)
    write_batch(folder, "short", 10, 3, seed=7)
    with open(folder / "short.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    with open(folder / "short.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows[:2] + rows[3:])
    write_batch(folder, "empty", 20, 1, seed=8)
    with open(folder / "empty.csv", newline="") as handle:
        header = next(csv.reader(handle))
    with open(folder / "empty.csv", "w", newline="") as handle:
        csv.writer(handle).writerow(header)


def _import_refused(capsys, folder, *target):
    for name, said in (("short", "2 rows for the 3 embeddings of short.npy"),
                       ("empty", "0 rows for the 1 embeddings of empty.npy")):
        code, _, err = run(capsys, "import", str(folder / "good.npy"),
                           str(folder / f"{name}.npy"), *target)
        assert code != 0 and said in err and "nothing imported" in err, err


@pytest.mark.embedded_only(reason=OFFLINE)
def test_a_csv_that_disagrees_with_its_embeddings_imports_nothing_offline(tmp_path, capsys):
    """Row i goes with embedding i. A row missing halfway stored everyone after it under the
    face before (b12 with b11's), acknowledged; a rerun then skipped them as already
    enrolled. A CSV with its header only beside one embedding imported nothing and said
    nothing."""
    _files_that_disagree(tmp_path / "in")
    _import_refused(capsys, tmp_path / "in", "--data-dir", str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()  # refused before the data directory is made


def test_a_csv_that_disagrees_with_its_embeddings_imports_nothing_into_a_server(
        tmp_path, capsys, server):
    _files_that_disagree(tmp_path / "in")
    _import_refused(capsys, tmp_path / "in", "--server", f"127.0.0.1:{server.port}")
    assert server.stub.Stats(pb.StatsRequest()).registrations == 0
