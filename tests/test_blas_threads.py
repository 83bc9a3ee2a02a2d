"""numpy's BLAS runs on one thread in a serving process (core/blas.py): its idle threads
spin after every product, which cost a third of the CPU of a check on 2 cores."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import faiss  # noqa: F401  (its BLAS loaded, whatever the test order)
import pytest
from threadpoolctl import ThreadpoolController

from dedup import FaceGenerator, StoreConfig
from dedup.core.blas import blas_threads, numpy_blas_paths
from dedup.core.records import Registration
from dedup.gallery.embedded.rebuild import _child_main
from dedup.gallery.embedded.store import Store

embedded_only = pytest.mark.parametrize("backend", ["embedded"])


def test_numpy_blas_is_found_apart_from_faiss_blas() -> None:
    paths = numpy_blas_paths()
    assert paths, "numpy's wheel ships its OpenBLAS"
    assert not any("faiss" in path for path in paths)


@embedded_only
def test_a_server_runs_numpy_blas_on_one_thread_and_leaves_faiss_blas(make_server: Any
                                                                       ) -> None:
    numpy_paths = numpy_blas_paths()
    others = [info["filepath"] for info in ThreadpoolController().info()
              if info["user_api"] == "blas" and info["filepath"] not in numpy_paths]
    assert others, "FAISS's own OpenBLAS is loaded"
    # Two threads each, as on this 2-core machine whatever the machine running the test has.
    with ThreadpoolController().select(user_api="blas").limit(limits=2):
        make_server()
        assert blas_threads(numpy_paths) == [1] * len(numpy_paths)
        assert blas_threads(others) == [2] * len(others)


@embedded_only
def test_numpy_blas_threads_0_keeps_numpys_own_setting(make_server: Any) -> None:
    numpy_paths = numpy_blas_paths()
    with ThreadpoolController().select(filepath=numpy_paths).limit(limits=2):
        make_server(numpy_blas_threads=0)
        assert blas_threads(numpy_paths) == [2] * len(numpy_paths)


def test_a_live_rebuilds_child_process_runs_numpy_blas_on_one_thread(tmp_path: Path) -> None:
    """The child builds on one core beside the serving process: its numpy BLAS too."""
    config = StoreConfig(data_dir=tmp_path / "data")
    store = Store(config)
    generator = FaceGenerator(seed=3)
    store.insert_many([(Registration(f"r{i}", f"ID{i}", embedding_model="m"), vector)
                       for i, vector in enumerate(generator.persons(50))])
    store.close()
    numpy_paths, messages = numpy_blas_paths(), queue.Queue()  # type: ignore[var-annotated]
    with ThreadpoolController().select(filepath=numpy_paths).limit(limits=2):
        _child_main(config, "BinarySign512", "m", None, str(tmp_path / "side.ckpt"),
                    messages, 0.3)  # type: ignore[arg-type]
        assert blas_threads(numpy_paths) == [1] * len(numpy_paths)
    assert messages.get_nowait()[0] != "error"
