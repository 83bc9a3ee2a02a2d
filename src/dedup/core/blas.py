"""The threads of numpy's BLAS in dedup's processes.

numpy's OpenBLAS starts a thread per core and, after every product it splits between them,
keeps those threads spinning for a while before they sleep. The request path multiplies
small matrices (a batch of probes by the sign-code projection, candidates by a probe) from
many threads on every call, so the spinning took CPU that no check needed: at 10,000,000
registrations on 2 cores (SignIVF4096), 19.6 ms of server CPU a check with two threads and
15.7 ms with one.

Limited here: every BLAS library loaded in the process except FAISS's own (a separate
OpenBLAS under faiss's wheel, whose threads follow OpenMP's per-thread settings:
`faiss_omp_threads`). Where numpy and FAISS share one BLAS (conda), that one is limited,
FAISS's batch searches with it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from threadpoolctl import ThreadpoolController

log = logging.getLogger("dedup.blas")


def _faiss_homes() -> tuple[Path, ...]:
    """Where FAISS's wheel keeps its libraries (found without importing it here)."""
    spec = importlib.util.find_spec("faiss")
    if spec is None or spec.origin is None:
        return ()
    package = Path(spec.origin).resolve().parent
    return package, package.parent / "faiss_cpu.libs"


def numpy_blas_paths() -> list[str]:
    """The BLAS libraries loaded in this process that are not FAISS's own."""
    homes = _faiss_homes()
    return [info["filepath"] for info in ThreadpoolController().info()
            if info["user_api"] == "blas"
            and not any(Path(info["filepath"]).resolve().is_relative_to(h) for h in homes)]


def blas_threads(paths: list[str]) -> list[int]:
    return [info["num_threads"] for info in ThreadpoolController().info()
            if info["filepath"] in paths]


def limit_numpy_blas(threads: int) -> list[str]:
    """At most `threads` threads in numpy's BLAS for this whole process (0: as it is).
    Returns the libraries now limited; says in the log what it did or could not do."""
    if threads <= 0:
        return []
    paths = numpy_blas_paths()
    if not paths:
        log.warning("no BLAS library besides FAISS's to limit to %d thread(s): numpy's "
                    "threads stay as they are", threads)
        return []
    ThreadpoolController().select(filepath=paths).limit(limits=threads)
    limited = [p for p, n in zip(paths, blas_threads(paths), strict=True) if n <= threads]
    if len(limited) < len(paths):
        log.warning("numpy's BLAS kept more than %d thread(s): %s", threads,
                    sorted(set(paths) - set(limited)))
    log.info("numpy's BLAS on %d thread(s): %s", threads,
             ", ".join(Path(p).name for p in limited))
    return limited
