"""A scan of the vector file from a cold page cache: through a memory map, as dedup read it
until 2026-12-06, against preadv, as it reads a scan now; and a training sample's scattered
slots, fault by fault through the map against their reads queued first.

A rebuild's fill, a compaction and `dedup doctor` read the whole vector file (20 GB at
10,000,000 registrations) in runs of 20,000 slots. The store maps the file with MADV_RANDOM,
because a re-rank reads a few scattered slots; a scan through that map (MADV_WILLNEED over the
run, the rows gathered, MADV_DONTNEED after, the code before commit d418456) faults a cold
file in a page at a time. `VectorFile.rows` now reads a run by preadv. The sample is every
38th slot, 262,144 of them at 10,000,000, as a rebuild's k-means takes it (`Snapshot.sample`):
through the map one page fault after another (before), against `VectorFile.rows`, which
queues each chunk's reads first (POSIX_FADV_WILLNEED). Before each round the page cache is
dropped (/proc/sys/vm/drop_caches as root, else posix_fadvise DONTNEED of the file's unmapped
pages), and every map is made for its round and gone after it; the ways alternate, each round
reading the same slots. Prints a table of medians and writes
benchmarks/results/vector_scan.json.

    .venv/bin/python benchmarks/vector_scan.py --data-dir /tmp/dedup-scale/10000000-clustered/data
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dedup.gallery.embedded.vector_file import HEADER_BYTES, VectorFile

sys.path.insert(0, str(Path(__file__).parent))
from harness import drop_page_cache

RESULTS = Path(__file__).parent / "results"
BATCH = 20_000  # the rows of one fill batch (rebuild.ADD_BATCH)


def random_map(path: Path, dimension: int) -> tuple[mmap.mmap, np.ndarray]:
    """The file mapped as the store maps it (MADV_RANDOM), and its slots as a matrix."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        mapped = mmap.mmap(descriptor, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(descriptor)  # the map keeps its own
    mapped.madvise(mmap.MADV_RANDOM)
    slots = (len(mapped) - HEADER_BYTES) // (4 * dimension)
    return mapped, np.frombuffer(mapped, np.float32, count=slots * dimension,
                                 offset=HEADER_BYTES).reshape(slots, dimension)


def through_the_map(path: Path, dimension: int) -> Callable[[np.ndarray], np.ndarray]:
    """A run of slots as the store read a scan before d418456."""
    mapped, view = random_map(path, dimension)

    def read(keys: np.ndarray) -> np.ndarray:
        first = HEADER_BYTES + int(keys[0] - 1) * 4 * dimension
        start = first // mmap.PAGESIZE * mmap.PAGESIZE
        end = HEADER_BYTES + int(keys[-1]) * 4 * dimension
        mapped.madvise(mmap.MADV_WILLNEED, start, end - start)
        rows = view[keys - 1]
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
        return rows

    return read


def fault_by_fault(path: Path, dimension: int) -> Callable[[np.ndarray], np.ndarray]:
    """Scattered slots through a MADV_RANDOM map, one page fault after another."""
    _, view = random_map(path, dimension)
    return lambda keys: view[keys - 1]


def with_the_store(path: Path, dimension: int,
                   measure: Callable[[Callable[[np.ndarray], np.ndarray]], dict[str, float]]
                   ) -> dict[str, float]:
    """`measure` with VectorFile.rows of a store's file opened for it alone (its map holds
    the pages it gathered: closed after, so that the next round starts cold)."""
    slots = VectorFile.open(path, dimension, 0, writable=False)
    try:
        return measure(slots.rows)
    finally:
        slots.close()


def drop_from_page_cache(path: Path) -> None:
    """The whole page cache when this process may (root), else the file's unmapped pages."""
    if drop_page_cache():
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def scan(read: Callable[[np.ndarray], np.ndarray], rows: int, first_key: int
         ) -> dict[str, float]:
    """Seconds, CPU seconds and major page faults to read `rows` slots in fill batches."""
    batches = [np.arange(first, min(first + BATCH, first_key + rows), dtype=np.int64)
               for first in range(first_key, first_key + rows, BATCH)]
    return timed(read, batches)


def sample(read: Callable[[np.ndarray], np.ndarray], slots: int) -> dict[str, float]:
    """The same for a training sample: every 38th of `slots` slots, up to 262,144, at once."""
    return timed(read, [np.arange(1, slots + 1, 38, dtype=np.int64)[:262_144]])


def timed(read: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray]
          ) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_SELF)
    started, cpu = time.monotonic(), time.process_time()
    checksum, read_bytes = 0.0, 0
    for keys in batches:
        rows_read = read(keys)
        checksum += float(rows_read[:, 0].sum())
        read_bytes += rows_read.nbytes
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu,
            "major_faults": after.ru_majflt - before.ru_majflt,
            "mb_per_s": read_bytes / seconds / 1e6, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path,
                        default=Path("/tmp/dedup-scale/10000000-clustered/data"),
                        help="a data directory of store format 2 (store/vectors.f32)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="slots a round reads")
    parser.add_argument("--first-key", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dimension", type=int, default=512)
    args = parser.parse_args()

    path = args.data_dir / "store" / "vectors.f32"
    slots = (path.stat().st_size - HEADER_BYTES) // (4 * args.dimension)
    ways: dict[str, Callable[[], dict[str, float]]] = {
        "scan: memory map (MADV_RANDOM)": lambda: scan(
            through_the_map(path, args.dimension), args.rows, args.first_key),
        "scan: preadv (now)": lambda: with_the_store(
            path, args.dimension, lambda read: scan(read, args.rows, args.first_key)),
        "sample: map, fault by fault": lambda: sample(fault_by_fault(path, args.dimension),
                                                      slots),
        "sample: reads queued first (now)": lambda: with_the_store(
            path, args.dimension, lambda read: sample(read, slots))}
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, run in ways.items():
            drop_from_page_cache(path)
            measured[name].append(run())
    for kind in ("scan", "sample"):
        sums = {round(run["checksum"], 3) for name, runs in measured.items()
                if name.startswith(kind) for run in runs}
        if len(sums) != 1:
            raise SystemExit(f"the {kind}s read different rows: checksums {sorted(sums)}")
    medians = {name: {key: statistics.median(run[key] for run in runs)
                      for key in ("seconds", "cpu_seconds", "major_faults", "mb_per_s")}
               for name, runs in measured.items()}
    print(f"\n{path}, cold page cache, medians of {args.rounds}; a scan reads {args.rows:,} "
          "slots, a sample every 38th slot (up to 262,144):\n")
    print("| read | s | CPU s | major faults | MB/s |\n|---|---|---|---|---|")
    for name, row in medians.items():
        print(f"| {name} | {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | "
              f"{row['major_faults']:,.0f} | {row['mb_per_s']:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "vector_scan.json"
    out.write_text(json.dumps({"rows": args.rows, "rounds": args.rounds, "path": str(path),
                               "medians": medians, "runs": measured}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
