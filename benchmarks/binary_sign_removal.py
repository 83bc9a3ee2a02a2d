"""What a removal costs a BinarySign512 index, which `auto` serves from 200,000 registrations
to 1,000,000 (and at 10,000,000 while FastScanIVF is rebuilt after a lost checkpoint).

Each removal holds the index's write lock, so every check waits for it. Two ways, on the same
random codes, one process, one thread:

- `compacted`: FAISS's remove_ids at once (dedup before 2026-12-06): every code after the
  removed one moves and the id map is rebuilt;
- `marked`: the id marked and skipped by searches, the codes removed together once
  MARKED_REMOVALS_MOST are marked or before a snapshot (dedup since).

Reports the median and worst milliseconds of --removals single removals, a search of k=64
with them made, and the snapshot after them (where `marked` pays its one removal).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/binary_sign_removal.py --sizes 1000000 3000000

Writes benchmarks/results/binary-sign-removal.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from dedup.gallery.embedded.index import BinarySignIndex, SearchOptions

sys.path.insert(0, str(Path(__file__).parent))
from harness import timed_ms

RESULTS = Path(__file__).parent / "results"
DIMENSION = 512


def filled(size: int, seed: int = 1) -> BinarySignIndex:
    index = BinarySignIndex(DIMENSION, 512)
    rng = np.random.default_rng(seed)
    for start in range(0, size, 200_000):
        rows = min(200_000, size - start)
        vectors = rng.standard_normal((rows, DIMENSION), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index.add(np.arange(start, start + rows, dtype=np.int64), vectors)
    return index


def one_way(index: BinarySignIndex, compacted: bool, removals: int) -> dict[str, float]:
    def remove(key: int) -> None:
        index.remove(np.array([key], np.int64))
        if compacted:
            index._remove_marked()

    removal_ms = [timed_ms(lambda key=key: remove(key)) for key in range(3, 997 * removals, 997)]
    query = np.random.default_rng(2).standard_normal((1, DIMENSION), dtype=np.float32)
    query /= np.linalg.norm(query)
    search_ms = [timed_ms(lambda: index.search(query, 64, SearchOptions())) for _ in range(10)]
    return {"removal_median_ms": statistics.median(removal_ms), "removal_max_ms": max(removal_ms),
            "search_median_ms": statistics.median(search_ms),
            "snapshot_ms": timed_ms(lambda: index.snapshot(1, "bench"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--removals", type=int, default=50)
    args = parser.parse_args()
    results = []
    print(f"{'size':>10} {'way':>10} {'removal ms':>11} {'worst':>8} {'search ms':>10} "
          f"{'snapshot ms':>12}")
    for size in args.sizes:
        for way in ("compacted", "marked"):
            row = {"size": size, "way": way,
                   **one_way(filled(size), way == "compacted", args.removals)}
            results.append(row)
            print(f"{size:>10,} {way:>10} {row['removal_median_ms']:>11.2f} "
                  f"{row['removal_max_ms']:>8.2f} {row['search_median_ms']:>10.2f} "
                  f"{row['snapshot_ms']:>12.1f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "binary-sign-removal.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS / 'binary-sign-removal.json'}")


if __name__ == "__main__":
    main()
