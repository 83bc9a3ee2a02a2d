"""numpy's BLAS runs on one thread in a serving process (core/blas.py): its idle threads
spin after every product, which cost a third of the CPU of a check on 2 cores."""

from __future__ import annotations

from typing import Any

import pytest
from threadpoolctl import ThreadpoolController

from dedup.core.blas import numpy_blas_paths

embedded_only = pytest.mark.parametrize("backend", ["embedded"])


def threads_of(paths: list[str]) -> list[int]:
    return [info["num_threads"] for info in ThreadpoolController().info()
            if info["filepath"] in paths]


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
    # Two threads each, as on this 2-core machine whatever the machine running the test has.
    with ThreadpoolController().select(user_api="blas").limit(limits=2):
        make_server()
        assert threads_of(numpy_paths) == [1] * len(numpy_paths)
        assert threads_of(others) == [2] * len(others)


@embedded_only
def test_numpy_blas_threads_0_keeps_numpys_own_setting(make_server: Any) -> None:
    numpy_paths = numpy_blas_paths()
    with ThreadpoolController().select(filepath=numpy_paths).limit(limits=2):
        make_server(numpy_blas_threads=0)
        assert threads_of(numpy_paths) == [2] * len(numpy_paths)
