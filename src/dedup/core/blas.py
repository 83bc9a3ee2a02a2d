"""The threads of numpy's own BLAS (OpenBLAS) in a serving process.

numpy's OpenBLAS starts a thread per core and, after every product it splits between them,
keeps those threads spinning for a while before they sleep. The request path multiplies
small matrices (a batch of probes by the sign-code projection, candidates by a probe) from
many threads at once on every call, so the spinning took a core's worth of CPU that no
check needed: at 1,000,000 registrations on 2 cores (SignIVF4096), 12.6 ms of CPU a check
with numpy's default and 8.4 ms with one thread, 147 against 198 checks a second.

FAISS's own BLAS (a separate OpenBLAS that exact batch searches and k-means use) is left
alone: its threads follow OpenMP's settings (`faiss_omp_threads`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from threadpoolctl import ThreadpoolController


def numpy_blas_paths() -> list[str]:
    """The BLAS libraries loaded from numpy's own wheel: numpy.libs beside the package
    (manylinux wheels) or inside it."""
    package = Path(np.__file__).resolve().parent
    homes = (package, package.parent / "numpy.libs")
    return [info["filepath"] for info in ThreadpoolController().info()
            if info["user_api"] == "blas"
            and any(Path(info["filepath"]).resolve().is_relative_to(home) for home in homes)]


def limit_numpy_blas(threads: int) -> list[str]:
    """At most `threads` threads in numpy's BLAS for this whole process (0: its default).
    Returns the libraries it limited."""
    if threads <= 0:
        return []
    paths = numpy_blas_paths()
    if paths:
        ThreadpoolController().select(filepath=paths).limit(limits=threads)
    return paths
